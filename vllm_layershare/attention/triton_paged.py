"""Paged PoD attention in Triton (the CUDA platform), same contract as portable.py.

Two kernels. Rows with several queries (prefill, chunked prefill): one program per
(request, tile of query tokens, KV head); a follower with the estimated mass runs a
small kernel before it that leaves each row's log-mass (_prefill_mass_kernel). Rows
with one query (decode): split over the context, one program per (request, KV head,
chunk of the context), each leaving partial softmax states that a second kernel
merges by log-sum-exp, so that a small batch of long sequences still fills the GPU.
Either way a tile packs every query head of a KV head into its rows, so each key and
value loaded from the paged cache serves the whole GQA group. Per row it runs two
online softmaxes:

    distant   (m_D, l_D, acc_D)  over [n_s, i - n_r],  q_distant . k_distant, own V
    proximal  (m_P, l_P, acc_P)  over sinks U window, q . k_prox, own V

merged as portable.merge does: o = g o_P + (1 - g) o_D, g = sigmoid(lse_P - lse_D);
with `distant_mass: estimated` lse_D is the follower's own log-mass over its block
summaries and exact keys (mass.py). That merge equals one softmax whose first "key"
is the distant branch, of mass exp(lse_D) and value o_D (_as_prior): so the distant
scan runs first and the proximal scan continues its state, one [M, D] accumulator
live at a time, as in a full layer; only the optional gate skip (g = 1 where g >=
tau) keeps the branches apart. No score matrix is materialised; freed key blocks are
never read. In decode that mass takes one program more per (request, KV head), and
the merge writes the summary block a query completes (no writer launch); with
TritonConfig.fused_merge the last split program of a (request, KV head) to finish
merges (after an atomic count), and no merge kernel is launched.
A key tile that every row of the program keeps whole (in a long prefill all but a few
at the edges of the rows' causal range and window) skips the masks; the softmax runs
on exp2 with the scale folded into one multiply-add, page sizes are compile-time
constants, and where pages divide a tile a key's offset in its page is computed once
per scan (FIXED_SLOTS): a prefill tile issues about half the instructions it did
(benchmarks/kernel_resources.py, docs/benchmarks.md). Prefill and decode programs
start with the longest (the last query tile, the last context chunk).

Share `scores`, rows with one query (decode): the distant logits of a follower are
the leader's own, and so is their softmax within a key tile. The leader's pass stores,
per query head and tile, e^(scale s_n - t) of the tile's distant positions (t their
log-sum-exp) and t (`SharedScores`, _share_tile); a follower weighs each tile of its V
by those terms times one factor per row, e^(t - m): it reads no distant key, takes no
exponential per key and reduces nothing across a tile (_shared_scan), and reads its V,
its key window and one bf16 per distant token and query head: about half the bytes
of a full layer (0.54-0.63x the time on an H200 at 32K-128K context and batch >= 16,
0.55-0.69x with the estimated mass: docs/benchmarks.md). Its tiles that end inside
the chunk take no mask.

On a machine without a GPU the same kernels run under TRITON_INTERPRET=1 on CPU
tensors (the tests do); the interpreter keeps bf16 as raw integers, so loads are
converted to float32 there (UPCAST).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_layershare.attention.paged import LayerInputs, PagedPart, SharedScores, SummaryPart
from vllm_layershare.attention.waves import SM_REGISTERS, resident_programs, whole_wave_splits

LOG2E = tl.constexpr(1.4426950408889634)
NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: exp(-inf - NEG_BIG) = 0
# A running softmax maximum m moves only when some row's tile peak passes it by more than
# this (nats): acc and l share m, so the result is the same, a term e^(x - m) stays <=
# e^8, and most tiles skip rescaling acc (M x D floats): on sm_90, 10% of the instructions
# of a follower's shared-scores decode tile, 5% of a leader's decode tile, 11% of a
# prefill tile (benchmarks/kernel_resources.py).
STALE_MAX = tl.constexpr(8.0)
# Which keys a scan keeps (_keep).
PROXIMAL = tl.constexpr(0)
DISTANT = tl.constexpr(1)
EXACT_MASS = tl.constexpr(2)
MASS = tl.constexpr(2)  # the estimated mass's (m, l) in the decode partials, after P and D


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
def _pages(table, row, table_stride, index, mask):
    """Block-table entries `index` of request `row`, widened to int64: vLLM's tables are
    int32, and page * page stride passes 2**31 in a large cache."""
    return tl.load(table + row * table_stride + index, mask=mask, other=0).to(tl.int64)


@triton.jit
def _index(ptr, i):
    """Entry i of a step's metadata (query starts, lengths) as int32, as vLLM passes them:
    an int64 list from a caller would otherwise make loop counters change type."""
    return tl.load(ptr + i).to(tl.int32)


@triton.jit
def _tile_pages(table, row, table_stride, start, hi, bs: tl.constexpr, BLOCK_N: tl.constexpr):
    """(page [N] or one page, slot [N]) of the positions of the key tile [start, start +
    BLOCK_N) with start a multiple of BLOCK_N, in pages of bs positions: pages and tiles
    nest (powers of two), so a slot is the tile's own offset or a constant pattern, which
    the compiler sees as contiguous (vector loads) or hoists out of the scan."""
    if bs % BLOCK_N == 0:  # the tile in one page
        index, offset = _page_slot(start, bs)
        page = _pages(table, row, table_stride, index, start < hi)
        slot = tl.multiple_of(offset, BLOCK_N) + tl.arange(0, BLOCK_N)
    elif BLOCK_N % bs == 0:  # whole pages in the tile
        r = tl.arange(0, BLOCK_N)
        first, _ = _page_slot(start, bs)
        page = _pages(table, row, table_stride, first + r // bs, start + r < hi)
        slot = r % bs
    else:
        n = start + tl.arange(0, BLOCK_N)
        index, slot = _page_slot(n, bs)
        page = _pages(table, row, table_stride, index, n < hi)
    return page, slot


@triton.jit
def _page_slot(n, bs):
    """(page index, slot) of positions n >= 0 in pages of bs positions (a constexpr):
    unsigned, so that a power of two divides by a shift, not a signed division."""
    u = tl.cast(n, tl.int32).to(tl.uint32, bitcast=True)  # n may be a loop's int
    return (u // bs).to(tl.int32, bitcast=True), (u % bs).to(tl.int32, bitcast=True)


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
def _load_rows(ptr, stride_token, stride_head, tok, head, d, mask, UPCAST: tl.constexpr):
    """The query vectors of a tile's rows (token tok[m], head head[m]) -> [M, BLOCK_D]."""
    rows = tl.load(ptr + tok[:, None] * stride_token + head[:, None] * stride_head + d[None, :],
                   mask=mask, other=0.0)
    return rows.to(tl.float32) if UPCAST else rows


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


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: triton.cdiv is a constexpr function, microseconds a call."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The least power of two >= n, on the host (as triton.next_power_of_2)."""
    return 1 << max(0, n - 1).bit_length()


