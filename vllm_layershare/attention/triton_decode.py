"""Rows with one query (decode): split over the context, one program per (request, KV
head, chunk of the context), each leaving partial softmax states that a second kernel
merges by log-sum-exp, so that a small batch of long sequences still fills the GPU.
The last chunk (for a follower, the one holding the window) starts first. With the
estimated mass, one program more per (request, KV head) computes it, and the merge
writes the summary block a query completes (no writer launch); with
TritonConfig.fused_merge the last split program of a (request, KV head) to finish
merges (after an atomic count), and no merge kernel is launched. Launches depend on
the batch size and a bound on the context only, and use one workspace sized from the
scheduler's limits, so that a decode step can be captured in a CUDA graph."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_layershare.attention.paged import LayerInputs
from vllm_layershare.attention.triton_config import DEFAULT_CONFIG, TritonConfig
from vllm_layershare.attention.triton_mass import _estimated_mass, _summarise_block
from vllm_layershare.attention.triton_paging import NEG_BIG, _cdiv, _index, _load_rows, _pow2
from vllm_layershare.attention.triton_scan import DISTANT, PROXIMAL, _log_sum, _merge, _scan
from vllm_layershare.attention.triton_shared import _shared_args, _shared_scan
from vllm_layershare.attention.waves import SM_REGISTERS, resident_programs, whole_wave_splits

MASS = tl.constexpr(2)  # the estimated mass's (m, l) in the decode partials, after P and D


@triton.jit
def _decode_rows(query_start_loc, seq_lens, row, kv_head,
                 GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """A decode program's rows: the GROUP query heads of kv_head for request row's one
    query (padded to BLOCK_M). -> (q_len, seq_len, token [M], head [M], ok [M], d, mask)."""
    q_begin = _index(query_start_loc, row)
    q_len = _index(query_start_loc, row + 1) - q_begin
    seq_len = _index(seq_lens, row)
    r = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + r
    row_ok = r < GROUP
    d = tl.arange(0, BLOCK_D)
    return (q_len, seq_len, r * 0 + q_begin, head, row_ok, d,
            row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _partial_index(row, split, branch, num_splits, head, NUM_HEADS: tl.constexpr,
                   BRANCHES: tl.constexpr):
    """Index of (request, split, branch, head) in decode partials [R, S, BRANCHES, H]: the
    accumulators have 2 branches (proximal, distant), their (m, l) a third, the
    follower's estimated mass over the whole context (MASS, split 0's only)."""
    return ((row * num_splits + split) * BRANCHES + branch) * NUM_HEADS + head


@triton.jit
def _store_partial(acc_ptr, ml_ptr, m_i, l_i, acc, row, split, branch, num_splits, head,
                   row_ok, d, q_mask, NUM_HEADS: tl.constexpr, D: tl.constexpr,
                   WITH_ACC: tl.constexpr):
    """One branch's (m, l) and, WITH_ACC, acc of a decode split program."""
    at = _partial_index(row, split, branch, num_splits, head, NUM_HEADS, 3)
    tl.store(ml_ptr + 2 * at, m_i, mask=row_ok)
    tl.store(ml_ptr + 2 * at + 1, l_i, mask=row_ok)
    if WITH_ACC:
        at = _partial_index(row, split, branch, num_splits, head, NUM_HEADS, 2)
        tl.store(acc_ptr + at[:, None] * D + d[None, :], acc, mask=q_mask)


@triton.jit
def _chunk_len(seq_len, num_splits, split_len, min_split_len, BLOCK_N: tl.constexpr):
    """Context positions per decode program of a request: split_len where fixed (> 0),
    else its context cut into num_splits chunks of whole tiles, >= min_split_len each."""
    length = tl.maximum(tl.cdiv(seq_len, num_splits), min_split_len)
    return tl.where(split_len > 0, split_len, tl.cdiv(length, BLOCK_N) * BLOCK_N)


