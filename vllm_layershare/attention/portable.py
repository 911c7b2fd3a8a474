"""Portable paged PoD attention in vectorised PyTorch (CPU, and CUDA until kernels land).

Each layer's attention is two branches over paged caches, merged by log-sum-exp:

    o_P, lse_P = attend(q,  K_prox, V)  over P(i) = sinks U (i - n_r, i]
    o_D, lse_D = attend(qd, K_lead, V)  over D(i) = [n_s, i - n_r]
    g = sigmoid(lse_P - lse_D);  o = g * o_P + (1 - g) * o_D

which is one softmax over both logit sets (method.md). A leader or one-layer
group is the P branch alone with n_s = 0 and n_r = infinity. Only the positions a
branch may read are gathered, so a follower never touches a freed key block.
"""

from __future__ import annotations

import torch

from vllm_layershare.attention.mass import estimated_mass
from vllm_layershare.attention.paged import LayerInputs, row_batches


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention with GQA, in float32.

    q [B, Q, H, D], k [B, N, Hkv, D], v [B, N, Hkv, Dv], mask [B, Q, N].
    Returns out [B, Q, H, Dv] and lse [B, Q, H] (-inf where a row sees nothing).
    """
    b, nq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, nq, hkv, h // hkv, d)
    logits = torch.einsum("bqhgd,bnhd->bhgqn", qg, k.float()) * scale
    logits.masked_fill_(~mask[:, None, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(logits - safe_lse[..., None])
    out = torch.einsum("bhgqn,bnhd->bqhgd", probs, v.float()).reshape(b, nq, h, -1)
    return out, lse.permute(0, 3, 1, 2).reshape(b, nq, h)


def merge(
    o_p: torch.Tensor,
    lse_p: torch.Tensor,
    o_d: torch.Tensor,
    lse_d: torch.Tensor,
    gate_skip_threshold: float | None,
) -> torch.Tensor:
    """Log-sum-exp merge of the two branches, with the optional gate skip."""
    gate = torch.sigmoid(lse_p - lse_d)
    if gate_skip_threshold is not None:
        gate = torch.where(gate >= gate_skip_threshold, torch.ones_like(gate), gate)
    gate = gate[..., None]
    return gate * o_p + (1.0 - gate) * o_d


def proximal_positions(
    first: torch.Tensor, last: torch.Tensor, sink: int, recent: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions that queries first..last may see proximally, padded.

    Sinks [0, s) then the window [w0, last]; pads repeat `last` (a written token).
    """
    s = torch.clamp(last + 1, max=sink)
    w0 = torch.maximum(s, first - recent + 1)
    count = s + last - w0 + 1
    j = torch.arange(int(count.max()), device=first.device)[None]
    pos = torch.where(j < s[:, None], j, w0[:, None] + j - s[:, None])
    valid = j < count[:, None]
    return torch.where(valid, pos, last[:, None]), valid


def distant_positions(
    last: torch.Tensor, sink: int, recent: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Token positions [n_s, last - n_r], padded with `last`; None when all empty."""
    count = torch.clamp(last - recent - sink + 1, min=0)
    width = int(count.max())
    if width == 0:
        return None
    j = torch.arange(width, device=last.device)[None]
    valid = j < count[:, None]
    return torch.where(valid, sink + j, last[:, None]), valid


def attend_rows(
    inputs: LayerInputs,
    rows: torch.Tensor,
    token_index: torch.Tensor,
    first: torch.Tensor,
    last: torch.Tensor,
    mass_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Outputs of the queries `token_index` [B, Q] at positions first..last per row;
    mass_lse [T, H]: the distant branch's log-mass, if not the leader's."""
    n_q = token_index.shape[1]
    q_pos = torch.minimum(first[:, None] + torch.arange(n_q, device=first.device), last[:, None])
    sink, recent = inputs.sink, inputs.recent

    pos, valid = proximal_positions(first, last, sink, recent)
    seen = pos[:, None, :] <= q_pos[:, :, None]
    near = (pos[:, None, :] < sink) | (pos[:, None, :] > q_pos[:, :, None] - recent)
    mask = valid[:, None, :] & seen & near
    out, lse_p = attend(
        inputs.q[token_index],
        inputs.k_prox.gather(rows, pos),
        inputs.v.gather(rows, pos),
        mask,
        inputs.scale,
    )
    distant = distant_positions(last, sink, recent) if inputs.k_distant else None
    if distant is None:
        return out
    assert inputs.q_distant is not None and inputs.k_distant is not None
    pos, valid = distant
    mask = valid[:, None, :] & (pos[:, None, :] <= q_pos[:, :, None] - recent)
    o_d, lse_d = attend(
        inputs.q_distant[token_index],
        inputs.k_distant.gather(rows, pos),
        inputs.v.gather(rows, pos),
        mask,
        inputs.scale,
    )
    if mass_lse is not None:
        lse_d = mass_lse[token_index]
    return merge(out, lse_p, o_d, lse_d, inputs.gate_skip_threshold)


def paged_pod_attention(
    inputs: LayerInputs,
    query_start_loc: list[int],
    seq_lens: list[int],
    output: torch.Tensor,
) -> None:
    """Write attention of every scheduled token into `output` [T, H, Dv]."""
    mass_lse = None
    if inputs.summary is not None and inputs.k_distant is not None:
        mass_lse = estimated_mass(inputs.q, inputs.k_prox, inputs.summary, query_start_loc,
                                  seq_lens, inputs.sink, inputs.recent, inputs.scale)
    for rows, tokens, first, last in row_batches(query_start_loc, seq_lens, inputs.q.device):
        output[tokens] = attend_rows(inputs, rows, tokens, first, last,
                                     mass_lse).to(output.dtype)
