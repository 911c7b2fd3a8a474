"""The online softmax of one branch over a range of a paged cache (_scan), and the merge
of the two branches (_merge, _as_prior), for the prefill and decode kernels.

A key tile that every row of the program keeps whole (in a long prefill all but a few
at the edges of the rows' causal range and window) skips the masks; the softmax runs
on exp2 with the scale folded into one multiply-add, page sizes are compile-time
constants, and where pages divide a tile a key's offset in its page is computed once
per scan (FIXED_SLOTS): a prefill tile issues about half the instructions it did
(benchmarks/kernel_resources.py, docs/benchmarks.md)."""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_layershare.attention.triton_paging import LOG2E, NEG_BIG, STALE_MAX, _page_slot, _pages
from vllm_layershare.attention.triton_shared import _share_tile

# Which keys a scan keeps (_keep).
PROXIMAL = tl.constexpr(0)
DISTANT = tl.constexpr(1)
EXACT_MASS = tl.constexpr(2)


@triton.jit
def _keep(n, q_pos, sink, recent, exact_lo, exact_hi, MODE: tl.constexpr):
    """[M, N] mask of key positions n [N] a row at q_pos [M] reads in this scan."""
    n = n[None, :]
    q_pos = q_pos[:, None]
    if MODE == PROXIMAL:
        return (n <= q_pos) & ((n < sink) | (n > q_pos - recent))  # sinks, window
    elif MODE == DISTANT:  # [n_s, i - n_r]
        return (n >= sink) & (n <= q_pos - recent)
    else:  # EXACT_MASS: distant keys outside the whole summary blocks [exact_lo, exact_hi)
        return (n >= sink) & (n <= q_pos - recent) & (
            (n < exact_lo) | (n >= exact_hi[:, None]))


