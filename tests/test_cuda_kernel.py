"""The CUDA decode kernel (csrc/pod_decode_cuda.cu), on machines without a GPU.

1. nvcc compiles it for sm_80 and sm_90 (skipped only where nvcc is absent).
   ptxas's report lists every variant of the split kernel, and Llama-3-8B's spills nothing.
2. Its math, csrc/pod_decode.cuh, which the kernel and the host build share (page
   walk, per-row-group online softmax, shuffle sums, group and split merges, gate), is
   built with g++ into a shared library that runs the kernel's schedule block by block,
   emulating a row group's lanes section by section (the shuffles as the same butterfly
   over the lanes' copies) and a block's threads phase by phase, in forward and reverse
   order (the outputs must be bit-identical); through ctypes it must equal the dense reference
   (vllm_layershare/attention/reference.py) on paged caches with shuffled block tables.
   Cache slots the kernel must not read (a follower's freed keys, the leader's keys
   outside the distant set, channels outside [lo, hi)) hold NaN, so a stray read shows;
   so do the floats of a leader's shared scores that a follower must not read.
3. On a machine with a GPU (`make gpu-check`), the kernel itself, built by nvcc for
   that GPU, on the same cases.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vllm_layershare.attention import cuda_decode
from vllm_layershare.attention.cuda_decode import (
    DTYPE_CODES,
    F32,
    I32,
    I64,
    PART,
    PTR,
    SCORES,
    PagedPartC,
    SharedScoresC,
    find_nvcc,
)
from vllm_layershare.attention.paged import PagedPart, SharedScores
from vllm_layershare.attention.reference import dense_attention, dense_pod_attention

CSRC = Path(__file__).resolve().parents[1] / "csrc"
UNBOUNDED = 1 << 40
# Channels a cache holds before and after the part read: (3, 2) leaves every row
# misaligned (the kernel reads channel by channel), (8, 8) aligned (16 bytes at a time).
MISALIGNED, ALIGNED = (3, 2), (8, 8)
# (emulated threads per block, reverse order): the GPU's 128, in both orders, and odd
# counts; every schedule must give bit-identical outputs (no race inside a phase).
SCHEDULES = [(128, False), (128, True), (37, True), (1, False)]


@pytest.mark.parametrize("arch, min_blocks", [("sm_80", None), ("sm_90", None), ("sm_90", 4)])
def test_nvcc_compiles(arch, min_blocks, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda or PATH); CI has it")
    obj = tmp_path / "pod_decode.o"
    define = [f"-DLAYERSHARE_MIN_BLOCKS={min_blocks}"] if min_blocks else []
    result = subprocess.run(
        [nvcc, "-c", "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", "-Xptxas", "-v",
         *define, "-o", str(obj), str(CSRC / "pod_decode_cuda.cu")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert obj.stat().st_size > 0
    # ptxas's report: every variant of the split kernel is there (3 cache dtypes x 3
    # head counts x 2 row widths x 16-byte loads or not), and Llama-3-8B's (bf16, 4 heads
    # per block, rows of 16 lanes read 16 bytes at a time) keeps all in registers.
    usage = split_kernel_usage(result.stdout + result.stderr)
    assert len(usage) == 36, sorted(usage)
    registers, spilled = usage[("bf16", True, 4, 16)]
    if min_blocks:  # the flag reaches the launch bounds: 4 blocks of 128 threads fit
        assert max(r for r, _ in usage.values()) <= 65536 // (128 * min_blocks), usage
    else:
        assert spilled == 0 and registers <= 255, (registers, spilled)


def split_kernel_usage(ptxas_log: str) -> dict[tuple[str, bool, int, int], tuple[int, int]]:
    """(cache dtype, vectorized, heads, lanes per row) -> (registers, spilled bytes)
    of each pod_split_kernel in `nvcc -Xptxas -v`'s log."""
    usage, kernel = {}, None
    for line in ptxas_log.splitlines():
        entry = re.search(r"Compiling entry function '\S*pod_split_kernelI(?:NS_4(\w+?)E|(f))"
                          r"Lb([01])ELi(\d+)ELi(\d+)E", line)
        if entry:
            dtype = entry[1] or "float"
            kernel = (dtype, entry[3] == "1", int(entry[4]), int(entry[5]))
        elif kernel and "spill stores" in line:
            spilled = int(re.search(r"(\d+) bytes spill stores", line)[1])
        elif kernel and "Used" in line:
            usage[kernel] = (int(re.search(r"Used (\d+) registers", line)[1]), spilled)
            kernel = None
    return usage




