"""Dense reference of PoD attention, written from the definitions in method.md.

This is the yardstick the paged implementation is tested against, so it shares no
code with it: one softmax over a logit matrix whose entries come from the proximal
or the distant rule, in float64, one query row at a time.

For a follower layer l with leader a and a query at position i:

    s[j] = scale * q_l[i] . k_l[j]      j in P(i) = {j < n_s} U {i - n_r < j <= i}
    s[j] = scale * qd[i]  . k_a[j]      j in D(i) = {n_s <= j <= i - n_r}
    qd = q_a (share: scores) or q_l (share: keys)
    o[i] = sum_j softmax(s)[j] v_l[j]

With a gate-skip threshold tau, g = sum_P exp(s) / sum exp(s); where g >= tau the
row attends to P(i) alone.

With `distant_mass="estimated"` the distant branch keeps its shape (the softmax of
the distant logits above) but its mass is the follower's own, estimated from the
mean key kbar_l[b] of each block b of S tokens [bS, (b+1)S) that lies wholly in D(i),
and from exact keys for distant tokens outside such blocks:

    M(i) = sum_b S * exp(scale * q_l[i] . kbar_l[b]) + sum_j exp(scale * q_l[i] . k_l[j])
    g = sum_P exp(s) / (sum_P exp(s) + M(i)),   o = g * o_P + (1 - g) * o_D
"""

from __future__ import annotations

import math

import torch


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Ordinary causal attention; q [L, H, D], k and v [L, Hkv, D] -> [L, H, D]."""
    return dense_pod_attention(q, k, v, q, k, scale, sink=0, recent=q.shape[0] + 1)


def dense_pod_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lead: torch.Tensor,
    k_lead: torch.Tensor,
    scale: float,
    *,
    sink: int,
    recent: int,
    share: str = "scores",
    gate_skip_threshold: float | None = None,
    distant_mass: str = "leader",
    summary_tokens: int = 64,
    summary_offsets: list[float] | None = None,
) -> torch.Tensor:
    """Follower attention of a whole sequence at positions 0..L-1.

    q, q_lead: [L, H, D]; k, v, k_lead: [L, Hkv, D]. Returns [L, H, D] in float64.
    """
    if distant_mass == "estimated":
        return _estimated_mass_attention(q, k, v, q_lead, k_lead, scale, sink, recent, share,
                                         gate_skip_threshold, summary_tokens,
                                         summary_offsets or [0.0] * q.shape[1])
    length, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    q_lead, k_lead = q_lead.double(), k_lead.double()
    q_distant = q_lead if share == "scores" else q
    out = torch.zeros(length, num_heads, v.shape[-1], dtype=torch.float64)
    for i in range(length):
        for h in range(num_heads):
            kv = h // group
            logits = torch.full((i + 1,), float("-inf"), dtype=torch.float64)
            proximal = torch.zeros(i + 1, dtype=torch.bool)
            for j in range(i + 1):
                if j < sink or j > i - recent:
                    proximal[j] = True
                    logits[j] = scale * torch.dot(q[i, h], k[j, kv])
                else:
                    logits[j] = scale * torch.dot(q_distant[i, h], k_lead[j, kv])
            weights = torch.softmax(logits, dim=0)
            if gate_skip_threshold is not None and weights[proximal].sum() >= gate_skip_threshold:
                weights = torch.where(proximal, weights, torch.zeros_like(weights))
                weights = weights / weights.sum()
            out[i, h] = weights @ v[: i + 1, kv]
    return out


def _estimated_mass_attention(q, k, v, q_lead, k_lead, scale, sink, recent, share, tau,
                              block, offsets) -> torch.Tensor:
    length, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    q_distant = (q_lead if share == "scores" else q).double()
    k_lead = k_lead.double()
    out = torch.zeros(length, num_heads, v.shape[-1], dtype=torch.float64)
    for i in range(length):
        near = [j for j in range(i + 1) if j < sink or j > i - recent]
        far = [j for j in range(i + 1) if sink <= j <= i - recent]
        whole = [b for b in range(length // block + 1)
                 if b * block >= sink and (b + 1) * block - 1 <= i - recent]
        covered = {j for b in whole for j in range(b * block, (b + 1) * block)}
        for h in range(num_heads):
            kv = h // group
            s_near = torch.stack([scale * torch.dot(q[i, h], k[j, kv]) for j in near])
            o_near = torch.softmax(s_near, 0) @ v[near, kv]
            if not far:
                out[i, h] = o_near
                continue
            s_far = torch.stack([scale * torch.dot(q_distant[i, h], k_lead[j, kv]) for j in far])
            o_far = torch.softmax(s_far, 0) @ v[far, kv]
            weight = block * math.exp(offsets[h])  # a block counts as S e^delta mean keys
            mass = sum(weight * torch.exp(scale * torch.dot(q[i, h], k[b * block:(b + 1) * block,
                                                                       kv].mean(0)))
                       for b in whole)
            mass = mass + sum(torch.exp(scale * torch.dot(q[i, h], k[j, kv]))
                              for j in far if j not in covered)
            near_mass = torch.exp(s_near).sum()
            gate = near_mass / (near_mass + mass)
            if tau is not None and gate >= tau:
                gate = torch.ones((), dtype=torch.float64)
            out[i, h] = gate * o_near + (1 - gate) * o_far
    return out
