"""layershare's Triton kernels against full attention, on a bare GPU machine.

Needs only PyTorch and Triton (no vLLM). Llama-3-8B head geometry: 32 query heads,
8 KV heads, head dim 128, bf16, paged caches with block size 16 and shuffled block
tables. For decode and prefill chunks at contexts 4K-128K and batches 1-256 it
prints the time of the leader (full-attention) kernel, of the same kernel when it
also writes its followers' shared decode scores, of the follower kernel (share
scores, sink 16, recent 1008; in decode it reads the leader's scores, not its keys),
of the same follower weighing its distant branch by its own estimated mass (a mean
key per 64 tokens: the default mode), of PyTorch's scaled_dot_product_attention on
the same data laid out densely (a sanity line), the bytes each kernel must read over
its time against the device's measured copy bandwidth, and follower / full. Kernel
times are GPU time alone (each call replayed from a CUDA graph); the last column times
the calls eagerly, the host's launch work included. A last table checks the issue's
targets on the rows (follower / full, share of the copy bandwidth). In decode
it also times the CUDA kernel of csrc/ (built here with nvcc, when there is one) as a
leader and as a follower that reads the leader's shared scores, as the Triton one does.

    python benchmarks/kernels.py                 # on a GPU
    python benchmarks/kernels.py --sweep         # launch shapes compared (TritonConfig)
    python benchmarks/kernels.py --steps         # whole decode steps, eager and CUDA graph
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   # tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare checkout

from vllm_layershare.attention import cuda_decode, tuning  # noqa: E402
from vllm_layershare.attention.paged import (  # noqa: E402
    LayerInputs,
    PagedPart,
    SharedScores,
    SummaryPart,
)
from vllm_layershare.attention.triton_paged import (  # noqa: E402
    DEFAULT_CONFIG,
    TritonConfig,
    decode_splits,
    decode_workspace,
    triton_pod_attention,
    triton_write_slots,
)

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
SINK, RECENT = 16, 1008
# distant_mass: estimated (the default): a mean key per SUMMARY tokens, pages as the
# backend plans them (layout.summary_spec: 2 x BLOCK states per page).
SUMMARY, SUMMARY_STATES = 64, 2 * BLOCK
# (case, context, batch, queries per request); skipped when the caches do not fit.
CASES = [("decode", ctx, batch, 1) for ctx in (4096, 32768, 131072)
         for batch in (1, 16, 64, 256)] + [("prefill", ctx, 1, 2048)
                                            for ctx in (4096, 32768, 131072)]
# 192: a multiple of SUMMARY, so that the smoke decode writes mean keys too
SMOKE_CASES = [("decode", 192, 3, 1), ("prefill", 160, 1, 40)]
# --steps: a group of one leader and GROUP_FOLLOWERS followers, (context, batch).
GROUP_FOLLOWERS = 3
STEP_CASES = [(ctx, batch) for ctx in (4096, 32768) for batch in (1, 16, 64)]
SMOKE_STEP_CASES = [(192, 3)]


def config_from(text: str | None, device: torch.device | None = None) -> TritonConfig:
    """A --config argument (TritonConfig fields as JSON, or a file of it, such as a
    sweep's result) as a config; without one, what the backend would launch on `device`
    (tuning.py: VLLM_LAYERSHARE_TRITON_CONFIG, this GPU's tuned file, or the defaults)."""
    if text:
        return tuning.from_setting(text, "--config")
    return tuning.device_launch_config(device or torch.device("cpu"))[0]


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
    """A leader's K|V cache and a follower's V cache, one shuffled block table (int32,
    as vLLM's). Decode requests are at different points of their mean-key blocks, as in
    a real step: request r has context - r % SUMMARY positions, so one in SUMMARY
    completes a block (a follower with the estimated mass then writes its mean key;
    aligned_lens: every request does)."""
    per_seq = -(-context // BLOCK)
    blocks = batch * per_seq
    table = torch.randperm(blocks, device=device, dtype=torch.int32).view(batch, per_seq)
    leader = torch.randn(blocks, KV_HEADS, BLOCK, 2 * DIM, device=device, dtype=dtype)
    values = torch.randn(blocks, KV_HEADS, BLOCK, DIM, device=device, dtype=dtype)
    q = torch.randn(batch * queries, HEADS, DIM, device=device, dtype=dtype)
    starts = torch.arange(0, batch * queries + 1, queries, device=device, dtype=torch.int32)
    lens = aligned_lens(batch, context, device)
    if queries == 1:
        lens -= torch.arange(batch, device=device, dtype=torch.int32) % SUMMARY
    return leader, values, table, q, starts, lens


def aligned_lens(batch: int, context: int, device: torch.device) -> torch.Tensor:
    """Every request at `context` positions: in decode, a multiple of SUMMARY, so each
    completes a mean-key block (the worst step of a follower with the estimated mass)."""
    return torch.full((batch,), context, device=device, dtype=torch.int32)


def scores_cache(table: torch.Tensor, dtype: torch.dtype) -> SharedScores:
    """A leader's shared decode scores for the requests of `table` (write=True), laid out
    as vLLM plans the scores companion (layout.scores_spec): pages of a K+V page's bytes
    (BLOCK * DIM / group tokens), a shuffled table of their own."""
    page = BLOCK * DIM // (HEADS // KV_HEADS)
    batch, per_seq = table.shape[0], -(-table.shape[1] * BLOCK // page)
    pages = torch.randperm(batch * per_seq, device=table.device, dtype=torch.int32)
    cells = torch.empty(batch * per_seq, KV_HEADS,
                        SharedScores.cell_floats(HEADS // KV_HEADS, page, dtype),
                        device=table.device)
    return SharedScores(cells, pages.view(batch, -1), page, SINK, RECENT, write=True)


def summaries(batch: int, context: int, device: torch.device, dtype) -> SummaryPart:
    """A follower's mean keys (random: only the bytes read matter here), paged as the
    backend plans them, with a shuffled table of their own."""
    per_seq = -(-context // (SUMMARY * SUMMARY_STATES))
    table = torch.randperm(batch * per_seq, device=device, dtype=torch.int32).view(batch, -1)
    cache = torch.randn(batch * per_seq, KV_HEADS, SUMMARY_STATES, DIM, device=device,
                        dtype=dtype)
    return SummaryPart(cache, table, SUMMARY * SUMMARY_STATES, SUMMARY,
                       SummaryPart.log_weights(SUMMARY, HEADS, device=device))


def layer_inputs(leader, values, table, q, role: str, recent: int,
                 scores: SharedScores, summary: SummaryPart | None = None) -> LayerInputs:
    """role: full (a leader alone), writing (a leader sharing its decode scores),
    follower (reading them), estimated (a follower reading them whose distant branch
    weighs by its own estimated mass: `summary`, the default mode)."""
    keys = PagedPart(leader, 0, DIM, table, BLOCK)
    shared = dataclasses.replace(scores, recent=recent, write=role == "writing")
    if role not in ("follower", "estimated"):
        return LayerInputs(q=q, k_prox=keys, v=PagedPart(leader, DIM, 2 * DIM, table, BLOCK),
                           scale=DIM ** -0.5, shared_scores=shared if role == "writing" else None)
    # The follower's own key window: a separate cache would hold only sinks and the
    # window; the kernel reads only those positions, so the leader's keys stand in.
    return LayerInputs(q=q, k_prox=keys, v=PagedPart(values, 0, DIM, table, BLOCK),
                       scale=DIM ** -0.5, sink=SINK, recent=recent, q_distant=q,
                       k_distant=keys, shared_scores=shared,
                       summary=summary if role == "estimated" else None)


def device_ms(fn, device: torch.device, repeats: int) -> float:
    """Median ms of fn() on the GPU alone: replayed from a CUDA graph, since timing one
    eager call also counts the GPU idling while the host prepares its launches (0.08 ms
    for a leader's prefill call on the H200's host, 0.19 ms for a follower's). On a CPU:
    the call as made."""
    return graph_ms(fn, device, repeats) or timed_ms(fn, device, repeats)


def kernel_ms(inputs: LayerInputs, starts: torch.Tensor, lens: torch.Tensor,
              out: torch.Tensor, repeats: int, config: TritonConfig = DEFAULT_CONFIG,
              eager: bool = False) -> float:
    """The backend's call (device metadata, host maxima and decode flag, a workspace
    made beforehand; in decode a follower's kernel writes its summaries), on the GPU
    alone (device_ms), or eager: as launched, host included."""
    queries = starts[1:] - starts[:-1]
    max_q, decode_rows = int(queries.max()), bool((queries == 1).any())
    write_summaries = max_q == 1 and inputs.summary is not None
    max_len = int(lens.max())
    workspace = decode_workspace(lens.shape[0], out.shape[1], inputs.k_prox.cache.shape[1],
                                 out.shape[2], max_len, out.device, config)
    timer = timed_ms if eager else device_ms
    return timer(lambda: triton_pod_attention(inputs, starts, lens, out, max_q, max_len,
                                              config, workspace, decode_rows, write_summaries),
                 out.device, repeats)


def cuda_ms(lib, inputs: LayerInputs, lens: torch.Tensor, repeats: int,
            config: TritonConfig) -> float:
    """csrc's decode kernel on the same caches (float32 queries and output); a follower
    reads the shared scores that the Triton leader left, as the Triton follower does."""
    q = inputs.q.float()
    out = torch.empty_like(q)
    num_reqs, kv_heads = q.shape[0], inputs.k_prox.cache.shape[1]
    max_len = int(lens.max())
    splits = decode_splits(num_reqs, kv_heads, max_len, q.device, config)
    need = lib.layershare_pod_decode_workspace_bytes(num_reqs, q.shape[1], q.shape[2], splits)
    workspace = torch.empty(need // 4 + 1, device=q.device)
    shared = inputs.shared_scores if inputs.k_distant is not None else None
    int32 = [dataclasses.replace(p, block_table=p.block_table.int()) if p else None
             for p in (inputs.k_prox, inputs.v, None if shared else inputs.k_distant)]
    lens32 = lens.int()
    return device_ms(lambda: cuda_decode.cuda_pod_decode(
        lib, q, int32[0], int32[1], lens32, out, inputs.scale, q_distant=q, k_distant=int32[2],
        sink=inputs.sink, recent=inputs.recent, num_splits=splits, workspace=workspace,
        shared_scores=shared, scores_tile=config.decode_block_n), q.device, repeats)


def cuda_library(device: torch.device, defines: list[str]):
    """csrc's decode kernel built for this GPU with `defines`, or None (no GPU, no nvcc)."""
    if device.type != "cuda" or cuda_decode.find_nvcc() is None:
        return None
    return cuda_decode.load(cuda_decode.build(Path(tempfile.mkdtemp()) / "pod_decode.so",
                                              defines=defines))


def bytes_read(batch: int, context: int, queries: int, role: str, recent: int,
               tile: int = DEFAULT_CONFIG.decode_block_n) -> int:
    """Bytes a kernel must read once: K and V of every token (bf16); a decoding
    follower reads V, its own window's keys, and the leader's shared scores (a bf16 term
    per query head and token, a float per query head and key tile) instead of the
    leader's distant keys; with estimated mass also its mean keys."""
    full = context * KV_HEADS * DIM * 2 * 2
    if role not in ("follower", "estimated") or queries > 1:
        return batch * full
    near = min(context, SINK + recent)
    mean_keys = context // SUMMARY * KV_HEADS * DIM * 2 if role == "estimated" else 0
    distant = context - near
    shared = distant * HEADS * 2 + -(-distant // tile) * HEADS * 4
    return batch * (full // 2 + near * KV_HEADS * DIM * 2 + shared + mean_keys)


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the issue's speed targets: `measure` of the rows of `case` at contexts in
    [min_context, max_context] and batches >= min_batch, at most (or at least) `limit`."""

    name: str
    case: str
    measure: str
    limit: float
    at_most: bool
    min_context: int = 0
    max_context: int = 1 << 30
    min_batch: int = 1


AT_32K = dict(min_context=32768, max_context=32768, min_batch=16)
TARGETS = [
    Target("follower decode <= 0.6x full, 32K, batch >= 16", "decode", "follower/full", 0.6,
           True, **AT_32K),
    Target("follower decode with the estimated mass <= 0.6x full, 32K, batch >= 16",
           "decode", "estimated/full", 0.6, True, **AT_32K),
    Target("full decode >= 70% of copy bandwidth, 32K, batch >= 16", "decode", "full % copy",
           70, False, **AT_32K),
    Target("follower decode >= 70% of copy bandwidth, 32K, batch >= 16", "decode",
           "follower % copy", 70, False, **AT_32K),
    Target("follower prefill <= 1.3x full", "prefill", "follower/full", 1.3, True),
    Target("follower prefill with the estimated mass <= 1.3x full", "prefill",
           "estimated/full", 1.3, True),
]


def target_table(rows: list[dict]) -> list[str]:
    """A markdown table of TARGETS against the measured rows (case, context, batch and
    each measure): the worst row of each, and whether it meets the target."""
    lines = ["| target | rows | worst | met |", "|---|---|---|---|"]
    for t in TARGETS:
        values = [r[t.measure] for r in rows if r["case"] == t.case and r["batch"] >= t.min_batch
                  and t.min_context <= r["context"] <= t.max_context]
        if not values:
            lines.append(f"| {t.name} | 0 | - | not in this run |")
            continue
        worst = max(values) if t.at_most else min(values)
        met = worst <= t.limit if t.at_most else worst >= t.limit
        shown = f"{worst:.2f}x" if "/" in t.measure else f"{worst:.0f}%"
        lines.append(f"| {t.name} | {len(values)} | {shown} | {'yes' if met else 'no'} |")
    return lines


def sdpa_ms(batch, context, queries, device, dtype, repeats) -> float:
    q = torch.randn(batch, HEADS, queries, DIM, device=device, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, context, DIM, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = None
    if queries > 1:  # causal with the queries at the end of the context
        pos = torch.arange(context, device=device)
        mask = pos[None, :] <= (context - queries + torch.arange(queries, device=device))[:, None]
    return device_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True), device, repeats)


def fits(batch: int, context: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    need = batch * context * KV_HEADS * DIM * 2 * 5  # paged K|V, V, dense K and V, bf16
    return need < 0.8 * torch.cuda.mem_get_info()[0]


# Launch shapes compared by --sweep (fields of TritonConfig; a decode shape's stages go to
# every role). 3 and 4 stages double- and triple-buffer the K and V copies
# (kernel_resources.py). Tiles of 64 and 128 positions were no faster on the H200.
SWEEP_DECODE = [dict(decode_block_n=n, decode_warps=w, decode_stages=st, programs_per_sm=p)
                for n, w, st, p in [(32, 4, 2, 32), (32, 4, 2, 16), (32, 4, 3, 32), (32, 4, 3, 16),
                                    (32, 4, 4, 32), (32, 4, 4, 16)]] + [
    dict(decode_block_n=32, decode_warps=4, decode_stages=3, programs_per_sm=32, **option)
    for option in ({"fused_merge": True}, {"whole_waves": True})]
SWEEP_PREFILL = [dict(prefill_block_m=m, prefill_block_n=n, prefill_warps=w,
                      prefill_stages=st)
                 for m, n, w, st in [(64, 32, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3)]]
SWEEP_CASES = [("decode", 32768, 16, 1), ("decode", 32768, 64, 1), ("prefill", 32768, 1, 2048)]
SWEEP_ROLES = ("full", "writing", "follower", "estimated")


# Decode fields that a follower reading shared scores takes from a config field of its
# own: the sweep times each shape with one value for every role, then picks these apart.
FOLLOWER_FIELDS = {"decode_stages": "scores_decode_stages",
                   "programs_per_sm": "scores_programs_per_sm"}


def shape_config(shape: dict) -> TritonConfig:
    """A swept shape as a config: its decode stages and programs per SM for every role."""
    shape = dict(shape, **{FOLLOWER_FIELDS[f]: shape[f] for f in FOLLOWER_FIELDS if f in shape})
    return TritonConfig(**shape)


def fastest(totals: dict[str, dict[str, float]], decode: bool) -> dict:
    """Of the shapes (JSON) and their times per role, the least time over every role.
    For prefill, one shape's. For decode, shapes that differ in decode_stages and
    programs_per_sm alone form a family: a leader (alone or writing shared scores) takes
    its fastest member's, the followers reading shared scores (estimated mass or not)
    theirs (as scores_decode_stages and scores_programs_per_sm); the family's other
    fields (the tile, fused_merge, ...) apply to every role, so it is timed as the sum."""
    shapes = {key: json.loads(key) for key in totals}
    if not decode:
        return shapes[min(totals, key=lambda key: sum(totals[key].values()))]

    def whole(key: str) -> dict:  # a shape's follower fields, defaults where it has none
        return {**{f: getattr(DEFAULT_CONFIG, f) for f in FOLLOWER_FIELDS}, **shapes[key]}

    def others(key: str) -> str:
        return json.dumps({f: v for f, v in whole(key).items() if f not in FOLLOWER_FIELDS},
                          sort_keys=True)

    def ms(key: str, roles: tuple[str, ...]) -> float:
        return sum(totals[key][role] for role in roles)

    families: dict[str, list[str]] = {}
    for key in totals:
        families.setdefault(others(key), []).append(key)
    picks = [(min(family, key=lambda k: ms(k, ("full", "writing"))),
              min(family, key=lambda k: ms(k, ("follower", "estimated"))))
             for family in families.values()]
    leader, follower = min(picks, key=lambda pick: ms(pick[0], ("full", "writing"))
                           + ms(pick[1], ("follower", "estimated")))
    return dict(shapes[leader], **{own: whole(follower)[f] for f, own in FOLLOWER_FIELDS.items()})


def sweep(cases, device: torch.device, dtype, repeats: int, recent: int,
          decode_shapes: list[dict], rounds: int) -> dict:
    """Times each launch shape (decode_shapes / SWEEP_PREFILL) on each case, in `rounds`
    interleaved rounds (the medians' median: a busy GPU's drift hits every shape alike);
    returns the fastest decode and prefill shapes' fields (`fastest`), times summed over
    the cases."""
    totals: dict[str, dict[str, dict[str, float]]] = {"decode": {}, "prefill": {}}
    for case, context, batch, queries in cases:
        leader, values, table, q, starts, lens = paged_layer(batch, context, queries, device,
                                                             dtype)
        out = torch.empty_like(q)
        scores = scores_cache(table, dtype)
        summary = summaries(batch, context, device, dtype)
        shapes = decode_shapes if case == "decode" else SWEEP_PREFILL
        times = {json.dumps(shape): {role: [] for role in SWEEP_ROLES} for shape in shapes}
        for _ in range(rounds):
            for shape in shapes:
                for role in SWEEP_ROLES:  # in this order: the follower reads what was written
                    inputs = layer_inputs(leader, values, table, q, role, recent, scores,
                                          summary)
                    times[json.dumps(shape)][role].append(
                        kernel_ms(inputs, starts, lens, out, repeats, shape_config(shape)))
        print(f"\n{case}, context {context}, batch {batch}, medians of {rounds} rounds\n\n"
              "| shape | full ms | full+share ms | follower ms | follower, estimated mass ms |"
              "\n|---|---|---|---|---|")
        for key, by_role in times.items():
            ms = {role: statistics.median(t) for role, t in by_role.items()}
            summed = totals[case].setdefault(key, dict.fromkeys(SWEEP_ROLES, 0.0))
            for role in SWEEP_ROLES:
                summed[role] += ms[role]
            print(f"| {json.loads(key)} | " + " | ".join(f"{ms[r]:.3f}" for r in SWEEP_ROLES)
                  + " |", flush=True)
        del leader, values, scores, summary
    best = {}
    for case, by_shape in totals.items():
        if by_shape:
            best.update(fastest(by_shape, case == "decode"))
    print(f"\nfastest: {best}")
    return best


def decode_step(batch: int, context: int, followers: int, device: torch.device, dtype,
                recent: int, config: TritonConfig = DEFAULT_CONFIG, estimated: bool = False):
    """A decode step through 1 + followers layers as the backend runs them, every launch
    included: each layer writes its new key and value at the token's slot, then attends;
    with followers the first layer writes the shared scores and the others read them
    (share scores; in decode steps the leader's queries are neither kept nor read);
    `estimated`: the followers also write their completed mean keys and weigh by their
    own estimated mass (the default mode).
    followers=0 repeats full layers instead: the stock step of as many layers. Returns
    the step as a function."""
    leader, values, table, q, starts, lens = paged_layer(batch, context, 1, device, dtype)
    pos = lens.long() - 1  # the new token of each request
    rows = torch.arange(batch, device=device)
    slots = (table[rows, pos // BLOCK].long() * BLOCK + pos % BLOCK).contiguous()
    new_k, new_v = (torch.randn(batch, KV_HEADS, DIM, device=device, dtype=dtype)
                    for _ in range(2))
    scores = scores_cache(table, dtype)
    out = torch.empty_like(q)
    workspace = decode_workspace(batch, HEADS, KV_HEADS, DIM, context, device, config)
    first = layer_inputs(leader, values, table, q, "writing" if followers else "full",
                         recent, scores)
    summary = summaries(batch, context, device, dtype) if estimated else None
    role = ("estimated" if estimated else "follower") if followers else "full"
    others = layer_inputs(leader, values, table, q, role, recent, scores, summary)
    others.q_distant = None  # as the backend's followers in decode steps

    def attend(inputs: LayerInputs) -> None:
        # as the backend: a follower's decode kernel writes its completed mean keys
        triton_pod_attention(inputs, starts, lens, out, 1, context, config, workspace,
                             write_summaries=inputs.summary is not None)

    later_values = values if followers else leader[..., DIM:]

    def step() -> None:
        triton_write_slots((leader[..., :DIM], slots, BLOCK, new_k),
                           (leader[..., DIM:], slots, BLOCK, new_v))
        attend(first)
        for _ in range(followers or GROUP_FOLLOWERS):
            # a follower's key window: the leader's cache stands in (layer_inputs)
            triton_write_slots((leader[..., :DIM], slots, BLOCK, new_k),
                               (later_values, slots, BLOCK, new_v))
            # with summaries: one request in SUMMARY completes a mean key (paged_layer)
            attend(others)
    return step


def graph_ms(step, device: torch.device, repeats: int) -> float | None:
    """Median ms of the step captured once in a CUDA graph and replayed (None on CPU)."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles every kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return timed_ms(graph.replay, device, repeats)


def steps(cases, device: torch.device, dtype, repeats: int, recent: int,
          config: TritonConfig = DEFAULT_CONFIG) -> None:
    """--steps: a whole decode step of a group against as many full layers, eager (the
    attention ops of vLLM's piecewise graphs) and replayed from a CUDA graph (what
    VLLM_LAYERSHARE_FULL_CUDA_GRAPHS=1 lets vLLM do)."""
    layers = 1 + GROUP_FOLLOWERS
    print(f"\ndecode step of {layers} layers, ms: full attention in each, or a leader "
          f"sharing its scores with {GROUP_FOLLOWERS} followers\n\n| context | batch "
          "| full eager | group eager | group/full eager | full graph | group graph "
          "| group/full graph | eager/graph (group) | group, estimated mass: eager (/ full) "
          "| graph (/ full) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for context, batch in cases:
        fns = [decode_step(batch, context, n, device, dtype, recent, config, estimated)
               for n, estimated in ((0, False), (GROUP_FOLLOWERS, False),
                                    (GROUP_FOLLOWERS, True))]
        eager = [timed_ms(fn, device, repeats) for fn in fns]
        graphs = [graph_ms(fn, device, repeats) for fn in fns]
        row = [f"{eager[0]:.3f}", f"{eager[1]:.3f}", f"{eager[1] / eager[0]:.2f}x"]
        if graphs[0] is None:
            row += ["-"] * 4
        else:
            row += [f"{graphs[0]:.3f}", f"{graphs[1]:.3f}", f"{graphs[1] / graphs[0]:.2f}x",
                    f"{eager[1] / graphs[1]:.2f}x"]
        row.append(f"{eager[2]:.3f} ({eager[2] / eager[0]:.2f}x)")
        row.append("-" if graphs[0] is None
                   else f"{graphs[2]:.3f} ({graphs[2] / graphs[0]:.2f}x)")
        print(f"| {context} | {batch} | " + " | ".join(row) + " |", flush=True)
        del fns
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    parser.add_argument("--sweep", metavar="JSON", nargs="?", const="-",
                        help="compare launch shapes; the fastest go to JSON (if named)")
    parser.add_argument("--shapes", metavar="JSON", help="--sweep: these decode shapes "
                        "(a JSON list of TritonConfig fields) instead of SWEEP_DECODE")
    parser.add_argument("--rounds", type=int, default=3, help="--sweep: interleaved rounds")
    parser.add_argument("--config", metavar="JSON", help="TritonConfig fields, as a JSON "
                        "object or a file (what --sweep wrote); default: the backend's "
                        "launch shapes on this GPU (vllm_layershare/attention/tuning.py)")
    parser.add_argument("--steps", action="store_true",
                        help="whole decode steps of a group, eager and in a CUDA graph")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--contexts", type=int, nargs="*", help="only these contexts")
    parser.add_argument("--batches", type=int, nargs="*", help="only these decode batches")
    parser.add_argument("--no-cuda", action="store_true",
                        help="leave out csrc's CUDA decode kernel (no nvcc build)")
    parser.add_argument("--cuda-define", nargs="*", default=[], metavar="NAME=VALUE",
                        help="build csrc's kernel with these, e.g. LAYERSHARE_MIN_BLOCKS=4")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = [c for c in (SMOKE_CASES if args.smoke else CASES)
             if (not args.contexts or c[1] in args.contexts)
             and (not args.batches or c[0] != "decode" or c[2] in args.batches)]
    repeats = 2 if args.smoke else args.repeats
    recent = 64 if args.smoke else RECENT  # the smoke contexts must have distant tokens
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    bandwidth = copy_bandwidth_gbs(device, 4 if args.smoke else 2048)
    config = config_from(args.config, device)
    print(f"{name}; copy bandwidth {bandwidth:.0f} GB/s; {HEADS} query / {KV_HEADS} KV heads, "
          f"head dim {DIM}, {dtype}, block {BLOCK}; follower: share scores, sink {SINK}, "
          f"recent {recent}; {config if not args.sweep else 'launch shapes below'}")
    if args.steps:
        steps(SMOKE_STEP_CASES if args.smoke else STEP_CASES, device, dtype, repeats, recent,
              config)
        return
    if args.sweep:
        shapes = json.loads(args.shapes) if args.shapes else SWEEP_DECODE
        best = sweep(SMOKE_CASES if args.smoke else SWEEP_CASES, device, dtype, repeats, recent,
                     shapes, 1 if args.smoke else args.rounds)
        if args.sweep != "-":
            Path(args.sweep).write_text(json.dumps(best, indent=1) + "\n")
            print(f"\nwritten to {args.sweep}: for every GPU as {tuning.ENV}={args.sweep}, or "
                  f"for this one as vllm_layershare/attention/tuned/"
                  f"{tuning.tuned_file_name(name)}")
        return
    lib = None if args.no_cuda else cuda_library(device, args.cuda_define)
    measured: list[dict] = []
    print("\n| case | context | batch | full ms | full+share ms | follower ms | follower/full "
          "| SDPA ms | full GB/s (% copy) | follower GB/s (% copy) | CUDA full ms "
          "| CUDA follower ms | follower, estimated mass: ms (/ full) | its GB/s (% copy) "
          "| estimated mass, every request completing a mean key: ms (/ full) "
          "| eager calls ms: full, follower, estimated |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, context, batch, queries in cases:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last case's blocks: the next may need them all
        if not fits(batch, context, device):
            print(f"| {case} | {context} | {batch} | (does not fit) |")
            continue
        leader, values, table, q, starts, lens = paged_layer(batch, context, queries, device,
                                                             dtype)
        out = torch.empty_like(q)
        scores = scores_cache(table, dtype)
        summary = summaries(batch, context, device, dtype)
        inputs = {role: layer_inputs(leader, values, table, q, role, recent, scores, summary)
                  for role in ("full", "writing", "follower", "estimated")}
        aligned = "-"
        if queries == 1:  # the worst step: the leader first writes the scores it reads
            every = aligned_lens(batch, context, device)
            kernel_ms(inputs["writing"], starts, every, out, 1, config, eager=True)
            aligned = kernel_ms(inputs["estimated"], starts, every, out, repeats, config)
        # in this order: the follower reads what the writing leader left
        ms = {role: kernel_ms(inputs[role], starts, lens, out, repeats, config)
              for role in inputs}
        if queries == 1:
            aligned = f"{aligned:.3f} ({aligned / ms['full']:.2f}x)"
        eager = [kernel_ms(inputs[role], starts, lens, out, repeats, config, eager=True)
                 for role in ("full", "follower", "estimated")]
        cuda = ["-", "-"]
        if lib is not None and queries == 1:
            cuda = [f"{cuda_ms(lib, inputs[role], lens, repeats, config):.3f}"
                    for role in ("full", "follower")]
        del leader, values, scores, summary, inputs
        sdpa = sdpa_ms(batch, context, queries, device, dtype, repeats)
        rates = []
        measured.append({"case": case, "context": context, "batch": batch,
                         "follower/full": ms["follower"] / ms["full"],
                         "estimated/full": ms["estimated"] / ms["full"]})
        for role in ("full", "follower", "estimated"):
            read = sum(bytes_read(1, n, queries, role, recent, config.decode_block_n)
                       for n in lens.tolist())
            gbs = read / ms[role] / 1e6
            rates.append(f"{gbs:.0f} ({100 * gbs / bandwidth:.0f}%)")
            measured[-1][f"{role} % copy"] = 100 * gbs / bandwidth
        print(f"| {case} | {context} | {batch} | {ms['full']:.3f} | {ms['writing']:.3f} | "
              f"{ms['follower']:.3f} | {ms['follower'] / ms['full']:.2f}x | {sdpa:.3f} | "
              f"{rates[0]} | {rates[1]} | {cuda[0]} | {cuda[1]} | {ms['estimated']:.3f} "
              f"({ms['estimated'] / ms['full']:.2f}x) | {rates[2]} | {aligned} | "
              + ", ".join(f"{t:.3f}" for t in eager) + " |", flush=True)
    print("\nThe issue's targets on these rows (the worst row counts)\n")
    print("\n".join(target_table(measured)))


if __name__ == "__main__":
    main()
