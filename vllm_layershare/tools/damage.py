"""How much a layer changes the model when it follows a given leader.

Two measures, for every pair (leader a, follower l > a), with the follower's PoD
output o_PoD(a, l) (method.md, with the chosen `share` and distant mass):

- output: its attention output against its ordinary one on the same q, K, V of the
  dense model, for sampled queries i; one dense pass gives every pair (errors of
  earlier layers are not propagated):

      damage(a, l) = mean over i and heads of ||o_PoD(a, l)[i] - o_l[i]|| / ||o_l[i]||

- next-token: the model's next-token distribution when layer l alone uses o_PoD(a, l)
  for every query, the rest of the model dense; per pair one run from layer l on:

      damage(a, l) = mean over sampled i of KL(p_dense(. | i) || p_(a,l)(. | i))   (nats)
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


def whole_blocks(positions: torch.Tensor, tokens: int, size: int, sink: int,
                 recent: int) -> torch.Tensor:
    """[Q, nb]: the summary blocks wholly inside each query's distant span [sink, end)."""
    b = torch.arange(tokens // size)
    return (b[None] * size >= sink) & ((b[None] + 1) * size <= (positions - recent + 1)[:, None])


def estimated_lse(q, k, positions, scale, sink, recent, size, offsets=None):
    """log of the follower's own distant mass from mean keys of whole blocks (mass.py's
    estimate, dense): q [H, Q, D] at `positions`, k [H, T, D], offsets [H] or None."""
    tokens = k.shape[1]
    blocks = tokens // size
    means = k[:, : blocks * size].reshape(k.shape[0], blocks, size, -1).mean(2)
    whole = whole_blocks(positions, tokens, size, sink, recent)
    block_logits = torch.einsum("hqd,hbd->hqb", q, means) * scale + math.log(size)
    if offsets is not None:
        block_logits = block_logits + offsets[:, None, None]
    j = torch.arange(tokens)
    in_whole = whole.repeat_interleave(size, dim=1)
    in_whole = torch.nn.functional.pad(in_whole, (0, tokens - in_whole.shape[1]))
    exact = (j[None] >= sink) & (j[None] < (positions - recent + 1)[:, None]) & ~in_whole
    token_logits = torch.einsum("hqd,htd->hqt", q, k) * scale
    return torch.logsumexp(torch.cat([block_logits.masked_fill(~whole, float("-inf")),
                                      token_logits.masked_fill(~exact, float("-inf"))], -1), -1)


def mass_offsets(q, k, positions, scale, sink, recent, size) -> torch.Tensor:
    """[H]: how much the mean keys underestimate the mass of the whole distant blocks,
    log sum_j exp(c q.k_j) - log sum_b S exp(c q.kbar_b), averaged over the queries
    (`summary_offsets` of the grouping file). q [H, Q, D] at `positions`, k [H, T, D]."""
    heads, tokens, _ = k.shape
    whole = whole_blocks(positions, tokens, size, sink, recent)
    some = whole.any(-1)
    keys = k[:, : tokens // size * size]
    true = (torch.einsum("hqd,htd->hqt", q, keys) * scale).view(heads, q.shape[1], -1, size)
    true = torch.logsumexp(true, -1).masked_fill(~whole, float("-inf"))
    means = keys.reshape(heads, -1, size, keys.shape[-1]).mean(2)
    est = torch.einsum("hqd,hbd->hqb", q, means) * scale + math.log(size)
    est = est.masked_fill(~whole, float("-inf"))
    gap = torch.logsumexp(true, -1) - torch.logsumexp(est, -1)
    return gap[:, some].mean(-1) if bool(some.any()) else torch.zeros(heads)


class Follower:
    """The parts of layer l's PoD output that do not depend on its leader."""

    def __init__(self, own: tuple, positions: torch.Tensor, scale: float, *, sink: int,
                 recent: int, share: str, summary_tokens: int | None,
                 offsets: torch.Tensor | None = None) -> None:
        heads = own[0].shape[0]
        self.q = own[0][:, positions].float()
        k, self.v = _expand(own[1], heads), _expand(own[2], heads)
        self.scale, self.share, self.heads = scale, share, heads
        j, i = torch.arange(k.shape[1])[None], positions[:, None]
        self.causal = j <= i
        near = self.causal & ((j < sink) | (j > i - recent))
        self.far = self.causal & ~near
        self.k = k
        self.o_p, self.lse_p = _attend(self.q, k, self.v, near, scale)
        self.lse_own = (None if summary_tokens is None else
                        estimated_lse(self.q, k, positions, scale, sink, recent, summary_tokens,
                                      offsets))
        self.positions = positions

    def output(self, lead: tuple) -> torch.Tensor:
        """[H, Q, D]: the PoD output when following `lead` = (q, k) of a leader."""
        q_d = lead[0][:, self.positions].float() if self.share == "scores" else self.q
        o_d, lse_d = _attend(q_d, _expand(lead[1], self.heads), self.v, self.far, self.scale)
        if self.lse_own is not None:
            lse_d = self.lse_own
        gate = torch.sigmoid(self.lse_p - lse_d)[..., None]
        return gate * self.o_p + (1 - gate) * o_d

    def damage(self, lead: tuple) -> torch.Tensor:
        """[H] mean relative output error when following `lead` = (q, k) of a leader."""
        exact, _ = _attend(self.q, self.k, self.v, self.causal, self.scale)
        error = (self.output(lead) - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)
        return error.mean(-1)


def pod_output(own: tuple, lead: tuple, scale: float, chunk: int = 512,
               **method) -> torch.Tensor:
    """[T, H, D]: a follower's attention output for every query of a window, in chunks
    of queries (the score matrices of a whole window would not fit)."""
    q = own[0]
    heads, tokens = q.shape[:2]
    first = method["sink"] + method["recent"]  # the first query with a distant token
    plain = torch.nn.functional.scaled_dot_product_attention(
        q[None, :, :first], own[1][None, :, :first], own[2][None, :, :first],
        is_causal=True, scale=scale, enable_gqa=True)[0]
    parts = [plain.float()]
    for start in range(first, tokens, chunk):
        positions = torch.arange(start, min(tokens, start + chunk))
        parts.append(Follower(own, positions, scale, **method).output(lead))
    return torch.cat(parts, dim=1).transpose(0, 1).to(q.dtype)


class DamageMeter:
    """Accumulates damage(a, l) per query head over calibration windows."""

    def __init__(self, num_layers: int, num_heads: int) -> None:
        self.total = torch.zeros(num_layers, num_layers, num_heads, dtype=torch.float64)
        self.windows = 0

    def add_window(self, layers: list[tuple], positions: torch.Tensor, scale: float,
                   progress=None, offsets: list | None = None, **method) -> None:
        """layers[l] = (q, k, v) of one window; all pairs a < l."""
        for own in range(1, len(layers)):
            follower = Follower(layers[own], positions, scale,
                                offsets=offsets[own] if offsets else None, **method)
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


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """[Q] KL(softmax(reference) || softmax(other)) in nats, from logits [Q, V]."""
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class NextTokenMeter:
    """Accumulates the next-token damage(a, l) for leaders up to `span` layers before
    each follower; pairs further apart stay NaN (never measured, never chosen)."""

    def __init__(self, num_layers: int, span: int) -> None:
        self.total = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.span, self.windows = span, 0

    def pairs(self) -> list[tuple[int, int]]:
        n = self.total.shape[0]
        return [(lead, own) for own in range(1, n) for lead in range(max(0, own - self.span), own)]

    def add_window(self, model, window, progress=None, offsets: list | None = None,
                   **method) -> None:
        """`model` a CapturingModel, `window` its run with the layers' inputs kept;
        offsets[l]: layer l's summary offsets (estimated mass), if any."""
        for lead, own in self.pairs():
            def follow(q, k, v, scale, lead=lead, own=own):
                return pod_output((q, k, v), window.qkv[lead][:2], scale,
                                  offsets=offsets[own] if offsets else None, **method)
            logits = model.resume(window, own, follow)
            self.total[lead, own] += float(kl_divergence(window.logits, logits).mean())
            if progress is not None:
                progress.update(1)
        self.windows += 1

    def per_layer(self) -> torch.Tensor:
        """[N, N]: damage(a, l) for measured pairs, NaN for the others."""
        measured = torch.zeros_like(self.total, dtype=torch.bool)
        for lead, own in self.pairs():
            measured[lead, own] = True
        return torch.where(measured, self.total / max(self.windows, 1), float("nan"))
