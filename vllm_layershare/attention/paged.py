"""What one layer's attention reads: paged views of vLLM's caches, and a step's rows.

Shared by the portable path, the mass estimate and the compiled kernel's wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Query rows of one prefill handled at once: bounds the logit matrix in memory.
QUERY_CHUNK = 256
UNBOUNDED = 1 << 40


@dataclass
class PagedPart:
    """Channels [lo, hi) of one layer's paged cache [blocks, Hkv, block_size, C]."""

    cache: torch.Tensor
    lo: int
    hi: int
    block_table: torch.Tensor  # [num_reqs, max_blocks] of this cache's KV-cache group
    block_size: int

    def gather(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Entries at token `positions` [B, N] of requests `rows` [B] -> [B, N, Hkv, hi-lo]."""
        blocks = self.block_table[rows].gather(1, positions // self.block_size)
        return self.cache[..., self.lo : self.hi][blocks, :, positions % self.block_size]


@dataclass
class SummaryPart:
    """A follower's summary cache [pages, Hkv, states, D]: state b % states of page
    table[b * S // tokens_per_page] holds kbar[b]. A summary block stands for
    exp(log_weight[h] + scale q.kbar[b]) of query head h's mass: log_weight = log S
    plus the head's calibrated offset."""

    cache: torch.Tensor
    block_table: torch.Tensor
    tokens_per_page: int
    summary_tokens: int
    log_weight: torch.Tensor  # [H] float32

    @staticmethod
    def log_weights(summary_tokens: int, heads: int, offsets=None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """[heads] float32: log S + offsets (0 where none were calibrated)."""
        weight = torch.full((heads,), math.log(summary_tokens), dtype=torch.float32)
        if offsets is not None:
            weight += torch.as_tensor(offsets, dtype=torch.float32)
        return weight.to(device)

    def locate(self, rows: torch.Tensor, blocks: torch.Tensor):
        """(page, state) of summary blocks `blocks` [B, N] of requests `rows` [B]."""
        start = blocks * self.summary_tokens
        pages = self.block_table[rows].gather(1, start // self.tokens_per_page)
        return pages, (start % self.tokens_per_page) // self.summary_tokens

    def gather(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        pages, states = self.locate(rows, blocks)
        return self.cache[pages, :, states]  # [B, N, Hkv, D]


@dataclass
class SharedScores:
    """What a leader's decode pass leaves its followers about their distant tokens (share
    `scores`, GPU kernels), so that they read no leader keys: per query head and key tile
    of the kernels, the softmax of the tile's distant logits, e^(scale s_n - t) with t
    their log-sum-exp, and t. A paged cache of float32 cells [pages, Hkv, cell_floats]:
    for query head kv * group + g, the term of position n sits in page block_table[row,
    n // block_size], cell kv, at g * block_size + n % block_size in the values' dtype,
    and the tiles' t after the terms (triton_shared._shared_at). Normally vLLM's planned
    scores companion (layout.py), else a buffer over the leader's own pages."""

    cache: torch.Tensor
    block_table: torch.Tensor
    block_size: int
    sink: int  # the followers' window, which the leader's writes follow
    recent: int
    write: bool  # True in the leader's pass

    @staticmethod
    def cell_floats(group: int, block_size: int, dtype: torch.dtype) -> int:
        """float32 per (page, KV head): a term per query head and token in `dtype`, and
        as many bytes again, of which each tile's log-sum-exps take a few."""
        return group * block_size * dtype.itemsize // 2

    @staticmethod
    def cells(cache: torch.Tensor) -> torch.Tensor:
        """A scores companion's cache as vLLM shapes it ([pages, Hkv, tokens, C] in the
        model's dtype, in vLLM's stride order) seen as our float32 cells [pages, Hkv,
        cell_floats]: only the kernels touch this memory, so the layout inside a
        page is theirs."""
        floats = cache.view(torch.float32)
        pages, kv_heads = floats.shape[:2]
        per_page = floats[0].numel()
        if floats.stride(0) != per_page:
            raise ValueError(f"layershare: scores pages must be dense, strides {cache.stride()}")
        return floats.as_strided((pages, kv_heads, per_page // kv_heads),
                                 (per_page, per_page // kv_heads, 1))


@dataclass
class LayerInputs:
    """Everything one layer's attention reads, for one forward step."""

    q: torch.Tensor  # [T, H, D], this layer's queries
    k_prox: PagedPart  # keys of the proximal branch (own keys)
    v: PagedPart  # own values, every token
    scale: float
    sink: int = 0
    recent: int = UNBOUNDED
    # The leader's (share scores) or own (keys) queries; None in a decode step whose
    # follower reads the leader's shared scores instead (Triton kernels).
    q_distant: torch.Tensor | None = None
    k_distant: PagedPart | None = None  # the leader's keys
    gate_skip_threshold: float | None = None
    # The follower's mean keys: with them the distant branch is weighted by the
    # follower's own estimated mass (mass.py); None: by the leader's mass.
    summary: SummaryPart | None = None
    shared_scores: SharedScores | None = None  # GPU kernels only; others recompute


def row_batches(query_start_loc: list[int], seq_lens: list[int], device: torch.device):
    """(rows [B], token_index [B, Q], first [B], last [B]) batches of a step's queries.

    Decode rows (one query) come as one padded batch; each prefill (or prefill chunk)
    alone, QUERY_CHUNK queries at a time.
    """
    decode_rows, prefill_rows = [], []
    for row in range(len(seq_lens)):
        n_q = query_start_loc[row + 1] - query_start_loc[row]
        if n_q == 1:
            decode_rows.append(row)
        elif n_q > 1:
            prefill_rows.append(row)
    if decode_rows:
        tokens = torch.tensor([query_start_loc[r] for r in decode_rows], device=device)
        last = torch.tensor([seq_lens[r] - 1 for r in decode_rows], device=device)
        yield torch.tensor(decode_rows, device=device), tokens[:, None], last, last
    for row in prefill_rows:
        start, end = query_start_loc[row], query_start_loc[row + 1]
        first_pos = seq_lens[row] - (end - start)
        for chunk in range(start, end, QUERY_CHUNK):
            stop = min(chunk + QUERY_CHUNK, end)
            yield (torch.tensor([row], device=device),
                   torch.arange(chunk, stop, device=device)[None],
                   torch.tensor([first_pos + chunk - start], device=device),
                   torch.tensor([first_pos + stop - 1 - start], device=device))
