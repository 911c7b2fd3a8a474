"""The CUDA decode kernel of csrc/pod_decode_cuda.cu, called through ctypes.

The kernel includes no torch headers, so nvcc builds it in seconds into a plain shared
library: setup.py does so when a CUDA toolkit and a CUDA PyTorch are present
(vllm_layershare/_pod_decode_cuda.so); tests and benchmarks/kernels.py build it on the
spot with `build`. It computes one-query rows (decode) of a leader or of a follower whose
distant branch reads the leader's keys or the shared scores that the Triton leader
wrote, head dims up to 256. It writes no shared scores and has no estimated mass; its
first version was 8-10x slower than the Triton kernels on an H200 (docs/benchmarks.md;
the current one, in row groups of lanes, is untimed), so the backend decodes with
Triton and says so at start-up.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

from vllm_layershare.attention.paged import UNBOUNDED, PagedPart, SharedScores

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "pod_decode_cuda.cu"  # a checkout
LIBRARY = Path(__file__).resolve().parents[1] / "_pod_decode_cuda.so"  # setup.py's build
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class PagedPartC(ctypes.Structure):
    """LayersharePagedPart of csrc/pod_decode.cuh."""

    _fields_ = [("data", ctypes.c_void_p), ("stride_block", ctypes.c_int64),
                ("stride_head", ctypes.c_int64), ("stride_slot", ctypes.c_int64),
                ("block_table", ctypes.c_void_p), ("table_stride", ctypes.c_int64),
                ("block_size", ctypes.c_int32)]


class SharedScoresC(ctypes.Structure):
    """LayershareSharedScores of csrc/pod_decode.cuh."""

    _fields_ = [("cells", ctypes.c_void_p), ("stride_page", ctypes.c_int64),
                ("stride_head", ctypes.c_int64), ("lse_first", ctypes.c_int64),
                ("block_table", ctypes.c_void_p), ("table_stride", ctypes.c_int64),
                ("block_size", ctypes.c_int32), ("tile", ctypes.c_int32)]


I64, I32, F32, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
PART = ctypes.POINTER(PagedPartC)
SCORES = ctypes.POINTER(SharedScoresC)
DECODE_ARGS = [
    PTR, I64, I64,  # out, its strides (request, head)
    PTR, I64, I64,  # q
    PTR, I64, I64,  # q_distant
    PART, PART, PART, SCORES, I32,  # k_prox, v, k_distant, shared scores, cache dtype
    PTR, I32, I32, I32, I32, I32,  # seq_lens, requests, heads, kv heads, D, Dv
    F32, I64, I64, F32, I32,  # scale, sink, recent, gate tau, splits
    PTR, ctypes.c_size_t,  # workspace, its bytes
]


def find_nvcc() -> str | None:
    """nvcc of CUDA_HOME, CUDA_PATH, /usr/local/cuda or the PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, source: Path, out: Path, archs: list[str],
                 defines: list[str] = ()) -> list[str]:
    """nvcc's command line for the shared library; archs like "sm_90", defines like
    "LAYERSHARE_MIN_BLOCKS=4"."""
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    return [nvcc, "-O3", "-std=c++17", *gencode, *(f"-D{d}" for d in defines), "-shared",
            "-Xcompiler", "-fPIC", "-o", str(out), str(source)]


def build(out: Path, archs: list[str] | None = None, source: Path = SOURCE,
          defines: list[str] = ()) -> Path:
    """Builds the library with nvcc for `archs` (default: this machine's GPU)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda or PATH)")
    if archs is None:
        major, minor = torch.cuda.get_device_capability()
        archs = [f"sm_{major}{minor}"]
    result = subprocess.run(nvcc_command(nvcc, source, out, archs, defines), capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{result.stdout}{result.stderr}")
    return out


def load(path: Path = LIBRARY) -> ctypes.CDLL:
    """The library at `path` with its two functions' signatures set."""
    lib = ctypes.CDLL(str(path))
    lib.layershare_pod_decode_workspace_bytes.restype = ctypes.c_size_t
    lib.layershare_pod_decode_workspace_bytes.argtypes = [I32, I32, I32, I32]
    lib.layershare_pod_decode.restype = I32
    lib.layershare_pod_decode.argtypes = [*DECODE_ARGS, PTR]  # + the stream
    return lib


