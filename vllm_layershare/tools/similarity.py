"""How alike two layers attend to distant tokens: Jensen-Shannon similarity.

For a query at position i, a layer's distant distribution is its softmax taken over
the distant tokens D(i) only (method.md). Two layers a and l are compared by

    S(a, l) = 1 - JSD_2(p_a || p_l),   JSD_2(p || q) = (KL(p || m) + KL(q || m)) / (2 ln 2),
    m = (p + q) / 2,

which lies in [0, 1]: 1 for identical distributions, 0 for disjoint ones. S is
averaged over sampled queries per query head (kept for later use), then over heads.
"""

from __future__ import annotations

import math

import torch


def js_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 - base-2 Jensen-Shannon divergence of distributions along the last dim."""
    m = 0.5 * (p + q)
    # xlogy gives 0 * log 0 = 0, so zero-probability entries cost nothing.
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    divergence = (kl_p + kl_q) / (2.0 * math.log(2.0))
    return (1.0 - divergence).clamp(0.0, 1.0)


def distant_distribution(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, scale: float,
    sink: int, recent: int,
) -> torch.Tensor:
    """Softmax over D(i) of one layer's logits, for the sampled query positions.

    query [H, T, d], key [H_kv, T, d] (after rotary embedding), positions [Q] with
    D(i) non-empty. Returns [H, Q, T] in float32, zero outside D(i).
    """
    heads, kv_heads = query.shape[0], key.shape[0]
    keys = key.float().repeat_interleave(heads // kv_heads, dim=0)
    logits = torch.einsum("hqd,htd->hqt", query[:, positions].float(), keys) * scale
    j = torch.arange(key.shape[1])
    distant = (j[None, :] >= sink) & (j[None, :] <= positions[:, None] - recent)
    return logits.masked_fill(~distant, float("-inf")).softmax(-1)


class SimilarityMeter:
    """Accumulates S(a, l) per query head over calibration windows."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.total = torch.zeros(num_layers, num_layers, num_heads, dtype=torch.float64)
        self.queries = 0

    def add_window(self, distributions: list[torch.Tensor], progress=None) -> None:
        """Add one window: a [H, Q, T] distant distribution per layer, same queries."""
        n = len(distributions)
        for a in range(n):
            self.total[a, a] += distributions[a].shape[1]
            for b in range(a + 1, n):
                per_head = js_similarity(distributions[a], distributions[b]).sum(-1).double()
                self.total[a, b] += per_head
                self.total[b, a] += per_head
            if progress is not None:
                progress.update(1)
        self.queries += distributions[0].shape[1]

    def per_head(self) -> torch.Tensor:
        """[N, N, H] mean similarity of each query head."""
        return self.total / max(self.queries, 1)

    def per_layer(self) -> torch.Tensor:
        """[N, N] mean over heads: the similarity the grouping rule uses."""
        return self.per_head().mean(-1)
