"""Reading vLLM's paged caches in Triton: a position's page through the block table and
its slot in the page, a tile's pages, a request's query rows; and the host helpers
every launch uses. A paged part is (cache [blocks, KV heads, block_size, C], channels
[lo, hi), block table, block size): a leader's K|V cache holds both K and V."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_layershare.attention.paged import PagedPart

# The online softmax's constants, here as every kernel module takes them.
LOG2E = tl.constexpr(1.4426950408889634)
NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: exp(-inf - NEG_BIG) = 0
# A running softmax maximum m moves only when some row's tile peak passes it by more than
# this (nats): acc and l share m, so the result is the same, a term e^(x - m) stays <=
# e^8, and most tiles skip rescaling acc (M x D floats): on sm_90, 10% of the instructions
# of a follower's shared-scores decode tile, 5% of a leader's decode tile, 11% of a
# prefill tile (benchmarks/kernel_resources.py).
STALE_MAX = tl.constexpr(8.0)


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
def _load_rows(ptr, stride_token, stride_head, tok, head, d, mask, UPCAST: tl.constexpr):
    """The query vectors of a tile's rows (token tok[m], head head[m]) -> [M, BLOCK_D]."""
    rows = tl.load(ptr + tok[:, None] * stride_token + head[:, None] * stride_head + d[None, :],
                   mask=mask, other=0.0)
    return rows.to(tl.float32) if UPCAST else rows


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


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1): it keeps bf16
    as raw integers, so the kernels convert their loads to float32 there. Compiled for a
    GPU they keep the cache's dtype, also when compiled on a machine without one
    (benchmarks/kernel_resources.py)."""
    return bool(triton.knobs.runtime.interpret)