def part_struct(part: PagedPart, table: torch.Tensor) -> PagedPartC:
    """The C view of a paged part; `table` is its block table as int32 (kept alive by
    the caller)."""
    cache = part.cache
    return PagedPartC(cache.data_ptr() + part.lo * cache.element_size(), *cache.stride()[:3],
                      table.data_ptr(), table.stride(0), part.block_size)


def scores_struct(shared: SharedScores, table: torch.Tensor, group: int, dtype: torch.dtype,
                  tile: int) -> SharedScoresC:
    """The C view of a leader's shared scores as the Triton leader wrote them with key
    tiles of `tile` positions (its decode_block_n): terms in the values' `dtype`, each
    tile's log-sum-exp after them (triton_shared._shared_args); `table` is its block
    table as int32 (kept alive by the caller)."""
    cells = shared.cache
    lse_first = -(-group * shared.block_size * dtype.itemsize // 4)
    return SharedScoresC(cells.data_ptr(), cells.stride(0), cells.stride(1), lse_first,
                         table.data_ptr(), table.stride(0), shared.block_size, tile)


def cuda_pod_decode(lib: ctypes.CDLL, q: torch.Tensor, k_prox: PagedPart, v: PagedPart,
                    seq_lens: torch.Tensor, out: torch.Tensor, scale: float, *,
                    q_distant: torch.Tensor | None = None, k_distant: PagedPart | None = None,
                    sink: int = 0, recent: int = UNBOUNDED, gate_tau: float | None = None,
                    num_splits: int = 1, workspace: torch.Tensor | None = None,
                    shared_scores: SharedScores | None = None, scores_tile: int = 32) -> None:
    """Decode attention of one query per request: q, q_distant float32 [B, H, D], out
    float32 [B, H, Dv] (D, Dv <= 256), seq_lens int32 [B] (the query sits at seq_len -
    1), on the current stream. Without k_distant: plain attention over sinks and window
    (a leader: sink 0, recent UNBOUNDED). With `shared_scores` (share `scores`, the
    leader's pass of this step having written them with tiles of `scores_tile`
    positions) the distant branch weighs V by them and reads no keys; k_distant is then
    None. `workspace`: float32, at least the library's bytes."""
    num_reqs, heads, dim = q.shape
    dim_v = v.hi - v.lo
    need = lib.layershare_pod_decode_workspace_bytes(num_reqs, heads, dim_v, num_splits)
    if workspace is None:
        workspace = torch.empty(need // 4 + 1, dtype=torch.float32, device=q.device)
    parts = [p for p in (k_prox, v, k_distant) if p is not None]
    tables = [p.block_table.to(torch.int32) for p in parts]  # alive through the call
    structs = [part_struct(p, t) for p, t in zip(parts, tables, strict=True)]
    distant = ctypes.byref(structs[2]) if k_distant is not None else None
    shared = None
    if shared_scores is not None:
        tables.append(shared_scores.block_table.to(torch.int32))
        group = heads // k_prox.cache.shape[1]
        structs.append(scores_struct(shared_scores, tables[-1], group, v.cache.dtype,
                                     scores_tile))
        shared = ctypes.byref(structs[-1])
    qd = q if q_distant is None else q_distant
    status = lib.layershare_pod_decode(
        out.data_ptr(), out.stride(0), out.stride(1), q.data_ptr(), q.stride(0), q.stride(1),
        qd.data_ptr(), qd.stride(0), qd.stride(1), ctypes.byref(structs[0]),
        ctypes.byref(structs[1]), distant, shared, DTYPE_CODES[k_prox.cache.dtype],
        seq_lens.data_ptr(), num_reqs, heads, k_prox.cache.shape[1], dim, dim_v, scale, sink,
        min(recent, UNBOUNDED), -1.0 if gate_tau is None else gate_tau, num_splits,
        workspace.data_ptr(), workspace.numel() * 4, torch.cuda.current_stream().cuda_stream)
    if status != 0:
        raise RuntimeError(f"layershare_pod_decode returned {status}")
