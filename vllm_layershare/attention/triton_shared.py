"""Share `scores`, rows with one query (decode): the distant logits of a follower are
the leader's own, and so is their softmax within a key tile. The leader's pass stores,
per query head and tile, e^(scale s_n - t) of the tile's distant positions (t their
log-sum-exp) and t (`SharedScores`, _share_tile, called from the leader's _scan); a
follower weighs each tile of its V by those terms times one factor per row, e^(t - m):
it reads no distant key, takes no exponential per key and reduces nothing across a tile
(_shared_scan), and reads its V, its key window and one bf16 per distant token and
query head: about half the bytes of a full layer (0.53-0.56x the time on an H200 at
32K-128K context and batch >= 16, 0.55-0.61x with the estimated mass:
docs/benchmarks.md). Its tiles that end inside the chunk take no mask."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_layershare.attention.paged import SharedScores
from vllm_layershare.attention.triton_paging import (
    LOG2E,
    NEG_BIG,
    STALE_MAX,
    _cdiv,
    _page_slot,
    _pages,
    _tile_pages,
)


@triton.jit
def _shared_at(start, hi, row, kv_head, sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table,
               sc_table_stride, sc_bs: tl.constexpr, sc_g, GROUP: tl.constexpr,
               SC_LSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where the key tile [start, start + BLOCK_N) (start a multiple of BLOCK_N) sits in
    the shared-scores cache (SharedScores), for query heads sc_g [M] of kv_head: its
    terms [M, BLOCK_N], position n in page table[n // bs], cell kv_head, at g * bs + n %
    bs (the values' dtype), and its log-sum-exp [M], a float32 at SC_LSE + tile *
    GROUP + g of the page of the tile's first position, tile = (start % bs) // BLOCK_N
    (tiles starting in one page differ there)."""
    page, slot = _tile_pages(sc_table, row, sc_table_stride, start, hi, sc_bs, BLOCK_N)
    if sc_bs % BLOCK_N == 0:
        first_page = page
    else:
        first_page = _pages(sc_table, row, sc_table_stride, _page_slot(start, sc_bs)[0],
                            start < hi)
    terms = sc_ptr + (page * sc_sb + kv_head * sc_sh + slot)[None, :] + sc_g[:, None] * sc_bs
    lse = (lse_ptr + first_page * lse_sb + kv_head * lse_sh + SC_LSE
           + _page_slot(start, sc_bs)[1] // BLOCK_N * GROUP + sc_g)
    return terms, lse


@triton.jit
def _share_tile(s, row_max, m_i, unit, scale, start, hi, row, kv_head,
                sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table, sc_table_stride,
                sc_bs: tl.constexpr, sc_sink, sc_end, sc_g, row_ok, GROUP: tl.constexpr,
                SC_LSE: tl.constexpr, BLOCK_N: tl.constexpr):
    """A leader's decode tile of logits s [M, BLOCK_N] (its own mask applied, row maxima
    row_max, running maximum m_i, STALE_MAX): stores for its followers the softmax of
    the tile's distant positions [sc_sink, sc_end), e^(scale s_n - lse) with lse their
    log-sum-exp (zero at the tile's other positions), and lse per row: a follower then
    weighs a tile by one factor per row and reduces nothing (_shared_scan). Returns the
    leader's own terms e^(scale s - m_i) and their row sums; in a tile of distant
    positions only (all but a few) those come from the followers' terms, no second
    exponential."""
    n = start + tl.arange(0, BLOCK_N)
    end = tl.minimum(sc_end, hi)
    if (start >= sc_sink) & (start + BLOCK_N <= end):
        terms = tl.exp2(s * unit - (row_max * unit)[:, None])
        t_max = row_max
        t_sum = tl.sum(terms, 1)
        own = tl.exp2(row_max * unit - m_i * LOG2E)
        p = terms * own[:, None]
        p_sum = t_sum * own
    else:
        distant = (n >= sc_sink) & (n < end)
        t_max = tl.max(tl.where(distant[None, :], s, float("-inf")), 1)
        t_max = tl.where(t_max > float("-inf"), t_max, 0.0)  # no -inf - -inf: no tile here
        terms = tl.where(distant[None, :], tl.exp2(s * unit - (t_max * unit)[:, None]), 0.0)
        t_sum = tl.sum(terms, 1)
        p = tl.exp2(s * unit - (m_i * LOG2E)[:, None])
        p_sum = tl.sum(p, 1)
    if (start + BLOCK_N > sc_sink) & (start < end):  # a tile its followers read
        terms_at, lse_at = _shared_at(start, hi, row, kv_head, sc_ptr, sc_sb, sc_sh, lse_ptr,
                                      lse_sb, lse_sh, sc_table, sc_table_stride, sc_bs, sc_g,
                                      GROUP, SC_LSE, BLOCK_N)
        t_sum = tl.where(t_sum > 0, t_sum, 1.0)
        stored = (terms * (1.0 / t_sum)[:, None]).to(sc_ptr.dtype.element_ty)
        if sc_bs % BLOCK_N == 0:  # past hi, still the request's page: a vector store
            tl.store(terms_at, stored, mask=row_ok[:, None])
        else:
            tl.store(terms_at, stored, mask=row_ok[:, None] & (n < hi)[None, :])
        tl.store(lse_at, t_max * scale + tl.log(t_sum), mask=row_ok)
    return p, p_sum


@triton.jit
def _shared_tile(start, hi, row, kv_head, sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh,
                 sc_table, sc_table_stride, sc_bs: tl.constexpr, sc_g, row_ok, GROUP: tl.constexpr,
                 SC_LSE: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE: tl.constexpr):
    """A follower's read of what its leader left for the key tile at start (_share_tile):
    terms [M, BLOCK_N] (zero past hi, unless WHOLE: read only if the tile ends by hi)
    and their log-sum-exp [M]."""
    terms_at, lse_at = _shared_at(start, hi, row, kv_head, sc_ptr, sc_sb, sc_sh, lse_ptr,
                                  lse_sb, lse_sh, sc_table, sc_table_stride, sc_bs, sc_g,
                                  GROUP, SC_LSE, BLOCK_N)
    n = start + tl.arange(0, BLOCK_N)
    if sc_bs % BLOCK_N == 0:  # past hi, still the request's page: a vector load
        terms = tl.load(terms_at, mask=row_ok[:, None], other=0.0).to(tl.float32)
    else:
        terms = tl.load(terms_at, mask=row_ok[:, None] & (n < hi)[None, :],
                        other=0.0).to(tl.float32)
    if not WHOLE:
        terms = tl.where((n < hi)[None, :], terms, 0.0)
    ok = row_ok & (sc_g * 0 + start < hi)  # [M]-shaped: the interpreter's masks
    return terms, tl.load(lse_at, mask=ok, other=0.0)


@triton.jit
def _shared_scan(row, kv_head, lo, hi, v_ptr, v_sb, v_sh, v_ss, v_table, v_table_stride,
                 v_bs: tl.constexpr,
                 sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table, sc_table_stride, sc_bs,
                 sc_g, row_ok, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, GROUP: tl.constexpr, SC_LSE: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """A follower's distant branch in decode, share `scores`: (m, l, acc) over tiles
    [lo, hi) (lo a multiple of BLOCK_N) of its own V, weighted by the softmax its leader
    left per tile (_share_tile). No keys, no exponential per position, no reduction
    across a tile: a tile of log-sum-exp t adds e^(t - m) to l and its terms times that
    to acc. The tiles that end by hi need no mask: a loop of those, then the last tile
    if partial (a second pipelined loop would hold 30 more registers on sm_90)."""
    d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    whole = tl.maximum(lo, hi // BLOCK_N * BLOCK_N)
    # One tile ahead: Triton pipelines only the loads that feed tl.dot (V), not these.
    terms_next, lse_next = _shared_tile(
        lo, hi, row, kv_head, sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh, sc_table,
        sc_table_stride, sc_bs, sc_g, row_ok, GROUP, SC_LSE, BLOCK_N, True)
    v_base = v_ptr + kv_head * v_sh + d[None, :]
    vpage_next, vslot_next = _tile_pages(v_table, row, v_table_stride, lo, hi, v_bs, BLOCK_N)
    for start in range(lo, whole, BLOCK_N):
        terms, lse, vpage, vslot = terms_next, lse_next, vpage_next, vslot_next
        vpage_next, vslot_next = _tile_pages(v_table, row, v_table_stride, start + BLOCK_N, hi,
                                             v_bs, BLOCK_N)
        terms_next, lse_next = _shared_tile(
            start + BLOCK_N, hi, row, kv_head, sc_ptr, sc_sb, sc_sh, lse_ptr, lse_sb, lse_sh,
            sc_table, sc_table_stride, sc_bs, sc_g, row_ok, GROUP, SC_LSE, BLOCK_N, True)
        v_rows = v_base + (vpage * v_sb + vslot * v_ss)[:, None]
        if BLOCK_D == D:
            v = tl.load(v_rows)
        else:
            v = tl.load(v_rows, mask=d[None, :] < D, other=0.0)
        m_i, l_i, acc = _shared_step(m_i, l_i, acc, terms, lse, v, UPCAST, PRECISION)
    if whole < hi:
        terms, lse = _shared_tile(whole, hi, row, kv_head, sc_ptr, sc_sb, sc_sh, lse_ptr,
                                  lse_sb, lse_sh, sc_table, sc_table_stride, sc_bs, sc_g,
                                  row_ok, GROUP, SC_LSE, BLOCK_N, False)
        vpage, vslot = _tile_pages(v_table, row, v_table_stride, whole, hi, v_bs, BLOCK_N)
        n = whole + tl.arange(0, BLOCK_N)
        v = tl.load(v_base + (vpage * v_sb + vslot * v_ss)[:, None],
                    mask=(n < hi)[:, None] & (d[None, :] < D), other=0.0)
        m_i, l_i, acc = _shared_step(m_i, l_i, acc, terms, lse, v, UPCAST, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _shared_step(m_i, l_i, acc, terms, lse, v, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(m, l, acc) continued by one tile of V [N, D] with the leader's terms [M, N] and
    their log-sum-exp lse [M]; the running maximum lags (STALE_MAX)."""
    if tl.max(lse - m_i, 0) > STALE_MAX:
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    weight = tl.exp2((lse - m_i) * LOG2E)
    if UPCAST:
        v = v.to(tl.float32)
    p = terms * weight[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return m_i, l_i + weight, acc


def _shared_args(shared: SharedScores, group: int, dtype: torch.dtype, block_n: int
                 ) -> tuple[tuple, int]:
    """The kernels' view of a shared-scores cache (_shared_at): the softmax terms in
    `dtype` (the values', for tl.dot), each tile's log-sum-exp in float32 after them; and
    the float where those begin in a cell."""
    cells, size = shared.cache, shared.block_size
    lse_first = _cdiv(group * size * dtype.itemsize, 4)
    need = lse_first + _cdiv(size, block_n) * group
    if cells.dtype != torch.float32 or cells.shape[-1] < need:
        raise ValueError(f"layershare: shared-scores cells of {cells.shape[-1]} {cells.dtype} "
                         f"for pages of {size} tokens; {need} float32 needed "
                         "(SharedScores.cell_floats)")
    terms = cells.view(dtype)
    return (terms, terms.stride(0), terms.stride(1), cells, cells.stride(0), cells.stride(1),
            shared.block_table, shared.block_table.stride(0), size, shared.sink,
            shared.recent), lse_first