def _on(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """values as a tensor on `device`; a tensor already there as it is (no call: this
    runs per layer and step, and an eager decode step waits on the host)."""
    if isinstance(values, torch.Tensor) and values.device == device:
        return values
    return torch.as_tensor(values, device=device)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor in `dtype`, without a call where it already is."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _paged_args(part: PagedPart) -> tuple:
    """Pointer at channel `lo`, strides (block, head, slot), table, its row stride, size."""
    cache = part.cache  # one stride() call, no view where the part is the whole row
    whole = part.lo == 0 and part.hi == cache.shape[-1]
    view = cache if whole else cache[..., part.lo : part.hi]
    return (view, *cache.stride()[:3], part.block_table, part.block_table.stride(0),
            part.block_size)


@dataclass(frozen=True)
class TritonConfig:
    """Launch shapes of the kernels; the defaults are the fastest of
    `benchmarks/kernels.py --sweep` on an H200 (docs/benchmarks.md)."""

    prefill_block_m: int = 128  # rows (query tokens x the heads of a KV head) per tile
    prefill_block_n: int = 64  # key positions per step
    prefill_warps: int = 8
    prefill_stages: int = 3
    decode_block_n: int = 32
    decode_warps: int = 4
    # 3: every decode program double-buffers its K and V copies. On an H200 (CUDA graph
    # replays, 32K) 2 stages: a leader alone within 4%, the other roles 8-16% slower.
    decode_stages: int = 3
    # A follower reading the leader's shared scores (estimated mass or not): its own
    # stages, as it reads V and the scores, no distant keys (the same on the H200).
    scores_decode_stages: int = 3
    # A leader writing its followers' shared scores: a register cap for its decode
    # program, so that four fit on an sm_90 multiprocessor (142 registers: three) without
    # spilling (benchmarks/kernel_resources.py); None: ptxas's choice (an H200 at 32K,
    # 2 decode stages: 13-14% slower).
    scores_write_registers: int | None = 128
    # Decode scans compute a key's page slot offset once, not per tile (prefill always
    # does): 12-15% fewer instructions per tile on sm_90; on an H200 a leader writing
    # shared scores 1-3% faster at 32K, the other roles within 1-2% either way; off, as
    # ptxas then spills the estimated-mass followers (8 bytes; kernel_resources.py).
    decode_fixed_slots: bool = False
    # Context positions per decode program, whole tiles (a leader's shared scores are
    # per tile); None: cut the context so that there are about programs_per_sm programs
    # per multiprocessor, each >= min_split_len positions.
    split_len: int | None = None
    programs_per_sm: int = 32
    # A follower reading shared scores: its own programs per SM (None: programs_per_sm).
    # It reads about half a leader's bytes per position (V and one logit per query head,
    # no keys), so at equal splits its programs are half as long and their fixed costs
    # (table and metadata loads before the first tile, the partials) weigh twice as much.
    scores_programs_per_sm: int | None = None
    min_split_len: int = 256
    # Decode: fewer chunks per (request, KV head) where the grid would end in a part-filled
    # wave of programs (waves.whole_wave_splits, from the residency of the compiled split
    # kernel, known from its first launch on). Off until a GPU has timed it.
    whole_waves: bool = False
    # Decode: the last split program of a (request, KV head) to finish merges its query
    # heads, after an atomic count, so no merge kernel is launched (one launch fewer per
    # layer and step: tens of microseconds of host time in an eager call). Off until a
    # GPU has timed it: the merge then runs in the grid's tail, GROUP heads a program.
    fused_merge: bool = False
    # Splits whose partial states a merge program loads per step, as one tile per branch
    # (sm_90: 48-64 registers at 32; a 128K context at batch 1 has 512 splits).
    merge_splits: int = 32

    def __post_init__(self) -> None:
        for name in ("prefill_block_m", "prefill_block_n", "decode_block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):  # tl.dot's smallest side; power of two
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, not {size}")
        if self.merge_splits < 1 or self.merge_splits & (self.merge_splits - 1):
            raise ValueError(f"TritonConfig.merge_splits must be a power of two, not "
                             f"{self.merge_splits}")
        for name in ("prefill_warps", "decode_warps"):
            warps = getattr(self, name)
            if not 1 <= warps <= 32 or warps & (warps - 1):  # Triton's num_warps
                raise ValueError(f"TritonConfig.{name} must be a power of two <= 32, not {warps}")
        for name in ("programs_per_sm", "scores_programs_per_sm", "prefill_stages",
                     "decode_stages", "scores_decode_stages", "min_split_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"TritonConfig.{name} must be >= 1")
        registers = self.scores_write_registers
        if registers is not None and not 16 <= registers <= 255:  # ptxas's register range
            raise ValueError(f"TritonConfig.scores_write_registers must be 16-255 or None, "
                             f"not {registers}")
        if self.split_len is not None and (self.split_len < 1
                                           or self.split_len % self.decode_block_n):
            raise ValueError(f"TritonConfig.split_len must be a positive multiple of "
                             f"decode_block_n ({self.decode_block_n}), not {self.split_len}")


DEFAULT_CONFIG = TritonConfig()
# A leader's window for the kernels: past any context, small enough that the kernels'
# position arithmetic stays in int32 (UNBOUNDED would make it int64, element-wise).
UNBOUNDED_RECENT = 1 << 30


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1): it keeps bf16
    as raw integers, so the kernels convert their loads to float32 there. Compiled for a
    GPU they keep the cache's dtype, also when compiled on a machine without one
    (benchmarks/kernel_resources.py)."""
    return bool(triton.knobs.runtime.interpret)


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


@triton.jit
def _write_token(cache_ptr, c_sb, c_sh, c_ss, slots_ptr, block_size, data_ptr, d_st, d_sh,
                 token, H: tl.constexpr, C: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """cache[slot // block_size, :H, slot % block_size, :C] = data[token, :H, :C]: every
    KV head of one token in one program (one per (token, head) made a 128K prefill
    launch 2 million 128-thread programs of 256 bytes each)."""
    slot = tl.load(slots_ptr + token)
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    inside = (h < H) & (c < C)
    rows = tl.load(data_ptr + token * d_st + h * d_sh + c, mask=inside, other=0.0)
    at = cache_ptr + (slot // block_size) * c_sb + h * c_sh + (slot % block_size) * c_ss + c
    written = inside & ((h * 0 + c * 0 + slot) >= 0)  # full-shaped: the interpreter's masks
    tl.store(at, rows.to(cache_ptr.dtype.element_ty), mask=written)


@triton.jit
def _write_slots_kernel(a_ptr, a_sb, a_sh, a_ss, a_slots, a_bs, a_data, a_st, a_dh,
                        b_ptr, b_sb, b_sh, b_ss, b_slots, b_bs, b_data, b_st, b_dh,
                        H: tl.constexpr, BLOCK_H: tl.constexpr,
                        A: tl.constexpr, BLOCK_A: tl.constexpr,
                        B: tl.constexpr, BLOCK_B: tl.constexpr):
    """Write a (axis 1 = 0) or b (axis 1 = 1): one token's rows each."""
    token = tl.program_id(0)
    if tl.program_id(1) == 0:
        _write_token(a_ptr, a_sb, a_sh, a_ss, a_slots, a_bs, a_data, a_st, a_dh, token,
                     H, A, BLOCK_H, BLOCK_A)
    else:
        _write_token(b_ptr, b_sb, b_sh, b_ss, b_slots, b_bs, b_data, b_st, b_dh, token,
                     H, B, BLOCK_H, BLOCK_B)


SlotWrite = tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]  # cache, slots, size, data


def _write_args(write: SlotWrite) -> tuple:
    cache, slots, block_size, data = write
    return (cache, *cache.stride()[:3], slots, block_size, data, *data.stride()[:2])


def triton_write_slots(*writes: SlotWrite) -> None:
    """For each of one or two writes (cache, slots, block_size, data): cache [blocks, Hkv,
    block_size, C] (channels dense) at each token's slot = data [T, Hkv, C]. Two writes
    (a layer's key and value) share one launch: at small batches an eager decode step
    waits on the host, and each launch costs it tens of microseconds. Slots < 0
    (padding) are skipped on the device, with no host sync, so the writes can sit in a
    CUDA graph; the writes' slot mappings have one length and their caches one Hkv."""
    if not 1 <= len(writes) <= 2:
        raise ValueError(f"triton_write_slots takes one or two writes, not {len(writes)}")
    first, second = writes[0], writes[-1]
    tokens, heads = first[1].shape[0], first[0].shape[1]
    if (second[1].shape[0], second[0].shape[1]) != (tokens, heads):
        raise ValueError("triton_write_slots: the writes differ in tokens or KV heads")
    if tokens == 0:
        return
    a, b = first[0].shape[-1], second[0].shape[-1]
    _write_slots_kernel[(tokens, len(writes))](
        *_write_args(first), *_write_args(second), H=heads, BLOCK_H=_pow2(heads),
        A=a, BLOCK_A=_pow2(a), B=b, BLOCK_B=_pow2(b))


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