def test_shared_library_builds_and_loads(tmp_path, host_lib):
    """What setup.py builds on a CUDA machine: the library, loadable without a GPU, its
    host-side workspace size equal to the host build's."""
    if find_nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda or PATH); CI has it")
    lib = cuda_decode.load(cuda_decode.build(tmp_path / "pod_decode.so", ["sm_80"]))
    for shape in [(1, 8, 16, 1), (5, 32, 128, 7)]:
        assert (lib.layershare_pod_decode_workspace_bytes(*shape)
                == host_lib.layershare_pod_decode_workspace_bytes(*shape) > 0)


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    """csrc/pod_decode_host_test.cpp built with g++ and loaded through ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    lib_path = tmp_path_factory.mktemp("pod_decode") / "libpod_decode_host.so"
    result = subprocess.run(
        [cxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-shared", "-fPIC",
         "-o", str(lib_path), str(CSRC / "pod_decode_host_test.cpp")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lib = ctypes.CDLL(str(lib_path))
    lib.layershare_pod_decode_workspace_bytes.restype = ctypes.c_size_t
    lib.layershare_pod_decode_workspace_bytes.argtypes = [I32, I32, I32, I32]
    lib.layershare_pod_decode_host.restype = I32
    lib.layershare_pod_decode_host.argtypes = [
        PTR, I64, I64,  # out
        PTR, I64, I64,  # q
        PTR, I64, I64,  # q_distant
        PART, PART, PART, SCORES, I32,  # k_prox, v, k_distant, shared scores, cache dtype
        PTR, I32, I32, I32, I32, I32,  # seq_lens, reqs, heads, kv heads, D, Dv
        F32, I64, I64, F32, I32,  # scale, sink, recent, tau, splits
        PTR, ctypes.c_size_t, I32, I32,  # workspace, its bytes, threads, reverse
        ctypes.POINTER(I32),  # the variant it ran: heads, lanes per row, vec, slices
    ]
    return lib


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    """csrc/pod_decode_cuda.cu built by nvcc for this machine's GPU, through ctypes."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU here: the host build runs the kernel's schedule instead")
    assert find_nvcc() is not None, "a GPU machine needs nvcc to build csrc/"
    return cuda_decode.load(cuda_decode.build(
        tmp_path_factory.mktemp("pod_decode_cuda") / "libpod_decode_cuda.so"))


@dataclass
class Paged:
    """A part of a paged cache and the tensors it points into (kept alive here)."""

    cache: torch.Tensor
    table: torch.Tensor
    block_size: int
    lo: int  # first channel of the part
    hi: int  # its end

    def c(self) -> PagedPartC:
        return PagedPartC(self.cache.data_ptr() + self.lo * self.cache.element_size(),
                          *self.cache.stride()[:3], self.table.data_ptr(), self.table.stride(0),
                          self.block_size)

    def to(self, device: str) -> Paged:
        return Paged(self.cache.to(device), self.table.to(device), self.block_size, self.lo,
                     self.hi)


@dataclass
class Shared:
    """A leader's shared decode scores (csrc's LayershareSharedScores) and its tensors."""

    cells: torch.Tensor  # float32 [pages, Hkv, floats]
    table: torch.Tensor
    block_size: int
    tile: int
    lse_first: int

    def c(self) -> SharedScoresC:
        return SharedScoresC(self.cells.data_ptr(), self.cells.stride(0), self.cells.stride(1),
                             self.lse_first, self.table.data_ptr(), self.table.stride(0),
                             self.block_size, self.tile)

    def to(self, device: str) -> Shared:
        return Shared(self.cells.to(device), self.table.to(device), self.block_size, self.tile,
                      self.lse_first)


