"""Attention kernels alone on CPU: vLLM's stock CPU kernel vs layershare's (one layer).

Same paged data, SmolLM2-135M head geometry (9 query / 3 KV heads, head dim 64),
block size 32, as many threads as vLLM's CPU worker binds (one per core) unless
--threads says otherwise. Prints medians in ms and the ratio to stock for: a leader
(ordinary attention) and a follower (sink 16, recent 1008, share scores) on the
native kernel and on the portable PyTorch path.

    python benchmarks/attention_cpu.py [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from vllm_layershare.attention.native import describe, native_pod_attention
from vllm_layershare.attention.paged import LayerInputs, PagedPart
from vllm_layershare.attention.portable import paged_pod_attention

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 32
DTYPE = torch.bfloat16
CASES = [("decode", 4, 2080, 1), ("decode", 16, 4096, 1), ("prefill chunk", 1, 2048, 512)]


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def paged_data(batch: int, length: int, queries: int):
    per_seq = math.ceil(length / BLOCK)
    cache = torch.randn(batch * per_seq + 4, KV_HEADS, BLOCK, 2 * DIM, dtype=DTYPE)
    table = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    query = torch.randn(batch * queries, HEADS, DIM, dtype=DTYPE)
    starts = torch.arange(0, batch * queries + 1, queries, dtype=torch.int32)
    seq_lens = torch.full((batch,), length, dtype=torch.int32)
    return cache, table, query, starts, seq_lens


def stock_ms(batch: int, length: int, queries: int) -> float:
    cache, table, query, starts, seq_lens = paged_data(batch, length, queries)
    isa = _get_attn_isa(DTYPE, BLOCK, DIM, "auto")
    plan = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM,
        seq_lens=seq_lens, dtype=DTYPE, query_start_loc=starts, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False)
    keys, values = cache.view(cache.shape[0], KV_HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
    out = torch.empty_like(query)
    return median_ms(lambda: ops.cpu_attention_with_kv_cache(
        query=query, key_cache=keys, value_cache=values, output=out, query_start_loc=starts,
        seq_lens=seq_lens, scale=DIM ** -0.5, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=table, softcap=0, scheduler_metadata=plan, s_aux=None))


def ours_ms(impl, batch: int, length: int, queries: int, follower: bool) -> float:
    cache, table, query, starts, seq_lens = paged_data(batch, length, queries)
    table = table.long()
    keys = PagedPart(cache, 0, DIM, table, BLOCK)
    inputs = LayerInputs(q=query, k_prox=keys, v=PagedPart(cache, DIM, 2 * DIM, table, BLOCK),
                         scale=DIM ** -0.5)
    if follower:
        inputs.sink, inputs.recent, inputs.q_distant, inputs.k_distant = 16, 1008, query, keys
    out = torch.empty_like(query)
    starts_list, lens_list = starts.tolist(), seq_lens.tolist()
    return median_ms(lambda: impl(inputs, starts_list, lens_list, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), {DTYPE}; layershare: {describe()}\n")
    print("| case | batch x context (queries) | stock ms | leader native | follower native "
          "| follower portable |\n|---|---|---|---|---|---|")
    for name, batch, length, queries in CASES:
        stock = stock_ms(batch, length, queries)
        cells = [
            ours_ms(native_pod_attention, batch, length, queries, follower=False),
            ours_ms(native_pod_attention, batch, length, queries, follower=True),
            ours_ms(paged_pod_attention, batch, length, queries, follower=True),
        ]
        row = " | ".join(f"{c:.2f} ({c / stock:.1f}x)" for c in cells)
        print(f"| {name} | {batch} x {length} ({queries}) | {stock:.2f} | {row} |")


if __name__ == "__main__":
    main()
