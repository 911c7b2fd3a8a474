"""layershare's Triton kernels against full attention, on a bare GPU machine.

Needs only PyTorch and Triton (no vLLM). Llama-3-8B head geometry: 32 query heads,
8 KV heads, head dim 128, bf16, paged caches with block size 16 and shuffled block
tables. For decode and prefill chunks at contexts 4K-128K and batches 1-256 it
prints the time of the leader (full-attention) kernel, of the same kernel when it
also writes its followers' shared decode scores, of the follower kernel (share
scores, sink 16, recent 1008; in decode it reads the leader's scores, not its keys),
of PyTorch's scaled_dot_product_attention on the same data laid out densely (a
sanity line), the bytes each kernel must read over its time against the device's
measured copy bandwidth, and follower / full.

    python benchmarks/kernels.py                 # on a GPU
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   # tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout

from vllm_layershare.attention.paged import LayerInputs, PagedPart, SharedScores  # noqa: E402
from vllm_layershare.attention.triton_paged import triton_pod_attention  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
SINK, RECENT = 16, 1008
# (case, context, batch, queries per request); skipped when the caches do not fit.
CASES = [("decode", ctx, batch, 1) for ctx in (4096, 32768, 131072)
         for batch in (1, 16, 64, 256)] + [("prefill", ctx, 1, 2048)
                                            for ctx in (4096, 32768, 131072)]
SMOKE_CASES = [("decode", 200, 3, 1), ("prefill", 160, 1, 40)]


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, mib: int) -> float:
    """Device memory bandwidth measured by a copy (bytes read + bytes written)."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() / ms / 1e6


def paged_layer(batch: int, context: int, queries: int, device: torch.device, dtype):
    """A leader's K|V cache and a follower's V cache, one shuffled block table."""
    per_seq = -(-context // BLOCK)
    blocks = batch * per_seq
    table = torch.randperm(blocks, device=device).view(batch, per_seq)
    leader = torch.randn(blocks, KV_HEADS, BLOCK, 2 * DIM, device=device, dtype=dtype)
    values = torch.randn(blocks, KV_HEADS, BLOCK, DIM, device=device, dtype=dtype)
    q = torch.randn(batch * queries, HEADS, DIM, device=device, dtype=dtype)
    starts = list(range(0, batch * queries + 1, queries))
    return leader, values, table, q, starts, [context] * batch


def layer_inputs(leader, values, table, q, role: str, recent: int,
                 scores: torch.Tensor) -> LayerInputs:
    """role: full (a leader alone), writing (a leader sharing its decode scores),
    follower (reading them)."""
    keys = PagedPart(leader, 0, DIM, table, BLOCK)
    shared = SharedScores(scores, SINK, recent, write=role == "writing")
    if role != "follower":
        return LayerInputs(q=q, k_prox=keys, v=PagedPart(leader, DIM, 2 * DIM, table, BLOCK),
                           scale=DIM ** -0.5, shared_scores=shared if role == "writing" else None)
    # The follower's own key window: a separate cache would hold only sinks and the
    # window; the kernel reads only those positions, so the leader's keys stand in.
    return LayerInputs(q=q, k_prox=keys, v=PagedPart(values, 0, DIM, table, BLOCK),
                       scale=DIM ** -0.5, sink=SINK, recent=recent, q_distant=q,
                       k_distant=keys, shared_scores=shared)


def kernel_ms(inputs: LayerInputs, starts: list[int], lens: list[int], out: torch.Tensor,
              repeats: int) -> float:
    return timed_ms(lambda: triton_pod_attention(inputs, starts, lens, out), out.device, repeats)


def bytes_read(batch: int, context: int, queries: int, role: str, recent: int) -> int:
    """Bytes a kernel must read once: K and V of every token (bf16); a decoding
    follower reads V, its own window's keys, and the leader's fp32 scores (per query
    head) instead of the leader's distant keys."""
    full = context * KV_HEADS * DIM * 2 * 2
    if role != "follower" or queries > 1:
        return batch * full
    near = min(context, SINK + recent)
    return batch * (full // 2 + near * KV_HEADS * DIM * 2 + (context - near) * HEADS * 4)


def sdpa_ms(batch, context, queries, device, dtype, repeats) -> float:
    q = torch.randn(batch, HEADS, queries, DIM, device=device, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, context, DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = None
    if queries > 1:  # causal with the queries at the end of the context
        pos = torch.arange(context, device=device)
        mask = pos[None, :] <= (context - queries + torch.arange(queries, device=device))[:, None]
    return timed_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True), device, repeats)


def fits(batch: int, context: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    need = batch * context * KV_HEADS * DIM * 2 * 5  # paged K|V, V, dense K and V, bf16
    return need < 0.8 * torch.cuda.mem_get_info()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = SMOKE_CASES if args.smoke else CASES
    repeats = 2 if args.smoke else args.repeats
    recent = 64 if args.smoke else RECENT  # the smoke contexts must have distant tokens
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    bandwidth = copy_bandwidth_gbs(device, 4 if args.smoke else 2048)
    print(f"{name}; copy bandwidth {bandwidth:.0f} GB/s; {HEADS} query / {KV_HEADS} KV heads, "
          f"head dim {DIM}, {dtype}, block {BLOCK}; follower: share scores, sink {SINK}, "
          f"recent {recent}\n")
    print("| case | context | batch | full ms | full+share ms | follower ms | follower/full "
          "| SDPA ms | full GB/s (% copy) | follower GB/s (% copy) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for case, context, batch, queries in cases:
        if not fits(batch, context, device):
            print(f"| {case} | {context} | {batch} | (does not fit) |")
            continue
        leader, values, table, q, starts, lens = paged_layer(batch, context, queries, device,
                                                             dtype)
        out = torch.empty_like(q)
        scores = torch.empty(leader.shape[0] * BLOCK, HEADS, device=device)
        # in this order: the follower reads what the writing leader left
        ms = {role: kernel_ms(layer_inputs(leader, values, table, q, role, recent, scores),
                              starts, lens, out, repeats)
              for role in ("full", "writing", "follower")}
        del leader, values, scores
        sdpa = sdpa_ms(batch, context, queries, device, dtype, repeats)
        rates = []
        for role in ("full", "follower"):
            gbs = bytes_read(batch, context, queries, role, recent) / ms[role] / 1e6
            rates.append(f"{gbs:.0f} ({100 * gbs / bandwidth:.0f}%)")
        print(f"| {case} | {context} | {batch} | {ms['full']:.3f} | {ms['writing']:.3f} | "
              f"{ms['follower']:.3f} | {ms['follower'] / ms['full']:.2f}x | {sdpa:.3f} | "
              f"{rates[0]} | {rates[1]} |", flush=True)


if __name__ == "__main__":
    main()
