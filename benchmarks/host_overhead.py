"""Host time of one decode call of layershare's Triton attention, per role.

vLLM's piecewise CUDA graphs (its default) run attention eagerly between the captured
pieces, so at small batches a decode step waits on the host: the backend's Python that
prepares each launch, then Triton's launcher. On a GPU this times the call as made
(host side only: the kernels run on after it returns); without one (or with --stub) the
kernel launches are replaced by no-ops, which leaves the backend's own Python alone.
Llama-3-8B heads, one request of 4K context, the roles of benchmarks/kernels.py.

    python benchmarks/host_overhead.py            # on a GPU: whole calls
    python benchmarks/host_overhead.py --stub     # the backend's Python only (any machine)
    python benchmarks/host_overhead.py --config '{"fused_merge": true}'   # no merge launch
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels as bench  # noqa: E402

from vllm_layershare.attention import triton_decode, triton_paged  # noqa: E402

CONTEXT = 4096
# Each kernel, in the module whose host code launches it.
KERNELS = {"_prefill_kernel": triton_paged, "_decode_split_kernel": triton_decode,
           "_decode_merge_kernel": triton_decode}


class NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_us(role: str, device: torch.device, calls: int,
            config: triton_paged.TritonConfig = triton_paged.DEFAULT_CONFIG) -> float:
    """Median host microseconds of one decode call of `role` (synchronised between calls,
    so that no call waits behind a full launch queue)."""
    dtype = torch.bfloat16
    leader, values, table, q, starts, lens = bench.paged_layer(1, CONTEXT, 1, device, dtype)
    scores = bench.scores_cache(table, dtype)
    summary = bench.summaries(1, CONTEXT, device, dtype)
    inputs = bench.layer_inputs(leader, values, table, q, role, bench.RECENT, scores, summary)
    out = torch.empty_like(q)
    workspace = triton_paged.decode_workspace(1, bench.HEADS, bench.KV_HEADS, bench.DIM,
                                              CONTEXT, device, config)
    times = []
    for _ in range(calls + 1):  # the first compiles
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        triton_paged.triton_pod_attention(inputs, starts, lens, out, 1, CONTEXT, config,
                                          workspace, True)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[1:]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stub", action="store_true", help="no-op launches (no GPU needed)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--config", metavar="JSON", help="TritonConfig fields, as "
                        "benchmarks/kernels.py --config")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    config = bench.config_from(args.config, torch.device("cuda" if gpu else "cpu"))
    stub = args.stub or not gpu
    if stub:
        for name, module in KERNELS.items():
            setattr(module, name, NoLaunch())
    device = torch.device("cuda" if gpu else "cpu")
    what = "the backend's Python, launches stubbed" if stub else "whole calls"
    print(f"{torch.cuda.get_device_name() if gpu else 'CPU'}; host us per decode call "
          f"({what}), median of {args.calls}; {config}\n\n| role | host us |\n|---|---|")
    for role in ("full", "writing", "follower", "estimated"):
        print(f"| {role} | {host_us(role, device, args.calls, config):.1f} |", flush=True)


if __name__ == "__main__":
    main()
