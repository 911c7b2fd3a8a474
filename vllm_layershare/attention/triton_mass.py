"""`distant_mass: estimated` in Triton: a follower's distant branch weighs by its own
log-mass, estimated from one mean key per SUMMARY tokens (their summary blocks) and the
exact keys of the distant positions still in its key cache (mass.py has the math); and
the writes of the mean keys a step completes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_layershare.attention.paged import PagedPart, SummaryPart
from vllm_layershare.attention.triton_paging import (
    LOG2E,
    NEG_BIG,
    _index,
    _page_slot,
    _paged_args,
    _pages,
    _pow2,
)
from vllm_layershare.attention.triton_scan import EXACT_MASS, _scan


@triton.jit
def _summary_scan(m_i, l_i, q, row, kv_head, low, high_last, high, scale, log_w,
                  s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page,
                  SUMMARY: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Log-sum-exp over the mean keys of summary blocks [low, high) of each row; a block
    weighs log_w of the row's query head (log S + its offset)."""
    d = tl.arange(0, BLOCK_D)
    b = low + tl.arange(0, BLOCK_N)  # table entries a tile ahead, as in _scan
    page_next = _pages(s_table, row, s_table_stride, b * SUMMARY // tokens_per_page,
                       b < high_last)
    for start in range(low, high_last, BLOCK_N):
        b = start + tl.arange(0, BLOCK_N)
        in_range = b < high_last
        page = page_next
        ahead = b + BLOCK_N
        page_next = _pages(s_table, row, s_table_stride, ahead * SUMMARY // tokens_per_page,
                           ahead < high_last)
        state = (b * SUMMARY % tokens_per_page) // SUMMARY
        kbar = tl.load(s_ptr + page[:, None] * s_sb + kv_head * s_sh + state[:, None] * s_ss
                       + d[None, :], mask=in_range[:, None] & (d[None, :] < D), other=0.0)
        if UPCAST:
            kbar = kbar.to(tl.float32)
        s = tl.dot(q, tl.trans(kbar), input_precision=PRECISION) * scale + log_w[:, None]
        s = tl.where(in_range[None, :] & (b[None, :] < high[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = (l_i * tl.exp2((m_i - m_new) * LOG2E)
               + tl.sum(tl.exp2((s - m_new[:, None]) * LOG2E), 1))
        m_i = m_new
    return m_i, l_i


@triton.jit
def _summary_blocks(sink, recent, q_pos, SUMMARY: tl.constexpr):
    """(low, high [M]): a row's whole distant summary blocks are [low, high)."""
    low = (sink + SUMMARY - 1) // SUMMARY  # first block wholly after the sinks
    return low, tl.maximum((q_pos - recent + 1) // SUMMARY, low)


@triton.jit
def _estimated_mass(q, row, kv_head, first, last, q_pos, lo, hi, sink, recent, scale,
                    log_w_ptr, head, row_ok,
                    k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                    s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride, tokens_per_page,
                    SUMMARY: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, FIXED_SLOTS: tl.constexpr):
    """Softmax state (m, l) of mass.py's estimate M of rows at q_pos in [first, last],
    over context [lo, hi) (decode: the whole context): the mean keys of the whole distant
    summary blocks that start there, a block weighing log_w (log S + the calibrated
    offset) of the row's query head, and the exact keys of its other distant positions
    (next to the sinks and to the window, still in the key cache)."""
    log_w = tl.load(log_w_ptr + head, mask=row_ok, other=0.0)
    low, high = _summary_blocks(sink, recent, q_pos, SUMMARY)
    high_first = tl.maximum((first - recent + 1) // SUMMARY, low)
    high_last = tl.maximum((last - recent + 1) // SUMMARY, low)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i, l_i = _summary_scan(m_i, l_i, q, row, kv_head, tl.maximum(low, tl.cdiv(lo, SUMMARY)),
                             tl.minimum(high_last, tl.cdiv(hi, SUMMARY)), high, scale,
                             log_w, s_ptr, s_sb, s_sh, s_ss, s_table,
                             s_table_stride, tokens_per_page, SUMMARY, D, BLOCK_N, BLOCK_D,
                             UPCAST, PRECISION)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # unused: the scans below keep no values
    exact_hi = high * SUMMARY
    # Exact keys next to the sinks, then next to the window (still in the key cache).
    distant_end = tl.minimum(last - recent + 1, hi)
    m_i, l_i, acc = _scan(m_i, l_i, acc, q, row, kv_head, tl.maximum(sink, lo),
                          tl.minimum(low * SUMMARY, distant_end), lo, lo, q_pos, sink,
                          recent, scale, low * SUMMARY, exact_hi,
                          k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                          k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                          k_ptr, 0, 0, k_ptr, 0, 0, k_table, 0, 1, 0, 0, q_pos, q_pos >= 0,
                          D, BLOCK_N, BLOCK_D, EXACT_MASS, False, UPCAST, PRECISION,
                          False, 1, 0, FIXED_SLOTS)
    m_i, l_i, acc = _scan(m_i, l_i, acc, q, row, kv_head,
                          tl.maximum(high_first * SUMMARY, lo), distant_end, lo, lo,
                          q_pos, sink, recent, scale, low * SUMMARY, exact_hi,
                          k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                          k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs,
                          k_ptr, 0, 0, k_ptr, 0, 0, k_table, 0, 1, 0, 0, q_pos, q_pos >= 0,
                          D, BLOCK_N, BLOCK_D, EXACT_MASS, False, UPCAST, PRECISION,
                          False, 1, 0, FIXED_SLOTS)
    return m_i, l_i


@triton.jit
def _summarise_block(row, kv_head, block,
                     k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs: tl.constexpr,
                     s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride,
                     tokens_per_page: tl.constexpr, SUMMARY: tl.constexpr, TILE: tl.constexpr,
                     D: tl.constexpr, BLOCK_D: tl.constexpr):
    """kbar[block] of request `row`, KV head `kv_head`: the mean of the block's SUMMARY
    keys, summed TILE keys at a time, into its state of the summary cache."""
    j = tl.arange(0, TILE)
    d = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_D], tl.float32)
    for t in range(0, SUMMARY, TILE):
        n = block * SUMMARY + t + j
        in_block = t + j < SUMMARY
        index, slot = _page_slot(n, k_bs)
        page = _pages(k_table, row, k_table_stride, index, in_block)
        k = tl.load(k_ptr + page[:, None] * k_sb + kv_head * k_sh + slot[:, None] * k_ss
                    + d[None, :], mask=in_block[:, None] & (d[None, :] < D), other=0.0)
        total += tl.sum(k.to(tl.float32), 0)
    start = block * SUMMARY
    s_page = tl.load(s_table + row * s_table_stride + start // tokens_per_page).to(tl.int64)
    state = (start % tokens_per_page) // SUMMARY
    tl.store(s_ptr + s_page * s_sb + kv_head * s_sh + state * s_ss + d,
             (total / SUMMARY).to(s_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _write_summaries_kernel(query_start_loc, seq_lens,
                            k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride, k_bs: tl.constexpr,
                            s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride,
                            tokens_per_page: tl.constexpr,
                            SUMMARY: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """kbar[b] of request `row`, KV head `kv_head`, for every summary block b whose last
    token this step wrote: b in [first // S, seq_len // S), first = seq_len - q_len."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = _index(seq_lens, row)
    first = seq_len - (_index(query_start_loc, row + 1) - _index(query_start_loc, row))
    for b in range(first // SUMMARY, seq_len // SUMMARY):
        _summarise_block(row, kv_head, b, k_ptr, k_sb, k_sh, k_ss, k_table, k_table_stride,
                         k_bs, s_ptr, s_sb, s_sh, s_ss, s_table, s_table_stride,
                         tokens_per_page, SUMMARY, BLOCK_S, D, BLOCK_D)


def triton_write_summaries(keys: PagedPart, summary: SummaryPart,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """mass.write_summaries on the device: the blocks to summarise are found from the
    step's lengths by each program, so there is no host-side list and no branch on it
    (a CUDA graph replays it as captured); padding rows (no query) write nothing."""
    if seq_lens.shape[0] == 0:
        return
    view = keys.cache[..., keys.lo : keys.hi]
    kv_heads, dim = view.shape[1], view.shape[-1]
    size = summary.summary_tokens
    _write_summaries_kernel[(seq_lens.shape[0], kv_heads)](
        query_start_loc, seq_lens, *_paged_args(keys),
        summary.cache, *summary.cache.stride()[:3], summary.block_table,
        summary.block_table.stride(0), summary.tokens_per_page,
        SUMMARY=size, BLOCK_S=_pow2(size), D=dim,
        BLOCK_D=max(16, _pow2(dim)))
