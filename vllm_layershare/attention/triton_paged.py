"""Paged PoD attention in Triton (the CUDA platform), same contract as portable.py:
triton_pod_attention is the one call the backend makes per layer and step.

Rows with several queries (prefill, chunked prefill) go to the prefill kernel, rows
with one query (decode) to the decode kernels, split over the context. Either way a
tile packs every query head of a KV head into its rows, so each key and value loaded
from the paged cache serves the whole GQA group. Per row it runs two online softmaxes:

    distant   (m_D, l_D, acc_D)  over [n_s, i - n_r],  q_distant . k_distant, own V
    proximal  (m_P, l_P, acc_P)  over sinks U window, q . k_prox, own V

merged as portable.merge does: o = g o_P + (1 - g) o_D, g = sigmoid(lse_P - lse_D);
with `distant_mass: estimated` lse_D is the follower's own log-mass over its block
summaries and exact keys (mass.py). That merge equals one softmax whose first "key"
is the distant branch, of mass exp(lse_D) and value o_D (_as_prior): so the distant
scan runs first and the proximal scan continues its state, one [M, D] accumulator
live at a time, as in a full layer; only the optional gate skip (g = 1 where g >=
tau) keeps the branches apart. No score matrix is materialised; freed key blocks are
never read.

One idea a module:

    triton_config   the launch shapes (TritonConfig)
    triton_paging   block tables, page slots, query rows; the launches' host helpers
    triton_scan     one branch's online softmax over a paged range; the branch merge
    triton_shared   share `scores` in decode: the leader's tile terms, the follower's scan
    triton_mass     `distant_mass: estimated`: the follower's own mass, its mean keys
    triton_prefill  rows of several queries
    triton_decode   rows of one query: split over the context, then merged
    triton_writes   new keys and values into the caches

On a machine without a GPU the same kernels run under TRITON_INTERPRET=1 on CPU
tensors (the tests do); the interpreter keeps bf16 as raw integers, so loads are
converted to float32 there (UPCAST).
"""

from __future__ import annotations

import itertools

import torch

from vllm_layershare.attention.paged import LayerInputs
from vllm_layershare.attention.triton_config import DEFAULT_CONFIG, TritonConfig
from vllm_layershare.attention.triton_decode import (
    _decode,
    chunk_len,
    decode_splits,
    decode_workspace,
)
from vllm_layershare.attention.triton_mass import triton_write_summaries
from vllm_layershare.attention.triton_paging import _as, _cdiv, _on, _paged_args, _pow2, interpreted
from vllm_layershare.attention.triton_prefill import _prefill_kernel, _prefill_mass_kernel
from vllm_layershare.attention.triton_writes import triton_write_slots

# The kernels' public calls and settings, for the backend, the benchmarks and the tests.
__all__ = ["DEFAULT_CONFIG", "UNBOUNDED_RECENT", "TritonConfig", "chunk_len", "decode_splits",
           "decode_workspace", "interpreted", "triton_pod_attention", "triton_write_slots",
           "triton_write_summaries"]

# A leader's window for the kernels: past any context, small enough that the kernels'
# position arithmetic stays in int32 (UNBOUNDED would make it int64, element-wise).
UNBOUNDED_RECENT = 1 << 30