@triton.jit
def _scan(m_i, l_i, acc, q, row, kv_head, lo, hi, safe_lo, safe_end, q_pos, sink, recent, scale,
          exact_lo, exact_hi,
          k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs: tl.constexpr,
          v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride, v_bs: tl.constexpr,
          sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table, sc_table_stride,
          sc_bs: tl.constexpr, sc_sink, sc_end, sc_g,
          row_ok, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          MODE: tl.constexpr, WITH_V: tl.constexpr, UPCAST: tl.constexpr,
          PRECISION: tl.constexpr, WRITE_SCORES: tl.constexpr, GROUP: tl.constexpr,
          SC_LSE: tl.constexpr, FIXED_SLOTS: tl.constexpr):
    """One online-softmax pass over key positions [lo, hi): returns (m, l, acc).

    The caller vouches that every row keeps every position in [safe_lo, safe_end): tiles
    inside skip _keep's [M, N] compares (in a long prefill, all but the few at the edges
    of the rows' causal range or window).
    WRITE_SCORES (a leader's decode rows, share `scores`; lo a multiple of BLOCK_N)
    leaves its followers the softmax terms of their distant positions [sc_sink, sc_end)
    in the shared-scores cache (_share_tile).
    The running maximum lags (STALE_MAX).
    """
    d = tl.arange(0, BLOCK_D)
    # The softmax takes exp(scale s - m) as exp2(s * unit - m * log2 e), one multiply-add
    # per element.
    unit = scale * LOG2E
    safe_end = tl.minimum(safe_end, hi)
    # Block-table entries one tile ahead: the K and V copies that Triton's pipeliner
    # issues early then wait on no load of their own iteration, and with 3 stages it
    # double-buffers them (the copy buffers of benchmarks/kernel_resources.py).
    n = lo + tl.arange(0, BLOCK_N)
    kpage_next = _pages(k_table, row, k_table_stride, _page_slot(n, k_bs)[0], n < hi)
    vpage_next = _pages(v_table, row, v_table_stride, _page_slot(n, v_bs)[0], n < hi)
    # FIXED_SLOTS: where pages divide a tile, a position's slot is the same in every
    # tile, so its offset is computed once here (ptxas hoists it out of some compiles of
    # the loop, not all), at the cost of registers that hold it through the loop.
    fixed_k = FIXED_SLOTS and BLOCK_N % k_bs == 0
    fixed_v = FIXED_SLOTS and BLOCK_N % v_bs == 0
    k_slots = k_sh * kv_head + _page_slot(n, k_bs)[1] * k_ss
    v_slots = v_sh * kv_head + _page_slot(n, v_bs)[1] * v_ss
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        in_range = n < hi
        kpage, vpage = kpage_next, vpage_next
        ahead = n + BLOCK_N
        kpage_next = _pages(k_table, row, k_table_stride, _page_slot(ahead, k_bs)[0],
                            ahead < hi)
        vpage_next = _pages(v_table, row, v_table_stride, _page_slot(ahead, v_bs)[0],
                            ahead < hi)
        if fixed_k:
            k_rows = k_ptr + kpage[:, None] * k_sb + k_slots[:, None]
        else:
            k_rows = (k_ptr + kpage[:, None] * k_sb + kv_head * k_sh
                      + _page_slot(n, k_bs)[1][:, None] * k_ss)
        k = tl.load(k_rows + d[None, :],
                    mask=in_range[:, None] & (d[None, :] < D), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if (start < safe_lo) | (start + BLOCK_N > safe_end):
            keep = _keep(n, q_pos, sink, recent, exact_lo, exact_hi, MODE) & in_range[None, :]
            s = tl.where(keep, s, float("-inf"))
        row_max = tl.max(s, 1)
        # Inline, as in _shared_step: as a function of its own, the rescale cost an sm_90
        # follower 28 registers.
        if tl.max(row_max * scale - m_i, 0) > STALE_MAX:
            m_new = tl.maximum(m_i, row_max * scale)
            alpha = tl.exp2((m_i - m_new) * LOG2E)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        if WRITE_SCORES:
            p, p_sum = _share_tile(s, row_max, m_i, unit, scale, start, hi, row, kv_head,
                                   sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table,
                                   sc_table_stride, sc_bs, sc_sink, sc_end, sc_g, row_ok,
                                   GROUP, SC_LSE, BLOCK_N)
        else:
            p = tl.exp2(s * unit - (m_i * LOG2E)[:, None])
            p_sum = tl.sum(p, 1)
        l_i += p_sum
        if WITH_V:
            if fixed_v:
                v_rows = v_ptr + vpage[:, None] * v_sb + v_slots[:, None]
            else:
                v_rows = (v_ptr + vpage[:, None] * v_sb + kv_head * v_sh
                          + _page_slot(n, v_bs)[1][:, None] * v_ss)
            v = tl.load(v_rows + d[None, :],
                        mask=in_range[:, None] & (d[None, :] < D), other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return m_i, l_i, acc


@triton.jit
def _log_sum(m, l_sum):
    """log-sum-exp of an online softmax state; -inf where it is empty."""
    return tl.where(l_sum > 0, m + tl.log(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))


@triton.jit
def _as_prior(m_d, l_d, acc_d, lse_d):
    """The distant branch as a softmax state of mass exp(lse_D) and mean o_D: continuing
    it over the proximal keys gives (sum_P e^s v + e^lse_D o_D) / (sum_P e^s + e^lse_D),
    which is g o_P + (1 - g) o_D with g = sigmoid(lse_P - lse_D), portable.merge."""
    has = (l_d > 0) & (lse_d > float("-inf"))
    out_d = acc_d / tl.where(l_d > 0, l_d, 1.0)[:, None]
    return (tl.where(has, lse_d, NEG_BIG), tl.where(has, 1.0, 0.0),
            tl.where(has[:, None], out_d, 0.0))


@triton.jit
def _merge(out_p, m_p, l_p, acc_d, l_d, lse_d, gate_tau):
    """g o_P + (1 - g) o_D with the gate skip (g = 1 where g >= tau), g = sigmoid(lse_P -
    lse_D): lse_D the distant branch's own or the follower's estimated log-mass."""
    out_d = acc_d / tl.where(l_d > 0, l_d, 1.0)[:, None]
    lse_p = m_p + tl.log(tl.where(l_p > 0, l_p, 1.0))  # > 0: P holds the query itself
    gate = 1.0 / (1.0 + tl.exp(lse_d - lse_p))
    gate = tl.where(gate >= gate_tau, 1.0, gate)
    return gate[:, None] * out_p + (1.0 - gate[:, None]) * out_d
