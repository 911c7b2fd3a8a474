"""layershare's Triton kernels compiled for a GPU, on a machine without one.

Every kernel variant the backend launches is compiled by Triton for the named NVIDIA
architectures as a launch on that GPU would compile it: the backend's own calls run on
CPU tensors, and Triton's launch stops after the compile (its driver answers as that
GPU). For each kernel it prints what ptxas made of it: registers per thread, bytes
spilled to local memory, shared memory, the matrix instruction its dots became, and how
many of its programs fit on one multiprocessor at once, and the rings of shared-memory
buffers Triton's pipeliner made for its asynchronous copies ("2x32x128": a 32 x 128 tile,
double-buffered; what hides memory latency in a bandwidth-bound decode, with the
programs per multiprocessor), and the instructions each thread issues per key tile in
every scan loop with a dot, on the path of a tile that needs no mask and (after "/") of
one that does: where a prefill is issue-bound, as the tensor cores' share of a tile is
~1,000 cycles on sm_90 and eight warps issue from four schedulers, that count decides
its speed. Exits non-zero when a kernel does not compile or spills.

Variants: Llama-3-8B heads (32 query / 8 KV heads, head dim 128) in bf16 and fp16, and
SmolLM2-135M heads (9 / 3, head dim 64) in bf16; prefill and decode; a leader alone, a
leader writing its followers' decode logits, followers reading them (share `scores`),
followers reading the leader's keys (share `keys`), followers weighting the distant
branch by their own estimated mass; the cache and summary writers.

    python benchmarks/kernel_resources.py                      # sm_90 (H100, H200)
    python benchmarks/kernel_resources.py --arch 90 80         # and sm_80 (A100)
    python benchmarks/kernel_resources.py --arch 90 --config '{"decode_stages": 3}'
    python benchmarks/kernel_resources.py --json resources.json
    python benchmarks/kernel_resources.py --metadata int64     # as callers' lists become
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout

from kernels import config_from  # noqa: E402

from vllm_layershare.attention import triton_paged  # noqa: E402
from vllm_layershare.attention.paged import (  # noqa: E402
    LayerInputs,
    PagedPart,
    SharedScores,
    SummaryPart,
)
from vllm_layershare.attention.triton_paged import TritonConfig, interpreted  # noqa: E402
from vllm_layershare.attention.waves import resident_programs  # noqa: E402

# Shared memory per multiprocessor (KiB) by architecture.
SHARED_KIB = {80: 164, 86: 100, 89: 100, 90: 228}
BLOCK, SUMMARY_TOKENS, SINK, RECENT = 16, 64, 16, 1008
# (name, query heads, KV heads, head dim, dtype)
GEOMETRIES = [("llama3-8b bf16", 32, 8, 128, torch.bfloat16),
              ("llama3-8b fp16", 32, 8, 128, torch.float16),
              ("smollm2-135m bf16", 9, 3, 64, torch.bfloat16)]
RING = re.compile(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+(?:x\d+)+)x(?:bf16|f16|f32)")
MMA = re.compile(r"\b(?:mma\.sync\.aligned\.\w+\.row\.col\.\w+\.(\w+)\.\w+\.\w+"
                 r"|wgmma\.mma_async\.sync\.aligned\.\w+\.\w+\.(\w+)\.\w+)")


@dataclass
class Compiled:
    """One kernel as ptxas built it for one architecture."""

    arch: int
    geometry: str
    variant: str
    kernel: str
    warps: int
    registers: int
    spilled: int  # bytes of local memory per thread
    shared: int  # bytes per program
    mma: str  # input type of the dots' matrix instructions, "" without dots
    buffers: str  # the pipeliner's shared-memory rings of async copies: depth x tile
    tile_instructions: list[tuple[int, int]]  # per scan loop: (tile without mask, with)

    @property
    def programs_per_sm(self) -> int:
        """Programs resident on one multiprocessor, as registers, shared memory and
        warps allow."""
        return resident_programs(self.registers, self.warps, self.shared,
                                 SHARED_KIB[self.arch] * 1024)


class _CompileOnlyDriver:
    """What Triton's launch path asks of its driver, answered as GPU `arch` would; the
    device id is the architecture, so Triton's per-device kernel caches stay apart."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def compile_only(arch: int, compiled: list):
    """Inside, `kernel[grid](...)` compiles for `arch` and launches nothing; each compiled
    kernel is appended to `compiled`. JITFunction.run is what `kernel[grid]` calls; its
    warmup mode is Triton's own compile-without-launch."""
    original, active = JITFunction.run, driver._active

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, kernel))
        return kernel

    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original
        driver._active = active  # reset_active() would look for a GPU driver: none here


