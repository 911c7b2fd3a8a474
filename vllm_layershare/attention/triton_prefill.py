"""Rows with several queries (prefill, chunked prefill): one program per (request, tile
of query tokens, KV head), the tiles of the last query rows (the longest) first; a
follower with the estimated mass runs a small kernel before it that leaves each row's
log-mass (_prefill_mass_kernel)."""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_layershare.attention.triton_mass import _estimated_mass
from vllm_layershare.attention.triton_paging import NEG_BIG, _index, _load_rows
from vllm_layershare.attention.triton_scan import (
    DISTANT,
    PROXIMAL,
    _as_prior,
    _log_sum,
    _merge,
    _scan,
)


@triton.jit
def _prefill_rows(query_start_loc, seq_lens, row, kv_head, GROUP: tl.constexpr,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A prefill program's rows: the GROUP query heads of kv_head for BLOCK_M // GROUP
    query tokens of request row from its tile-th on. -> (active: whether the request has
    several queries and the tile some of them, first and last query position, q_pos [M],
    token [M], head [M], ok [M], d, mask)."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    # Last tile first: a later tile reads more keys, and the GPU starts programs in about
    # grid order, so the longest start first and the short ones fill the end.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    q_begin = _index(query_start_loc, row)
    q_len = _index(query_start_loc, row + 1) - q_begin
    seq_len = _index(seq_lens, row)
    first = seq_len - q_len + tile * TOKENS  # position of the tile's first query
    last = tl.minimum(first + TOKENS, seq_len) - 1
    r = tl.arange(0, BLOCK_M)
    t = tile * TOKENS + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = (r < TOKENS * GROUP) & (t < q_len)
    d = tl.arange(0, BLOCK_D)
    return ((q_len > 1) & (tile * TOKENS < q_len), first, last,
            tl.minimum(seq_len - q_len + t, last), q_begin + t, head, row_ok, d,
            row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _prefill_mass_kernel(
    mass_ptr, m_st,
    q_ptr, q_st, q_sh, query_start_loc, seq_lens,
    kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs: tl.constexpr,
    s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page: tl.constexpr,
    scale, sink, recent, log_w_ptr,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SUMMARY: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """log M, the follower's estimated distant mass (_estimated_mass), of the prefill
    rows that have distant positions, into mass [T, H]: the prefill kernel's weight of
    its distant branch. A kernel of its own: inside the prefill kernel these scans made
    ptxas spend 7% more instructions per key tile on its distant scan (sm_90, Triton
    3.6), the loop that takes most of a long prefill's time."""
    row = tl.program_id(0)
    kv_head = tl.program_id(2)
    active, first, last, q_pos, tok, head, row_ok, d, q_mask = _prefill_rows(
        query_start_loc, seq_lens, row, kv_head, GROUP, D, BLOCK_M, BLOCK_D)
    if not active or last - recent + 1 <= sink:  # no distant position: the mass is unread
        return
    q = _load_rows(q_ptr, q_st, q_sh, tok, head, d, q_mask, UPCAST)
    lse = _log_sum(*_estimated_mass(
        q, row, kv_head, first, last, q_pos, 0, last + 1, sink, recent, scale, log_w_ptr,
        head, row_ok, kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs,
        s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page,
        SUMMARY, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION, True))
    tl.store(mass_ptr + tok * m_st + head, lse, mask=row_ok)


@triton.jit
def _prefill_kernel(
    out_ptr, o_st, o_sh,
    q_ptr, q_st, q_sh, qd_ptr, qd_st, qd_sh,
    query_start_loc, seq_lens,
    kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs: tl.constexpr,
    v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs: tl.constexpr,
    kd_ptr, kd_sb, kd_sh, kd_ss, kd_table, kd_table_stride, kd_bs: tl.constexpr,
    scale, sink, recent, gate_tau, mass_ptr, m_st,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_DISTANT: tl.constexpr, ESTIMATED: tl.constexpr,
    GATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows of several queries; one-query rows are left to the decode kernels. ESTIMATED:
    the distant branch weighs log M from mass [T, H] (_prefill_mass_kernel), not its
    own log-sum-exp."""
    row = tl.program_id(0)
    kv_head = tl.program_id(2)
    active, first, last, q_pos, tok, head, row_ok, d, q_mask = _prefill_rows(
        query_start_loc, seq_lens, row, kv_head, GROUP, D, BLOCK_M, BLOCK_D)
    if not active:
        return
    # The distant branch first, while only its query is live. Without the gate skip its
    # result becomes the prior of the proximal scan (_as_prior), so, as in a full layer,
    # one [M, D] accumulator lives at a time; the gate skip keeps both branches apart.
    m_d = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_d = tl.zeros([BLOCK_M], tl.float32)
    acc_d = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lse_d = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_DISTANT:
        distant_end = last - recent + 1  # distant positions of the tile: [n_s, distant_end)
        if distant_end > sink:
            if ESTIMATED:
                lse_d = tl.load(mass_ptr + tok * m_st + head, mask=row_ok,
                                other=float("-inf"))
            qd = _load_rows(qd_ptr, qd_st, qd_sh, tok, head, d, q_mask, UPCAST)
            m_d, l_d, acc_d = _scan(m_d, l_d, acc_d, qd, row, kv_head, sink, distant_end,
                                    sink, first - recent + 1, q_pos, sink, recent, scale, 0, q_pos,
                                    kd_ptr, kd_sb, kd_sh, kd_ss, kd_table, kd_table_stride,
                                    kd_bs, v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride,
                                    v_bs, out_ptr, 0, 0, out_ptr, 0, 0, kp_table, 0, 1, 0, 0,
                                    head, row_ok, D, BLOCK_N, BLOCK_D, DISTANT, True, UPCAST,
                                    PRECISION, False, GROUP, 0, True)
            if not ESTIMATED:
                lse_d = _log_sum(m_d, l_d)
            if not GATE:
                m_i, l_i, acc = _as_prior(m_d, l_d, acc_d, lse_d)

    # Proximal branch: sinks [0, min(n_s, last + 1)), then the window [w0, last].
    q = _load_rows(q_ptr, q_st, q_sh, tok, head, d, q_mask, UPCAST)
    sink_end = tl.minimum(sink, last + 1)
    window = tl.maximum(sink_end, first - recent + 1)
    m_i, l_i, acc = _scan(m_i, l_i, acc, q, row, kv_head, 0, sink_end, 0, first + 1, q_pos,
                          sink, recent, scale, 0, q_pos,
                          kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs,
                          v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs,
                          out_ptr, 0, 0, out_ptr, 0, 0, kp_table, 0, 1, 0, 0, head, row_ok,
                          D, BLOCK_N, BLOCK_D, PROXIMAL, True, UPCAST, PRECISION,
                          False, GROUP, 0, True)
    m_i, l_i, acc = _scan(m_i, l_i, acc, q, row, kv_head, window, last + 1,
                          last - recent + 1, first + 1, q_pos, sink, recent, scale, 0, q_pos,
                          kp_ptr, kp_sb, kp_sh, kp_ss, kp_table, kp_table_stride, kp_bs,
                          v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs,
                          out_ptr, 0, 0, out_ptr, 0, 0, kp_table, 0, 1, 0, 0, head, row_ok,
                          D, BLOCK_N, BLOCK_D, PROXIMAL, True, UPCAST, PRECISION,
                          False, GROUP, 0, True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if GATE:  # here (m_i, l_i, acc) is the proximal branch alone
        out = _merge(out, m_i, l_i, acc_d, l_d, lse_d, gate_tau)

    tl.store(out_ptr + tok[:, None] * o_st + head[:, None] * o_sh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)
