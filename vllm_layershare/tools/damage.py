"""How much a layer's attention output changes when it follows a given leader.

For sampled queries i and every pair (leader a, follower l > a), the follower's PoD
output (method.md, with the chosen `share` and distant mass) is compared with its
ordinary attention output on the same q, K, V of the dense model:

    damage(a, l) = mean over queries and heads of ||o_PoD(a, l)[i] - o_l[i]|| / ||o_l[i]||

One forward pass of the unmodified model gives every layer's q, K, V, so all pairs
are measured at once (errors of earlier layers are not propagated).
"""

from __future__ import annotations

import math

import torch


def _attend(q, k, v, mask, scale):
    """q [H, Q, D], k and v [H, T, D] (heads repeated), mask [Q, T] -> (out, lse)."""
    logits = torch.einsum("hqd,htd->hqt", q, k) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqt,htd->hqd", probs, v), lse


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.float().repeat_interleave(heads // x.shape[0], dim=0)


def estimated_lse(q, k, positions, scale, sink, recent, size):
    """log of the follower's own distant mass from mean keys of whole blocks (mass.py's
    estimate, dense): q [H, Q, D] at `positions`, k [H, T, D]."""
    tokens = k.shape[1]
    blocks = tokens // size
    means = k[:, : blocks * size].reshape(k.shape[0], blocks, size, -1).mean(2)
    end = positions - recent + 1  # distant: [sink, end)
    b = torch.arange(blocks)
    whole = (b[None] * size >= sink) & ((b[None] + 1) * size <= end[:, None])  # [Q, nb]
    block_logits = torch.einsum("hqd,hbd->hqb", q, means) * scale + math.log(size)
    j = torch.arange(tokens)
    in_whole = whole.repeat_interleave(size, dim=1)
    in_whole = torch.nn.functional.pad(in_whole, (0, tokens - in_whole.shape[1]))
    exact = (j[None] >= sink) & (j[None] < end[:, None]) & ~in_whole
    token_logits = torch.einsum("hqd,htd->hqt", q, k) * scale
    return torch.logsumexp(torch.cat([block_logits.masked_fill(~whole, float("-inf")),
                                      token_logits.masked_fill(~exact, float("-inf"))], -1), -1)


class Follower:
    """The parts of layer l's PoD output that do not depend on its leader."""

    def __init__(self, own: tuple, positions: torch.Tensor, scale: float, *, sink: int,
                 recent: int, share: str, summary_tokens: int | None) -> None:
        heads = own[0].shape[0]
        self.q = own[0][:, positions].float()
        k, self.v = _expand(own[1], heads), _expand(own[2], heads)
        self.scale, self.share, self.heads = scale, share, heads
        j, i = torch.arange(k.shape[1])[None], positions[:, None]
        causal = j <= i
        near = causal & ((j < sink) | (j > i - recent))
        self.far = causal & ~near
        self.exact, _ = _attend(self.q, k, self.v, causal, scale)
        self.o_p, self.lse_p = _attend(self.q, k, self.v, near, scale)
        self.lse_own = (None if summary_tokens is None else
                        estimated_lse(self.q, k, positions, scale, sink, recent, summary_tokens))
        self.positions = positions

    def damage(self, lead: tuple) -> torch.Tensor:
        """[H] mean relative output error when following `lead` = (q, k) of a leader."""
        q_d = lead[0][:, self.positions].float() if self.share == "scores" else self.q
        o_d, lse_d = _attend(q_d, _expand(lead[1], self.heads), self.v, self.far, self.scale)
        if self.lse_own is not None:
            lse_d = self.lse_own
        gate = torch.sigmoid(self.lse_p - lse_d)[..., None]
        pod = gate * self.o_p + (1 - gate) * o_d
        error = (pod - self.exact).norm(dim=-1) / self.exact.norm(dim=-1).clamp_min(1e-12)
        return error.mean(-1)


class DamageMeter:
    """Accumulates damage(a, l) per query head over calibration windows."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.total = torch.zeros(num_layers, num_layers, num_heads, dtype=torch.float64)
        self.windows = 0

    def add_window(self, layers: list[tuple], positions: torch.Tensor, scale: float,
                   progress=None, **method) -> None:
        """layers[l] = (q, k, v) of one window; all pairs a < l."""
        for own in range(1, len(layers)):
            follower = Follower(layers[own], positions, scale, **method)
            for lead in range(own):
                self.total[lead, own] += follower.damage(layers[lead][:2]).double()
            if progress is not None:
                progress.update(1)
        self.windows += 1

    def per_head(self) -> torch.Tensor:
        return self.total / max(self.windows, 1)

    def per_layer(self) -> torch.Tensor:
        """[N, N]: damage(a, l) for a < l (upper triangle), 0 elsewhere."""
        return self.per_head().mean(-1)