def triton_pod_attention(
    inputs: LayerInputs,
    query_start_loc: list[int] | torch.Tensor,
    seq_lens: list[int] | torch.Tensor,
    output: torch.Tensor,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    config: TritonConfig = DEFAULT_CONFIG,
    workspace: torch.Tensor | None = None,
    decode_rows: bool | None = None,
    write_summaries: bool = False,
) -> None:
    """Write attention of every scheduled token into `output` [T, H, Dv].

    The backend passes the step's device tensors and vLLM's host maxima, so a layer
    neither copies metadata to the GPU nor waits for it; lists work too (tests).
    max_seq_len may be any bound on the context lengths: decode launches depend on it
    and on the batch size only. `workspace` (decode_workspace) holds the decode partials.
    decode_rows: whether some request has exactly one query (None: seen in the lists,
    assumed with tensors); without, the decode kernels are not launched.
    write_summaries (a follower with the estimated mass, a step of one-query rows): the
    decode merge kernel also writes the summary blocks the step completes, so that the
    step needs no triton_write_summaries launch; a step with longer rows needs that
    writer before the call.
    """
    if decode_rows is None:
        decode_rows = isinstance(query_start_loc, torch.Tensor) or any(
            b - a == 1 for a, b in itertools.pairwise(query_start_loc))
    q, kp, v, kd, summary = inputs.q, inputs.k_prox, inputs.v, inputs.k_distant, inputs.summary
    device = q.device
    starts, lens = _on(query_start_loc, device), _on(seq_lens, device)
    num_reqs = lens.shape[0]
    if num_reqs == 0:
        return
    if max_query_len is None:
        max_query_len = int((starts[1:] - starts[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(lens.max())
    if max_query_len == 0:
        return
    if write_summaries and (summary is None or kd is None or max_query_len > 1):
        raise ValueError("write_summaries: the decode kernel writes the summaries of a "
                         "follower with the estimated mass in steps of one-query rows only")
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = kp.cache.shape[1]
    group = heads // kv_heads
    if v.hi - v.lo != dim or kp.hi - kp.lo != dim:
        raise ValueError("layershare's Triton kernels need equal query, key and value sizes")
    distant = kd is not None
    estimated = distant and summary is not None
    qd = inputs.q_distant if distant else q
    if qd is None:  # share `scores`, decode: the shared scores replace q_distant . k_distant
        if max_query_len > 1 or inputs.shared_scores is None or inputs.shared_scores.write:
            raise ValueError("layershare: a follower without its leader's queries needs the "
                             "leader's shared scores, in steps of one-query rows only")
        qd = q  # passed, never read (READ_SCORES)
    q, qd = _as(q, kp.cache.dtype), _as(qd, kp.cache.dtype)  # tl.dot takes one input type
    kp_args, v_args = _paged_args(kp), _paged_args(v)  # once: every launch below takes them
    kd_args = _paged_args(kd) if distant else kp_args
    if estimated:
        s_args = (summary.cache, *summary.cache.stride()[:3], summary.block_table,
                  summary.block_table.stride(0), summary.tokens_per_page)
        log_w = _as(_on(summary.log_weight, device), torch.float32)
    else:
        s_args = (kp.cache, 0, 0, 0, kp.block_table, 0, 1)
        log_w = output
    recent = min(inputs.recent, UNBOUNDED_RECENT)
    tau = -1.0 if inputs.gate_skip_threshold is None else inputs.gate_skip_threshold
    common = dict(D=dim, BLOCK_D=max(16, _pow2(dim)), UPCAST=interpreted(),
                  # fp32 caches (tests, fp32 models) get exact fp32 products, not TF32.
                  PRECISION="ieee" if kp.cache.dtype == torch.float32 else "tf32")
    summary_tokens = summary.summary_tokens if estimated else 0
    if max_query_len > 1:
        block_m = max(config.prefill_block_m, _pow2(group))
        grid = (num_reqs, _cdiv(max_query_len, block_m // group), kv_heads)
        shape = dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=config.prefill_block_n,
                     num_warps=config.prefill_warps, num_stages=config.prefill_stages,
                     **common)
        mass = output  # unread without the estimated mass
        if estimated:  # prefill is never in a CUDA graph (get_cudagraph_support)
            mass = torch.empty(q.shape[:2], dtype=torch.float32, device=device)
            _prefill_mass_kernel[grid](
                mass, mass.stride(0), q, q.stride(0), q.stride(1), starts, lens,
                *kp_args, *s_args, inputs.scale, inputs.sink, recent, log_w,
                SUMMARY=summary_tokens, **shape)
        _prefill_kernel[grid](
            output, output.stride(0), output.stride(1),
            q, q.stride(0), q.stride(1), qd, qd.stride(0), qd.stride(1), starts, lens,
            *kp_args, *v_args, *kd_args,
            inputs.scale, inputs.sink, recent, tau, mass, mass.stride(0),
            HAS_DISTANT=distant, ESTIMATED=estimated, GATE=tau > 0, **shape)
    if decode_rows:
        _decode(inputs, q, qd, starts, lens, output, max_seq_len, (kp_args, v_args, kd_args),
                s_args, log_w, recent, tau, summary_tokens, config, common, workspace,
                write_summaries)