@dataclass
class Layer:
    """Small paged caches and queries of one layer (only dtypes and strides matter)."""

    keys: PagedPart  # the leader's K of its K | V cache
    values: PagedPart  # the leader's V
    own_values: PagedPart  # a follower's V cache
    scores: SharedScores  # the leader's shared decode scores (write=True)
    summary: SummaryPart
    q: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor

    @staticmethod
    def make(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, queries: int,
             index: torch.dtype = torch.int32) -> Layer:
        batch, context = 2, 4 * BLOCK
        blocks = batch * context // BLOCK
        table = torch.arange(blocks, dtype=torch.int32).view(batch, -1)
        leader = torch.zeros(blocks, kv_heads, BLOCK, 2 * dim, dtype=dtype)
        summaries = torch.zeros(blocks, kv_heads, 1, dim, dtype=dtype)
        # Scores pages as vLLM plans them (layout.scores_spec): a leader page's bytes.
        group = heads // kv_heads
        score_page = BLOCK * dim // group if BLOCK * dim % group == 0 else BLOCK
        score_pages = batch * -(-context // score_page)
        scores = SharedScores(
            torch.zeros(score_pages, kv_heads, SharedScores.cell_floats(group, score_page, dtype)),
            torch.arange(score_pages, dtype=torch.int32).view(batch, -1), score_page, SINK,
            RECENT, write=True)
        return Layer(
            PagedPart(leader, 0, dim, table, BLOCK), PagedPart(leader, dim, 2 * dim, table, BLOCK),
            PagedPart(torch.zeros(blocks, kv_heads, BLOCK, dim, dtype=dtype), 0, dim, table,
                      BLOCK),
            scores,
            SummaryPart(summaries, table, SUMMARY_TOKENS, SUMMARY_TOKENS,
                        SummaryPart.log_weights(SUMMARY_TOKENS, heads)),
            torch.zeros(batch * queries, heads, dim, dtype=dtype),
            torch.arange(0, batch * queries + 1, queries, dtype=index),
            torch.full((batch,), context, dtype=index))

    def roles(self, decode: bool) -> dict[str, LayerInputs]:
        """The backend's inputs of each role (shared logits are decode's)."""
        scale = self.q.shape[-1] ** -0.5

        def shared(write: bool) -> SharedScores:
            return replace(self.scores, write=write)

        def follower(**extra) -> LayerInputs:
            return LayerInputs(q=self.q, k_prox=self.keys, v=self.own_values, scale=scale,
                               sink=SINK, recent=RECENT, q_distant=self.q, k_distant=self.keys,
                               **extra)

        found = {"full": LayerInputs(q=self.q, k_prox=self.keys, v=self.values, scale=scale),
                 "follower keys": follower(),
                 "follower keys, estimated": follower(summary=self.summary)}
        if decode:
            found["full+share"] = LayerInputs(q=self.q, k_prox=self.keys, v=self.values,
                                              scale=scale, shared_scores=shared(True))
            found["follower scores"] = follower(shared_scores=shared(False))
            found["follower scores, estimated"] = follower(shared_scores=shared(False),
                                                           summary=self.summary)
        return found


def launches(heads, kv_heads, dim, dtype, config: TritonConfig, index: torch.dtype):
    """(variant, call) for every launch the backend makes in a step of these heads;
    index: the type of the query starts and lengths."""
    for phase, queries in (("prefill", 8), ("decode", 1)):
        layer = Layer.make(heads, kv_heads, dim, dtype, queries, index)
        for role, inputs in layer.roles(decode=queries == 1).items():
            yield f"{phase}, {role}", lambda i=inputs, x=layer, m=queries: (
                triton_paged.triton_pod_attention(
                    i, x.query_start_loc, x.seq_lens, torch.zeros_like(x.q), m,
                    int(x.seq_lens.max()), config,
                    # as the backend: a decoding follower's kernel writes its summaries
                    write_summaries=m == 1 and i.summary is not None))
    slots = torch.arange(layer.q.shape[0], dtype=torch.int64)
    new = layer.q[:, :kv_heads]  # a follower's: V into its cache, K into the window's
    yield "cache write", lambda: triton_paged.triton_write_slots(
        (layer.own_values.cache, slots, BLOCK, new),
        (layer.keys.cache[..., :dim], slots, BLOCK, new))
    yield "summary write", lambda: triton_paged.triton_write_summaries(
        layer.keys, layer.summary, layer.query_start_loc, layer.seq_lens)


TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # shipped with Triton


def tool_output(tool: str, args: list[str], cubin: bytes) -> str:
    """What one of Triton's CUDA tools prints about a cubin (it reads a file)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(TOOLS / tool), *args, f.name], capture_output=True,
                              text=True, check=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    """ptxas's resource use of a cubin (cuobjdump -res-usage)."""
    text = tool_output("cuobjdump", ["-res-usage"], cubin)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump's output:\n{text}")
    registers, stack, shared, local = map(int, found.groups())
    return dict(registers=registers, spilled=stack + local, static_shared=shared)


SASS_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass(cubin: bytes) -> tuple[list[tuple[bool, str, str]], dict[str, int]]:
    """A cubin's instructions as (predicated, opcode, operands), and its labels'
    positions among them (nvdisasm -c)."""
    text = tool_output("nvdisasm", ["-c"], cubin)
    instructions, labels = [], {}
    for line in text.splitlines():
        if label := SASS_LABEL.match(line):
            labels[label.group(1)] = len(instructions)
        elif found := SASS_INSTRUCTION.search(line):
            instructions.append((bool(found.group(1)), found.group(2), found.group(3)))
    return instructions, labels


def tile_instructions(cubin: bytes) -> list[tuple[int, int]]:
    """Per loop with a matrix instruction (a scan over key tiles), the instructions one
    pass issues when it takes every forward branch inside the loop (a tile that skips
    _scan's masks) and when it takes only the unconditional ones (a masked tile)."""
    instructions, labels = sass(cubin)

    def target(operands: str) -> int | None:
        found = re.search(r"(L_x_\d+)", operands)
        return labels.get(found.group(1)) if found else None

    def path(first: int, last: int, take_predicated: bool) -> int:
        count, at = 0, first
        while at <= last:
            predicated, opcode, operands = instructions[at]
            count += 1
            jump = target(operands) if opcode.startswith("BRA") and at < last else None
            # Forward only: a backward branch inside the span (an inner loop) would cycle.
            if jump is not None and at < jump <= last and (take_predicated or not predicated):
                at = jump
            else:
                at += 1
        return count

    loops = []
    for at, (_, opcode, operands) in enumerate(instructions):
        start = target(operands) if opcode.startswith("BRA") else None
        if start is not None and start <= at and any(
                op.startswith(("HGMMA", "HMMA")) for _, op, _ in instructions[start:at + 1]):
            loops.append((path(start, at, True), path(start, at, False)))
    return loops


def compile_all(archs: list[int], config: TritonConfig, only: tuple[str, ...] = ("",),
                index: torch.dtype = torch.int32) -> list[Compiled]:
    """Every variant's kernels (those whose name contains one of `only`) for every
    architecture."""
    results = []
    for arch in archs:
        for geometry, heads, kv_heads, dim, dtype in GEOMETRIES:
            for variant, call in launches(heads, kv_heads, dim, dtype, config, index):
                if not any(text in variant for text in only):
                    continue
                compiled: list = []
                with compile_only(arch, compiled):
                    call()
                for name, kernel in compiled:
                    used = resources(kernel.asm["cubin"])
                    mma = {a or b for a, b in MMA.findall(kernel.asm["ptx"])}
                    rings = sorted(set(RING.findall(kernel.asm["ttgir"])))
                    results.append(Compiled(
                        arch, geometry, variant, name, kernel.metadata.num_warps,
                        used["registers"], used["spilled"],
                        kernel.metadata.shared + used["static_shared"], ",".join(sorted(mma)),
                        ",".join(rings), tile_instructions(kernel.asm["cubin"])))
                print(f"  sm_{arch} {geometry}: {variant}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        choices=sorted(SHARED_KIB), help="compute capabilities x 10")
    parser.add_argument("--config", metavar="JSON", help="TritonConfig fields (as "
                        "benchmarks/kernels.py --config); default: "
                        "VLLM_LAYERSHARE_TRITON_CONFIG or the defaults")
    parser.add_argument("--only", nargs="+", default=[""], metavar="TEXT",
                        help="only the variants whose name contains a TEXT (e.g. decode)")
    parser.add_argument("--metadata", choices=["int32", "int64"], default="int32",
                        help="type of the query starts and lengths: int32 as vLLM passes "
                        "them; int64 as a caller's lists become")
    parser.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = parser.parse_args()
    if interpreted():
        sys.exit("kernel_resources.py compiles for a GPU: run it without TRITON_INTERPRET")
    config = config_from(args.config)
    rows = compile_all(args.arch, config, tuple(args.only), getattr(torch, args.metadata))
    print(f"Triton {triton.__version__}; {config}\n\n| arch | heads | variant | kernel | warps "
          "| registers | spilled bytes | shared KiB | dots | copy buffers | programs per SM "
          "| instructions per tile |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| sm_{r.arch} | {r.geometry} | {r.variant} | {r.kernel} | {r.warps} "
              f"| {r.registers} | {r.spilled} | {r.shared / 1024:.1f} | {r.mma or '-'} "
              f"| {r.buffers or '-'} | {r.programs_per_sm} "
              f"| {', '.join(f'{a}/{b}' for a, b in r.tile_instructions) or '-'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [dict(vars(r), programs_per_sm=r.programs_per_sm) for r in rows], indent=1))
    spilled = [r for r in rows if r.spilled]
    if spilled:
        sys.exit(f"{len(spilled)} kernels spill registers to local memory")


if __name__ == "__main__":
    main()