def share_scores(seqs: list[dict], case: Case, scale: float, gen: torch.Generator) -> Shared:
    """What the leader's decode pass leaves its followers for each request's last query
    (SharedScores, triton_shared._share_tile): per tile of `tile` positions, the softmax
    e^(scale s_n - t) of its distant positions in the cache dtype and their log-sum-exp t
    as float32, in shuffled pages. Every other float is NaN, as is the page that table
    entries past a request's pages point at."""
    size, tile = case.scores
    group, hkv = case.heads // case.kv_heads, case.kv_heads
    itemsize = torch.empty(0, dtype=case.dtype).element_size()
    lse_first = -(-group * size * itemsize // 4)
    floats = lse_first + -(-size // tile) * group + 3  # spare floats at the cell's end
    needed = [-(-len(s["k"]) // size) for s in seqs]
    order = torch.randperm(sum(needed) + 1, generator=gen).tolist()
    poison = order.pop()
    cells = torch.full((len(order) + 1, hkv, floats), math.nan)
    terms = cells.view(case.dtype)
    table = torch.full((len(seqs), max(needed, default=0) + 2), poison, dtype=torch.int32)
    for b, s in enumerate(seqs):
        for blk in range(needed[b]):
            table[b, blk] = order.pop()
        if not len(s["k"]):
            continue
        distant = positions(len(s["k"]), case)[1]
        logits = scale * torch.einsum("hd,lhd->lh", s["q_lead"][-1].double(),
                                      s["k_lead"].double().repeat_interleave(group, 1))
        for start in range(0, len(s["k"]), tile):
            ns = [n for n in range(start, min(start + tile, len(s["k"]))) if distant[n]]
            if not ns:
                continue
            t = torch.logsumexp(logits[ns], dim=0)  # [H]
            for h in range(case.heads):
                kvh, g = divmod(h, group)
                lse_at = lse_first + (start % size) // tile * group + g
                cells[table[b, start // size], kvh, lse_at] = t[h].item()
                for n in ns:
                    terms[table[b, n // size], kvh, g * size + n % size] = math.exp(
                        logits[n, h] - t[h])
    return Shared(cells, table, size, tile, lse_first)


def page(rows: list[torch.Tensor], readable: list[torch.Tensor], block_size: int,
         dtype: torch.dtype, gen: torch.Generator, margins: tuple[int, int] = MISALIGNED) -> Paged:
    """Pages per-request rows [L, Hkv, C] into a cache [blocks, Hkv, block_size, lo+C+extra]
    at channels [lo, lo+C) (lo, extra = margins), blocks in shuffled order. Only
    `readable` [L] tokens are written; every other slot is NaN, and a table entry whose
    block holds no readable token points at an all-NaN block (a freed block)."""
    hkv, channels = rows[0].shape[1:]
    needed = [-(-len(r) // block_size) for r in rows]
    order = torch.randperm(sum(needed) + 1, generator=gen).tolist()
    poison = order.pop()
    lo, extra = margins
    cache = torch.full((len(order) + 1, hkv, block_size, lo + channels + extra), math.nan,
                       dtype=dtype)
    # Wider than needed: the row stride differs from the blocks a request uses.
    table = torch.full((len(rows), max(needed, default=0) + 2), poison, dtype=torch.int32)
    for b, (r, ok) in enumerate(zip(rows, readable, strict=True)):
        for blk in range(needed[b]):
            positions = [p for p in range(blk * block_size, min(len(r), (blk + 1) * block_size))
                         if ok[p]]
            if not positions:
                continue
            table[b, blk] = block = order.pop()
            for p in positions:
                cache[block, :, p % block_size, lo:lo + channels] = r[p].to(dtype)
    return Paged(cache, table, block_size, lo, lo + channels)


@dataclass
class Case:
    lens: tuple[int, ...] = (1, 5, 9, 23, 40)
    heads: int = 8
    kv_heads: int = 2
    dim: int = 16
    dim_v: int = 16
    sink: int = 2
    recent: int = 6
    share: str | None = "scores"  # None: a leader (full attention)
    dtype: torch.dtype = torch.float32
    block_sizes: tuple[int, int, int] = (4, 5, 3)  # k_prox, v, k_distant
    gate_skip: bool = False
    seed: int = 0
    margins: tuple[int, int] = MISALIGNED
    scores: tuple[int, int] | None = None  # share `scores` read as the leader left them:
    # (page size, tile of the leader's pass); None: the leader's keys (or no distant branch)
    key_scale: float = 1.0  # keys times this: logits far apart move the running maximum


CASES = {
    "scores-fp32": Case(),
    "keys-fp32": Case(share="keys", seed=1),
    "scores-gate-fp32": Case(gate_skip=True, seed=2),
    "keys-gate-bf16": Case(share="keys", gate_skip=True, dtype=torch.bfloat16, seed=3),
    "scores-bf16": Case(dtype=torch.bfloat16, block_sizes=(16, 7, 8), seed=4),
    "scores-fp16": Case(dtype=torch.float16, block_sizes=(3, 3, 3), seed=5),
    "leader-fp32": Case(lens=(1, 17, 33), share=None, sink=0, recent=UNBOUNDED, seed=6),
    "leader-bf16": Case(lens=(2, 31, 45), share=None, sink=0, recent=UNBOUNDED,
                        dtype=torch.bfloat16, block_sizes=(16, 16, 16), seed=7),
    # Multi-tile ranges (kTile = 32) in both branches and sequences not past the sinks.
    "long-gate-fp32": Case(lens=(70, 3, 4), sink=4, recent=33, gate_skip=True, seed=8),
    # MQA, Dv != D, no sinks; a padded batch entry (seq_len 0) gives zeros.
    "mqa-dv-fp32": Case(lens=(0, 6, 13, 30), heads=4, kv_heads=1, dim=8, dim_v=12, sink=0,
                        recent=3, share="keys", seed=9),
    # MHA, a window of one token.
    "mha-fp32": Case(lens=(2, 5, 30), heads=3, kv_heads=3, dim=32, dim_v=32, sink=4, recent=1,
                     block_sizes=(2, 32, 5), seed=10),
    # Aligned rows: read 16 bytes at a time; vLLM's power-of-two pages.
    "aligned-bf16": Case(lens=(3, 38, 70), dtype=torch.bfloat16, block_sizes=(16, 8, 32),
                         margins=ALIGNED, seed=12),
    "aligned-leader-fp32": Case(lens=(1, 45), share=None, sink=0, recent=UNBOUNDED,
                                block_sizes=(16, 16, 16), margins=ALIGNED, seed=13),
    # Six query heads per kv head (blocks of 8 heads, two unused), aligned fp16.
    "gqa6-fp16": Case(lens=(12, 51), heads=12, kv_heads=2, dim=32, dim_v=32, sink=3, recent=9,
                      dtype=torch.float16, block_sizes=(8, 4, 16), margins=ALIGNED, seed=14),
    # Ten query heads per kv head: two blocks per kv head (8 + 2 heads).
    "gqa10-keys-fp32": Case(lens=(7, 33), heads=10, kv_heads=1, dim=8, dim_v=8, sink=1,
                            recent=5, share="keys", seed=15),
    # Head dims over 128: rows of 32 lanes, aligned and not.
    "wide-bf16": Case(lens=(6, 29), heads=4, kv_heads=2, dim=160, dim_v=136, sink=2, recent=7,
                      dtype=torch.bfloat16, block_sizes=(4, 4, 4), margins=ALIGNED, seed=16),
    "wide-gate-fp32": Case(lens=(20, 9), heads=2, kv_heads=2, dim=200, dim_v=256, sink=2,
                           recent=4, gate_skip=True, seed=17),
    # A follower reading its leader's shared scores: tiles inside pages, tiles over two
    # pages, the gate skip; a tile of the leader's pass split between the sinks or the
    # window and the distant positions.
    "shared-fp32": Case(lens=(3, 17, 40, 70), sink=3, recent=6, scores=(8, 4), seed=18),
    "shared-gate-fp32": Case(lens=(30, 52), heads=12, kv_heads=2, sink=1, recent=7,
                             gate_skip=True, scores=(4, 8), seed=19),
    "shared-bf16": Case(lens=(9, 66), dtype=torch.bfloat16, block_sizes=(16, 16, 16),
                        margins=ALIGNED, scores=(16, 32), seed=20),
    # Ten query heads per kv head: the second block's heads start at the group's ninth.
    "shared-gqa10-fp32": Case(lens=(5, 37), heads=10, kv_heads=1, dim=8, dim_v=8, sink=2,
                              recent=6, scores=(8, 4), seed=23),
    # Logits some tens of nats apart: the lagging maximum moves and rescales, in both
    # branches and both distant sources.
    "spread-keys-fp32": Case(lens=(70, 45), sink=4, recent=20, key_scale=12.0, seed=21),
    "spread-shared-fp32": Case(lens=(70, 45), sink=4, recent=20, key_scale=12.0,
                               scores=(8, 8), seed=22),
}
# The split kernel each case runs (heads per block, lanes per row, 16-byte loads, blocks
# per kv head), as the launcher documents its choice.
VARIANTS = {
    "aligned-bf16": (4, 16, 1, 1), "aligned-leader-fp32": (4, 16, 1, 1),
    "gqa6-fp16": (8, 16, 1, 1), "gqa10-keys-fp32": (8, 16, 0, 2), "wide-bf16": (4, 32, 1, 1),
    "wide-gate-fp32": (1, 32, 0, 1), "mha-fp32": (1, 16, 0, 1), "scores-fp32": (4, 16, 0, 1),
    "shared-gate-fp32": (8, 16, 0, 1), "shared-bf16": (4, 16, 1, 1),
    "shared-gqa10-fp32": (8, 16, 0, 2),
}
# bf16 terms round each distant softmax weight by up to 2^-9 (the bound: 1e-2).
SHARED_BF16_TOLERANCE = dict(atol=1e-2, rtol=1e-2)


def positions(length: int, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(proximal, distant) masks [L] of the query at L - 1 (method.md)."""
    j, i = torch.arange(length), length - 1
    proximal = (j < case.sink) | (j > i - case.recent)
    return proximal, ~proximal


def proximal_mass(q, k, q_d, k_d, case: Case, scale: float) -> torch.Tensor:
    """Gate g = softmax mass of P of the last query, per head [H] (picks a tau)."""
    group = case.heads // case.kv_heads
    proximal, _ = positions(len(k), case)
    s_p = scale * torch.einsum("hd,lhd->lh", q[-1].double(), k.double().repeat_interleave(group, 1))
    s_d = scale * torch.einsum("hd,lhd->lh", q_d[-1].double(),
                               k_d.double().repeat_interleave(group, 1))
    weights = torch.softmax(torch.where(proximal[:, None], s_p, s_d), dim=0)
    return weights[proximal].sum(0)


def pick_tau(gates: torch.Tensor) -> float:
    """A threshold between two gates near the median, clear of every gate."""
    g = gates.sort().values
    gaps = [(abs(i - len(g) / 2), i) for i in range(1, len(g)) if g[i] - g[i - 1] > 1e-3]
    _, i = min(gaps)
    return float(g[i - 1] + g[i]) / 2


@dataclass
class Prepared:
    case: Case
    q: torch.Tensor  # [B, H, D] view into a wider buffer (strided)
    q_distant: torch.Tensor
    parts: tuple[Paged, Paged, Paged | None]
    shared: Shared | None
    seq_lens: torch.Tensor
    scale: float
    tau: float | None
    expected: torch.Tensor  # [B, H, Dv] float64


def prepare(case: Case) -> Prepared:
    gen = torch.Generator().manual_seed(case.seed)
    h, hkv, d, dv = case.heads, case.kv_heads, case.dim, case.dim_v
    scale = 1.0 / math.sqrt(d)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    def rounded(x):  # what the cache stores, as the reference must see it
        return x.to(case.dtype).float()

    seqs = []
    for length in case.lens:
        seqs.append(dict(q=rand(length, h, d), k=rounded(case.key_scale * rand(length, hkv, d)),
                         v=rounded(rand(length, hkv, dv)), q_lead=rand(length, h, d),
                         k_lead=rounded(case.key_scale * rand(length, hkv, d))))
    leader = case.share is None
    for s in seqs:
        s["q_d"] = s["q"] if case.share == "keys" else s["q_lead"]
    tau = None
    if case.gate_skip:
        gates = [proximal_mass(s["q"], s["k"], s["q_d"], s["k_lead"], case, scale)
                 for s in seqs if positions(len(s["k"]), case)[1].any()]
        tau = pick_tau(torch.cat(gates))
    expected = torch.zeros(len(seqs), h, dv, dtype=torch.float64)
    for b, s in enumerate(seqs):
        if not len(s["q"]):
            continue  # a padded entry: zeros
        if leader:
            expected[b] = dense_attention(s["q"], s["k"], s["v"], scale)[-1]
        else:
            expected[b] = dense_pod_attention(
                s["q"], s["k"], s["v"], s["q_lead"], s["k_lead"], scale, sink=case.sink,
                recent=case.recent, share=case.share, gate_skip_threshold=tau)[-1]
    masks = [positions(len(s["k"]), case) for s in seqs]
    kp_bs, v_bs, kd_bs = case.block_sizes
    k_prox = page([s["k"] for s in seqs], [m[0] for m in masks], kp_bs, case.dtype, gen,
                  case.margins)
    v = page([s["v"] for s in seqs], [torch.ones(len(m[0]), dtype=torch.bool) for m in masks],
             v_bs, case.dtype, gen, case.margins)
    k_dist = None if leader or case.scores else page(
        [s["k_lead"] for s in seqs], [m[1] for m in masks], kd_bs, case.dtype, gen, case.margins)
    shared = share_scores(seqs, case, scale, gen) if case.scores else None

    def last_rows(key):  # decode queries [B, H, D] inside a wider [B, H + 3, D] buffer
        buf = torch.full((len(seqs), h + 3, d), math.nan)
        for b, s in enumerate(seqs):
            if len(s[key]):
                buf[b, :h] = s[key][-1]
        return buf[:, :h]

    q = last_rows("q")
    q_distant = q if case.share == "keys" else last_rows("q_lead")  # keys: aliases q
    seq_lens = torch.tensor(case.lens, dtype=torch.int32)
    return Prepared(case, q, q_distant, (k_prox, v, k_dist), shared, seq_lens, scale, tau,
                    expected)


def run_host(lib, p: Prepared, splits: int, threads: int = 128, reverse: bool = False,
             variant=None, **override) -> torch.Tensor:
    """The host build of the kernel; checks that it writes only out and its workspace.
    `variant` (a ctypes int array of 4, or None) receives the split kernel it ran."""
    return run_kernel(lib.layershare_pod_decode_host, lib, p, splits, "cpu",
                      dict(threads=threads, reverse=int(reverse), variant=variant), override)


def run_cuda(lib, p: Prepared, splits: int) -> torch.Tensor:
    """The CUDA kernel on this machine's GPU, on the current stream."""
    stream = torch.cuda.current_stream().cuda_stream
    out = run_kernel(lib.layershare_pod_decode, lib, p, splits, "cuda", dict(stream=stream))
    return out.cpu()


def run_kernel(fn, lib, p: Prepared, splits: int, device: str, tail: dict,
               override: dict | None = None) -> torch.Tensor:
    """Calls the launcher `fn` on `device` copies of p; `tail` ends its arguments,
    `override` replaces some."""
    c = p.case
    b, h, dv = len(c.lens), c.heads, c.dim_v
    out_buf = torch.full((b, h + 1, dv + 2), math.nan, device=device)
    out = out_buf[:, :h, :dv]
    ws_bytes = lib.layershare_pod_decode_workspace_bytes(b, h, dv, splits)
    guard = 64
    workspace = torch.full((ws_bytes // 4 + guard,), 12345.0, device=device)
    parts = [part.to(device) if part else None for part in p.parts]
    k_prox, v, k_dist = (part.c() if part else None for part in parts)
    shared = p.shared.to(device) if p.shared else None  # alive through the call
    shared_c = shared.c() if shared else None
    q, q_d = p.q.to(device), p.q_distant.to(device)
    seq_lens = p.seq_lens.to(device)
    args = dict(
        out=out.data_ptr(), out_s0=out.stride(0), out_s1=out.stride(1),
        q=q.data_ptr(), q_s0=q.stride(0), q_s1=q.stride(1),
        qd=q_d.data_ptr(), qd_s0=q_d.stride(0), qd_s1=q_d.stride(1),
        k_prox=ctypes.byref(k_prox), v=ctypes.byref(v),
        k_dist=ctypes.byref(k_dist) if k_dist else None,
        shared=ctypes.byref(shared_c) if shared_c else None, dtype=DTYPE_CODES[c.dtype],
        seq_lens=seq_lens.data_ptr(), reqs=b, heads=h, kv_heads=c.kv_heads, dim=c.dim,
        dim_v=dv, scale=p.scale, sink=c.sink, recent=c.recent,
        tau=-1.0 if p.tau is None else p.tau, n_splits=splits, ws=workspace.data_ptr(),
        ws_bytes=ws_bytes, **tail,
    )
    args.update(override or {})
    status = fn(*args.values())
    if device == "cuda":
        torch.cuda.synchronize()
    assert status == 0, f"launcher returned {status}"
    assert torch.all(workspace[ws_bytes // 4:] == 12345.0), "wrote past the workspace"
    assert out_buf[:, h:].isnan().all() and out_buf[:, :h, dv:].isnan().all(), "wrote past out"
    return out.clone()


@pytest.fixture(scope="module")
def prepared():
    cache = {}

    def get(name: str) -> Prepared:
        if name not in cache:
            cache[name] = prepare(CASES[name])
        return cache[name]
    return get


def tolerance(case: Case) -> dict:
    """The reference sees the cache's rounded values, but not the rounded shared terms."""
    rounded_terms = case.scores is not None and case.dtype != torch.float32
    return SHARED_BF16_TOLERANCE if rounded_terms else dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernel_matches_reference(cuda_lib, prepared, name):
    p = prepared(name)
    for splits in sorted({1, 3, max(p.case.lens) + 5}):
        torch.testing.assert_close(run_cuda(cuda_lib, p, splits).double(), p.expected,
                                   **tolerance(p.case),
                                   msg=lambda m, s=splits: f"{name}, {s} splits: {m}")


@pytest.mark.parametrize("name", ["scores-bf16", "leader-fp32", "keys-gate-bf16", "shared-bf16"])
def test_cuda_pod_decode_wrapper(cuda_lib, prepared, name):
    """The torch-facing call (cuda_decode.cuda_pod_decode) on GPU tensors."""
    p = prepared(name)
    c = p.case
    parts = [PagedPart(part.cache.cuda(), part.lo, part.hi, part.table.cuda(), part.block_size)
             if part else None for part in p.parts]
    shared = None
    if p.shared:  # the lse offset is the wrapper's to find, as the Triton leader lays it out
        shared = SharedScores(p.shared.cells.cuda(), p.shared.table.cuda(), p.shared.block_size,
                              c.sink, c.recent, write=False)
    out = torch.full((len(c.lens), c.heads, c.dim_v), math.nan, device="cuda")
    cuda_decode.cuda_pod_decode(
        cuda_lib, p.q.cuda(), parts[0], parts[1], p.seq_lens.cuda(), out, p.scale,
        q_distant=p.q_distant.cuda(), k_distant=parts[2], sink=c.sink, recent=c.recent,
        gate_tau=p.tau, num_splits=3, shared_scores=shared,
        scores_tile=p.shared.tile if p.shared else 32)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.cpu().double(), p.expected, **tolerance(c))


@pytest.mark.parametrize("name", list(CASES))
def test_host_kernel_matches_reference(host_lib, prepared, name):
    p = prepared(name)
    case = p.case
    tol = tolerance(case)
    variant = (I32 * 4)()
    run_host(host_lib, p, 1, variant=variant)
    assert variant[2] == (case.margins == ALIGNED), "aligned rows are read 16 bytes at a time"
    assert tuple(variant) == VARIANTS.get(name, tuple(variant)), "the launcher's choice"
    for splits in sorted({1, 3, max(case.lens), max(case.lens) + 5}):
        outs = [run_host(host_lib, p, splits, threads, reverse) for threads, reverse in SCHEDULES]
        for other in outs[1:]:
            assert torch.equal(outs[0], other), f"schedule-dependent output at {splits} splits"
        torch.testing.assert_close(outs[0].double(), p.expected, **tol,
                                   msg=lambda m, s=splits: f"{name}, {s} splits: {m}")


def test_gate_skip_cases_skip_some_rows_only(prepared):
    """The gate-skip cases are not vacuous: tau turns some (not all) rows to o_P."""
    for name in ("scores-gate-fp32", "keys-gate-bf16", "long-gate-fp32"):
        p = prepared(name)
        no_skip = prepare(Case(**{**p.case.__dict__, "gate_skip": False}))
        changed = (p.expected - no_skip.expected).abs().amax(-1) > 1e-9  # [B, H]
        has_distant = torch.tensor([n > p.case.sink + p.case.recent for n in p.case.lens])
        assert changed.any(), name
        assert (~changed & has_distant[:, None]).any(), name


def test_follower_equal_to_leader_is_attention(host_lib):
    """Invariant 5: share scores, a follower's q, K, V equal to its leader's gives plain
    attention; invariant 1: with D empty a follower is plain attention too."""
    case = Case(lens=(9, 30, 41), seed=11)
    gen = torch.Generator().manual_seed(case.seed)
    h, hkv, d = case.heads, case.kv_heads, case.dim
    ks = [torch.randn(n, hkv, d, generator=gen) for n in case.lens]
    vs = [torch.randn(n, hkv, d, generator=gen) for n in case.lens]
    qs = [torch.randn(n, h, d, generator=gen) for n in case.lens]
    every = [torch.ones(n, dtype=torch.bool) for n in case.lens]
    keys, values = page(ks, every, 4, case.dtype, gen), page(vs, every, 5, case.dtype, gen)
    scale = 1.0 / math.sqrt(d)
    expected = torch.stack([dense_attention(q, k, v, scale)[-1]
                            for q, k, v in zip(qs, ks, vs, strict=True)])
    q_last = torch.stack([q[-1] for q in qs])
    seq_lens = torch.tensor(case.lens, dtype=torch.int32)
    same = Prepared(case, q_last, q_last, (keys, values, keys), None, seq_lens, scale, None,
                    expected)
    for splits in (1, 3):
        torch.testing.assert_close(run_host(host_lib, same, splits).double(), expected,
                                   atol=2e-5, rtol=2e-5)
    # D empty everywhere (n_s + n_r > every length): distant queries (NaN) are never used.
    near = Prepared(Case(lens=case.lens, sink=3, recent=41), q_last,
                    torch.full_like(q_last, math.nan), (keys, values, keys), None, seq_lens,
                    scale, 0.5, expected)
    torch.testing.assert_close(run_host(host_lib, near, 3).double(), expected,
                               atol=2e-5, rtol=2e-5)


def test_bad_arguments_are_refused(host_lib, prepared):
    p = prepared("scores-fp32")
    for override, code in [(dict(kv_heads=3), -1), (dict(n_splits=0), -1), (dict(dtype=7), -2),
                           (dict(ws_bytes=16), -3), (dict(dim=264, dim_v=264), -1)]:
        with pytest.raises(AssertionError, match=f"returned {code}"):
            run_host(host_lib, p, 2, **override)
    # Shared scores: not with the leader's keys too, pages and tiles powers of two.
    shared = prepared("shared-fp32")
    keys, odd_page = shared.parts[0].c(), shared.shared.c()
    odd_page.block_size = 6
    for override in (dict(k_dist=ctypes.byref(keys)), dict(shared=ctypes.byref(odd_page))):
        with pytest.raises(AssertionError, match="returned -1"):
            run_host(host_lib, shared, 2, **override)