@triton.jit
def _decode_split_kernel(
    acc_ptr, ml_ptr, num_splits, split_len, min_split_len,
    out_ptr, o_st, o_sh, count_ptr, gate_tau,
    q_ptr, q_st, q_sh, qd_ptr, qd_st, qd_sh,
    query_start_loc, seq_lens,
    kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs: tl.constexpr,
    v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs: tl.constexpr,
    kd_ptr, kd_sb, kd_sh, kd_ss, kd_table, kd_table_stride, kd_bs: tl.constexpr,
    scale, sink, recent,
    sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table, sc_table_stride, sc_bs: tl.constexpr,
    sc_sink, sc_recent,
    s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page: tl.constexpr, log_w_ptr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DISTANT: tl.constexpr,
    SUMMARY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WRITE_SCORES: tl.constexpr, READ_SCORES: tl.constexpr, SC_LSE: tl.constexpr,
    FIXED_SLOTS: tl.constexpr, MERGE: tl.constexpr, MERGE_SPLITS: tl.constexpr,
    GATE: tl.constexpr, WRITE_SUMMARY: tl.constexpr, SUMMARY_TILE: tl.constexpr,
):
    """Both branches of one decode query over context chunk [lo, hi): unnormalised
    (m, l, acc) per branch and head into the partials. With SUMMARY the grid has one
    program more per (request, KV head), started first: the (m, l) of the follower's
    estimated mass over the whole context (_estimated_mass), into split 0's MASS slot.
    A program of its own, as the mass's loads wait on one another (query, table,
    summaries) while no value is in flight: in every chunk's program that wait had
    added to each program's time. MERGE (TritonConfig.fused_merge): the last program of
    a (request, KV head) to finish also merges its query heads (_merge_if_last), so
    that no merge kernel is launched."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Last chunk first: a follower's holds the window, whose keys it reads too (about
    # twice a chunk's bytes); the GPU starts programs in about grid order, so the
    # longest start first instead of running alone at the end. Not yet timed.
    split = tl.num_programs(2) - 1 - tl.program_id(2)
    q_len, seq_len, tok, head, row_ok, d, q_mask = _decode_rows(
        query_start_loc, seq_lens, row, kv_head, GROUP, D, BLOCK_M, BLOCK_D)
    if HAS_DISTANT and SUMMARY > 0:
        if split == num_splits:
            if q_len == 1:
                i = seq_len - 1
                q = _load_rows(q_ptr, q_st, q_sh, tok, head, d, q_mask, UPCAST)
                m_s, l_s = _estimated_mass(
                    q, row, kv_head, i, i, head * 0 + i, 0, seq_len, sink, recent, scale,
                    log_w_ptr, head, row_ok, kp_ptr, kp_sb, kp_sh, kp_ss, kp_table,
                    kp_table_stride, kp_bs, s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride,
                    tokens_per_page, SUMMARY, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
                    FIXED_SLOTS)
                _store_partial(acc_ptr, ml_ptr, m_s, l_s, 0.0, row, 0, MASS, num_splits, head,
                               row_ok, d, q_mask, NUM_HEADS, D, False)
                if MERGE:
                    _merge_if_last(
                        count_ptr, row, kv_head, seq_len, num_splits, split_len,
                        min_split_len, query_start_loc, out_ptr, o_st, o_sh, acc_ptr, ml_ptr,
                        gate_tau, kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride,
                        kp_bs, s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride,
                        tokens_per_page, NUM_HEADS, GROUP, D, BLOCK_N, BLOCK_D, MERGE_SPLITS,
                        HAS_DISTANT, SUMMARY, GATE, WRITE_SUMMARY, SUMMARY_TILE)
            return
    length = _chunk_len(seq_len, num_splits, split_len, min_split_len, BLOCK_N)
    lo = split * length
    if q_len != 1 or lo >= seq_len:
        return
    hi = tl.minimum(lo + length, seq_len)
    i = seq_len - 1
    q_pos = head * 0 + i
    q = _load_rows(q_ptr, q_st, q_sh, tok, head, d, q_mask, UPCAST)
    m_p = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_p = tl.zeros([BLOCK_M], tl.float32)
    acc_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Proximal: sinks, then the window, each cut to the chunk.
    m_p, l_p, acc_p = _scan(m_p, l_p, acc_p, q, row, kv_head, lo, tl.minimum(hi, sink), lo,
                            hi, q_pos, sink, recent, scale, 0, q_pos,
                            kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs,
                            v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs,
                            sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table,
                            sc_table_stride, sc_bs, sc_sink, i - sc_recent + 1,
                            head - kv_head * GROUP, row_ok,
                            D, BLOCK_N, BLOCK_D, PROXIMAL, True, UPCAST, PRECISION,
                            WRITE_SCORES, GROUP, SC_LSE, FIXED_SLOTS)
    window = tl.maximum(lo, tl.maximum(sink, i - recent + 1))
    m_p, l_p, acc_p = _scan(m_p, l_p, acc_p, q, row, kv_head, window, hi, window, hi, q_pos,
                            sink, recent, scale, 0, q_pos,
                            kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs,
                            v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs,
                            sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table,
                            sc_table_stride, sc_bs, sc_sink, i - sc_recent + 1,
                            head - kv_head * GROUP, row_ok,
                            D, BLOCK_N, BLOCK_D, PROXIMAL, True, UPCAST, PRECISION,
                            WRITE_SCORES, GROUP, SC_LSE, FIXED_SLOTS)
    _store_partial(acc_ptr, ml_ptr, m_p, l_p, acc_p, row, split, 0, num_splits, head,
                   row_ok, d, q_mask, NUM_HEADS, D, True)
    if HAS_DISTANT:  # [n_s, i - n_r] cut to the chunk
        distant_end = tl.minimum(hi, i - recent + 1)
        if READ_SCORES:  # from the tile holding n_s on: the leader's tiles
            m_d, l_d, acc_d = _shared_scan(
                row, kv_head, tl.maximum(lo, sink // BLOCK_N * BLOCK_N), distant_end,
                v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs,
                sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table, sc_table_stride, sc_bs,
                head - kv_head * GROUP, row_ok, D, BLOCK_M, BLOCK_N, BLOCK_D, GROUP, SC_LSE,
                UPCAST, PRECISION)
        else:
            qd = _load_rows(qd_ptr, qd_st, qd_sh, tok, head, d, q_mask, UPCAST)
            m_d = tl.full([BLOCK_M], NEG_BIG, tl.float32)
            l_d = tl.zeros([BLOCK_M], tl.float32)
            acc_d = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            m_d, l_d, acc_d = _scan(m_d, l_d, acc_d, qd, row, kv_head, tl.maximum(lo, sink),
                                    distant_end, lo, hi, q_pos, sink, recent, scale, 0, q_pos,
                                    kd_ptr, kd_sb, kd_sh, kd_ss, kd_table, kd_table_stride,
                                    kd_bs, v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride,
                                    v_bs, sc_ptr, 0, 0, lse_ptr, 0, 0, sc_table, 0, 1, 0, 0,
                                    head, row_ok, D, BLOCK_N, BLOCK_D, DISTANT, True, UPCAST,
                                    PRECISION, False, GROUP, 0, FIXED_SLOTS)
        _store_partial(acc_ptr, ml_ptr, m_d, l_d, acc_d, row, split, 1, num_splits, head,
                       row_ok, d, q_mask, NUM_HEADS, D, True)
    if MERGE:
        _merge_if_last(count_ptr, row, kv_head, seq_len, num_splits, split_len, min_split_len,
                       query_start_loc, out_ptr, o_st, o_sh, acc_ptr, ml_ptr, gate_tau,
                       kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs,
                       s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page,
                       NUM_HEADS, GROUP, D, BLOCK_N, BLOCK_D, MERGE_SPLITS, HAS_DISTANT,
                       SUMMARY, GATE, WRITE_SUMMARY, SUMMARY_TILE)


@triton.jit
def _merge_if_last(count_ptr, row, kv_head, seq_len, num_splits, split_len, min_split_len,
                   query_start_loc, out_ptr, o_st, o_sh, acc_ptr, ml_ptr, gate_tau,
                   k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                   s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
                   HAS_DISTANT: tl.constexpr, SUMMARY: tl.constexpr, GATE: tl.constexpr,
                   WRITE_SUMMARY: tl.constexpr, SUMMARY_TILE: tl.constexpr):
    """A decode split program that has stored its partials counts itself in for its
    (request, KV head); the last of them (the chunks that reach the context, and the
    estimated mass's program) merges the GROUP query heads (_merge_head) and writes the
    summary block the query completes, as the merge kernel would, and sets the count
    back to 0 for the next launch (a CUDA graph replays this one)."""
    length = _chunk_len(seq_len, num_splits, split_len, min_split_len, BLOCK_N)
    used = tl.cdiv(seq_len, length)
    expected = used
    if HAS_DISTANT and SUMMARY > 0:
        expected += 1
    # Every thread's stores before the count: the atomic (acq_rel, GPU scope) then
    # publishes them to the program that merges, as a grid-wide barrier does.
    tl.debug_barrier()
    counter = count_ptr + row * tl.num_programs(1) + kv_head
    if tl.atomic_add(counter, 1, sem="acq_rel") == expected - 1:
        tl.store(counter, 0)
        q_begin = _index(query_start_loc, row)
        for h in range(GROUP):
            _merge_head(out_ptr, o_st, o_sh, acc_ptr, ml_ptr, num_splits, used, row,
                        kv_head * GROUP + h, q_begin, gate_tau, NUM_HEADS, D, BLOCK_D, SPLITS,
                        HAS_DISTANT, SUMMARY, GATE)
        if WRITE_SUMMARY:
            if seq_len % SUMMARY == 0:
                _summarise_block(row, kv_head, seq_len // SUMMARY - 1,
                                 k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                                 s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride,
                                 tokens_per_page, SUMMARY, SUMMARY_TILE, D, BLOCK_D)


@triton.jit
def _combine_block(m_i, l_i, acc, acc_ptr, ml_ptr, row, split, ok, branch, num_splits, head, d,
                   NUM_HEADS: tl.constexpr, D: tl.constexpr, WITH_ACC: tl.constexpr):
    """(m [1], l [1], acc [1, BLOCK_D]) of query head `head` continued over one branch's
    partials of the splits `split` [SPLITS] where ok, loaded as one tile."""
    at = _partial_index(row, split, branch, num_splits, head, NUM_HEADS, 3)
    # .cg (L2, not L1): in a fused merge, other programs of the same launch wrote them.
    m = tl.load(ml_ptr + 2 * at, mask=ok, other=NEG_BIG, cache_modifier=".cg")
    l_s = tl.load(ml_ptr + 2 * at + 1, mask=ok, other=0.0, cache_modifier=".cg")
    m_new = tl.maximum(m_i, tl.max(m, 0))
    alpha = tl.exp(m_i - m_new)
    beta = tl.exp(m - m_new)  # [SPLITS]
    l_i = l_i * alpha + tl.sum(l_s * beta, 0)
    if WITH_ACC:
        at = _partial_index(row, split, branch, num_splits, head, NUM_HEADS, 2)
        a = tl.load(acc_ptr + at[:, None] * D + d[None, :],
                    mask=ok[:, None] & (d[None, :] < D), other=0.0, cache_modifier=".cg")
        acc = acc * alpha[:, None] + tl.sum(a * beta[:, None], 0)[None, :]
    return m_new, l_i, acc


@triton.jit
def _merge_head(out_ptr, o_st, o_sh, acc_ptr, ml_ptr, num_splits, used, row, head, q_begin,
                gate_tau, NUM_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                SPLITS: tl.constexpr, HAS_DISTANT: tl.constexpr, SUMMARY: tl.constexpr,
                GATE: tl.constexpr):
    """Query head `head`'s decode output from the partials of its row's `used` splits:
    each branch (proximal, distant, the estimated mass) combined over the splits, SPLITS
    at a time, all three in one loop (their loads are independent: one memory round trip
    per step, not one per branch; a long context has hundreds of splits), then merged as
    in the prefill kernel: g o_P + (1 - g) o_D (_merge; without the gate skip that
    equals _as_prior's continuation). Rows of one element, so that _merge applies."""
    d = tl.arange(0, BLOCK_D)
    m_p = tl.full([1], NEG_BIG, tl.float32)
    l_p = tl.zeros([1], tl.float32)
    acc_p = tl.zeros([1, BLOCK_D], tl.float32)
    m_d, l_d, acc_d = m_p, l_p, acc_p
    for first in range(0, used, SPLITS):
        split = first + tl.arange(0, SPLITS)
        ok = split < used
        m_p, l_p, acc_p = _combine_block(m_p, l_p, acc_p, acc_ptr, ml_ptr, row, split, ok, 0,
                                         num_splits, head, d, NUM_HEADS, D, True)
        if HAS_DISTANT:  # every split stores it, empty or not
            m_d, l_d, acc_d = _combine_block(m_d, l_d, acc_d, acc_ptr, ml_ptr, row, split, ok,
                                             1, num_splits, head, d, NUM_HEADS, D, True)
    out = acc_p / tl.where(l_p > 0, l_p, 1.0)[:, None]
    if HAS_DISTANT:
        if SUMMARY > 0:  # the whole context's, from its own program (split 0's slot)
            at = _partial_index(row, 0, MASS, num_splits, head, NUM_HEADS, 3)
            at += tl.zeros([1], tl.int32)  # a row of one, as the states
            lse_d = _log_sum(tl.load(ml_ptr + 2 * at, cache_modifier=".cg"),
                             tl.load(ml_ptr + 2 * at + 1, cache_modifier=".cg"))
        else:
            lse_d = _log_sum(m_d, l_d)
        lse_d = tl.where(l_d > 0, lse_d, float("-inf"))  # no distant values: g = 1
        tau = 2.0  # g < 1 < tau: no gate skip
        if GATE:
            tau = gate_tau
        out = _merge(out, m_p, l_p, acc_d, l_d, lse_d, tau)
    at = out_ptr + q_begin * o_st + head * o_sh + d[None, :]
    tl.store(at, out.to(out_ptr.dtype.element_ty), mask=d[None, :] < D)


@triton.jit
def _decode_merge_kernel(
    out_ptr, o_st, o_sh, acc_ptr, ml_ptr, num_splits, split_len, min_split_len,
    query_start_loc, seq_lens, gate_tau,
    k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs: tl.constexpr,
    s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page: tl.constexpr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, HAS_DISTANT: tl.constexpr,
    SUMMARY: tl.constexpr, GATE: tl.constexpr, WRITE_SUMMARY: tl.constexpr,
    SUMMARY_TILE: tl.constexpr,
):
    """One query head's decode output from its splits' partials (_merge_head).
    WRITE_SUMMARY: the program of a KV head's first query head then writes the summary
    block that the query completes, if it does (no later read in this step: it ends in
    the window); here, not in the split kernel, where ptxas then gave a follower 26 more
    registers."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = _index(query_start_loc, row)
    if _index(query_start_loc, row + 1) - q_begin != 1:
        return
    seq_len = _index(seq_lens, row)
    length = _chunk_len(seq_len, num_splits, split_len, min_split_len, BLOCK_N)
    _merge_head(out_ptr, o_st, o_sh, acc_ptr, ml_ptr, num_splits, tl.cdiv(seq_len, length),
                row, head, q_begin, gate_tau, NUM_HEADS, D, BLOCK_D, SPLITS, HAS_DISTANT,
                SUMMARY, GATE)
    if WRITE_SUMMARY:
        if (head % GROUP == 0) & (seq_len % SUMMARY == 0):
            _summarise_block(row, head // GROUP, seq_len // SUMMARY - 1,
                             k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                             s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page,
                             SUMMARY, SUMMARY_TILE, D, BLOCK_D)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs of a GPU; 1 for the interpreter on CPU tensors."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Decode split programs per multiprocessor, per compiled variant (TritonConfig.whole_waves).
_RESIDENT: dict[tuple, int] = {}


def _note_residency(variant: tuple, compiled, device: torch.device) -> None:
    """Keep how many programs of a just-launched split kernel an SM holds (the
    interpreter returns no compiled kernel)."""
    registers = getattr(compiled, "n_regs", None)
    if registers is None or variant in _RESIDENT:
        return
    props = torch.cuda.get_device_properties(device)
    _RESIDENT[variant] = resident_programs(
        registers, compiled.metadata.num_warps, compiled.metadata.shared,
        props.shared_memory_per_multiprocessor,
        getattr(props, "regs_per_multiprocessor", SM_REGISTERS),
        props.max_threads_per_multi_processor // 32)


def _resident_programs(variant: tuple) -> int | None:
    """Programs per SM of a split-kernel variant launched before; None before that."""
    return _RESIDENT.get(variant)


def _filled_waves(splits: int, pairs: int, device: torch.device, variant: tuple | None
                  ) -> int:
    """decode_splits' `splits`, or fewer where the grid then fills its waves better
    (whole_waves: a variant, launched before); never more (the workspace is sized for
    decode_splits'). The estimated mass's programs, short and started first, are left
    out of the count."""
    resident = None if variant is None else _resident_programs(variant)
    if not resident:
        return splits
    return whole_wave_splits(splits, pairs, resident * _multiprocessors(device))


def decode_splits(num_reqs: int, kv_heads: int, max_seq_len: int, device: torch.device,
                  config: TritonConfig = DEFAULT_CONFIG, reads_scores: bool = False) -> int:
    """Decode programs per (request, KV head): enough for about programs_per_sm programs
    per multiprocessor (scores_programs_per_sm for a follower that reads_scores), no more
    than a max_seq_len context cut into min_split_len chunks can use. Each request cuts
    its own context into that many chunks (_chunk_len), so the grid depends on no
    request's actual length: with a static bound for max_seq_len (the model's limit) it
    can be captured in a CUDA graph."""
    if config.split_len is not None:
        return _cdiv(max_seq_len, config.split_len)
    per_sm = config.programs_per_sm
    if reads_scores and config.scores_programs_per_sm is not None:
        per_sm = config.scores_programs_per_sm
    programs = per_sm * _multiprocessors(device)
    wanted = _cdiv(programs, max(1, num_reqs * kv_heads))
    return max(1, min(wanted, _cdiv(max_seq_len, config.min_split_len)))


def chunk_len(seq_len: int, num_splits: int, config: TritonConfig = DEFAULT_CONFIG) -> int:
    """Context positions per decode program of a request of seq_len positions (the
    kernels' _chunk_len, for the host: tests, benchmarks)."""
    if config.split_len is not None:
        return config.split_len
    length = max(_cdiv(seq_len, num_splits), config.min_split_len)
    return _cdiv(length, config.decode_block_n) * config.decode_block_n


def decode_workspace(max_reqs: int, heads: int, kv_heads: int, head_size: int,
                     max_seq_len: int, device: torch.device,
                     config: TritonConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Scratch for the decode partials of any step within the scheduler's limits (up to
    max_reqs requests of up to max_seq_len positions), and at its end the fused merge's
    counts, one per (request, KV head), zeroed (each merge sets its count back to 0):
    allocated once, passed to every call, so a decode step allocates nothing (CUDA
    graphs need static buffers)."""
    programs = max(reqs * decode_splits(reqs, kv_heads, max_seq_len, device, config, reads)
                   for reqs in range(1, max_reqs + 1) for reads in (False, True))
    counts = max_reqs * kv_heads
    workspace = torch.empty(_partials_size(programs * heads, head_size) + counts,
                            dtype=torch.float32, device=device)
    workspace[-counts:].zero_()
    return workspace


def _partials_size(rows: int, head_size: int) -> int:
    """Floats of the partials of `rows` (request, split, query head): acc [head_size] of
    two branches, (m, l) of three (the third, the estimated mass)."""
    return rows * (2 * head_size + 3 * 2)


def _partials(workspace: torch.Tensor | None, rows: int, head_size: int, pairs: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the decode partials of `rows` (request, split, query head) in the
    workspace (or a fresh buffer without one): acc [2 rows, head_size], (m, l) [3 rows,
    2] (_partial_index); and the fused merge's counts of `pairs` (request, KV head),
    int32, from the workspace's end (decode_workspace zeroes them)."""
    need = _partials_size(rows, head_size)
    if workspace is None:
        workspace = torch.empty(need + pairs, dtype=torch.float32, device=device)
        workspace[need:].zero_()
    elif workspace.numel() < need + pairs:
        raise ValueError(f"layershare: decode workspace of {workspace.numel()} floats, this "
                         f"step needs {need + pairs}: it was sized for smaller scheduler "
                         "limits")
    accs = 2 * rows * head_size
    return (workspace[:accs].view(2 * rows, head_size),
            workspace[accs:need].view(3 * rows, 2),
            workspace[workspace.numel() - pairs:].view(torch.int32))


def _decode(inputs: LayerInputs, q, qd, starts, lens, output, max_seq_len, paged_args, s_args,
            log_w, recent, tau, summary_tokens, config: TritonConfig, common: dict,
            workspace: torch.Tensor | None, write_summaries: bool) -> None:
    """The one-query rows of the step: split kernel, then merge kernel (or none, with
    fused_merge). paged_args: the kernel arguments of k_prox, v and k_distant
    (_paged_args)."""
    kp, v, shared = inputs.k_prox, inputs.v, inputs.shared_scores
    kp_args, v_args, kd_args = paged_args
    num_reqs, heads, dim = lens.shape[0], q.shape[1], q.shape[2]
    kv_heads = kp.cache.shape[1]
    group = heads // kv_heads
    write = shared is not None and shared.write
    read = shared is not None and not shared.write and inputs.k_distant is not None
    stages = config.scores_decode_stages if read else config.decode_stages
    registers = config.scores_write_registers if write else None
    mass_program = int(summary_tokens > 0 and inputs.k_distant is not None)
    variant = None  # what the split kernel compiles to (the config is frozen), for whole_waves
    if config.whole_waves:
        variant = (q.device, write, read, inputs.k_distant is not None, mass_program, group,
                   dim, v.cache.dtype, config)
    num_splits = _filled_waves(
        decode_splits(num_reqs, kv_heads, max_seq_len, q.device, config, read),
        num_reqs * kv_heads, q.device, variant)
    chunks = (num_splits, config.split_len or 0, config.min_split_len)
    partial_acc, partial_ml, counts = _partials(workspace, num_reqs * num_splits * heads,
                                                dim, num_reqs * kv_heads, q.device)
    if shared is not None:
        sc_args, lse_first = _shared_args(shared, group, v.cache.dtype, config.decode_block_n)
    else:
        sc_args, lse_first = (output, 0, 0, output, 0, 0, kp.block_table, 0, 1, 0, 0), 0
    both = dict(NUM_HEADS=heads, BLOCK_N=config.decode_block_n, SUMMARY=summary_tokens,
                HAS_DISTANT=inputs.k_distant is not None, num_warps=config.decode_warps)
    merge = dict(GATE=tau > 0, WRITE_SUMMARY=write_summaries,
                 SUMMARY_TILE=min(config.decode_block_n, _pow2(max(summary_tokens, 1))))
    # The split kernel takes the merge's constants only where it merges: elsewhere they
    # would compile copies of one kernel.
    fused = merge if config.fused_merge else dict(GATE=False, WRITE_SUMMARY=False,
                                                  SUMMARY_TILE=1)
    # With the estimated mass, one program more per (request, KV head) computes it.
    compiled = _decode_split_kernel[(num_reqs, kv_heads, num_splits + mass_program)](
        partial_acc, partial_ml, *chunks, output, output.stride(0), output.stride(1), counts,
        tau, q, q.stride(0), q.stride(1), qd, qd.stride(0), qd.stride(1), starts, lens,
        *kp_args, *v_args, *kd_args,
        inputs.scale, inputs.sink, recent, *sc_args, *s_args, log_w,
        GROUP=group, BLOCK_M=max(16, _pow2(group)), WRITE_SCORES=write,
        READ_SCORES=read, SC_LSE=lse_first, FIXED_SLOTS=config.decode_fixed_slots,
        MERGE=config.fused_merge, MERGE_SPLITS=config.merge_splits if config.fused_merge else 1,
        num_stages=stages, maxnreg=registers, **fused, **both, **common)
    if variant is not None:
        _note_residency(variant, compiled, q.device)
    if not config.fused_merge:
        _decode_merge_kernel[(num_reqs, heads)](
            output, output.stride(0), output.stride(1), partial_acc, partial_ml, *chunks,
            starts, lens, tau, *kp_args, *s_args, GROUP=group, D=dim,
            BLOCK_D=common["BLOCK_D"], SPLITS=config.merge_splits, **merge, **both)
