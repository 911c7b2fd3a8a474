"""A follower's own distant-token mass, estimated from one mean key per block.

Training-free, the leader's distant mass is a poor stand-in for a follower's
(method.md, "Quality without training"). With `distant_mass: estimated` the merge
weight of the distant branch comes from the follower's own query against

    kbar[b] = mean of k_l over block b = [bS, (b+1)S)        (S = summary_tokens)

for every block wholly in D(i), and from exact keys for the distant tokens outside
such blocks (they sit next to the sinks or the window, whose key blocks are kept):

    log M(i) = logsumexp( {scale q_l[i].kbar[b] + log S + delta_h}_b  U  {scale q_l[i].k_l[j]}_j )

delta_h (`summary_offsets`, optional, per query head, calibrated; else 0) corrects
the mean key's bias: by Jensen, S exp(q.kbar) underestimates sum_j exp(q.k_j), on
SmolLM2 by about 1.5 nats per block (benchmarks/mass_summaries.py). With the leader's
borrowed distant branch that underestimate helps, so calibration leaves it at 0 by
default (docs/quality.md).

The summary of a block is written in the step that writes its last key, from the
key window (the block is still there: S divides the key block size). The portable
path uses `estimated_mass`; the CPU kernel computes the same sum in its task loop
(`estimated_log_mass` in csrc/), and the tests hold both to a brute-force reference.
"""

from __future__ import annotations

import torch

from vllm_layershare.attention.paged import PagedPart, SummaryPart, row_batches


def write_summaries(keys: PagedPart, summary: SummaryPart, rows: torch.Tensor,
                    ends: torch.Tensor) -> None:
    """Store kbar of the blocks whose last token is at `ends` (this step's tokens that
    complete a block, of requests `rows`; the metadata builder finds them on the host,
    so nothing here waits for the device), read back from the key window. The Triton
    path has its own writer, which finds them on the device (triton_write_summaries)."""
    size = summary.summary_tokens
    span = ends[:, None] - size + 1 + torch.arange(size, device=ends.device)
    mean = keys.gather(rows, span).float().mean(1)  # [n, Hkv, D]
    pages, states = summary.locate(rows, (ends // size)[:, None])
    summary.cache[pages[:, 0], :, states[:, 0]] = mean.to(summary.cache.dtype)


def row_mass(q: torch.Tensor, keys: PagedPart, summary: SummaryPart, rows: torch.Tensor,
             q_pos: torch.Tensor, first: torch.Tensor, last: torch.Tensor, sink: int,
             recent: int, scale: float) -> torch.Tensor:
    """log M for queries q [B, Q, H, D] at positions q_pos [B, Q] (first..last per row).

    -inf where D(i) is empty.
    """
    size = summary.summary_tokens
    end = q_pos - recent + 1  # distant tokens are [sink, end)
    low = -(-sink // size)  # first block wholly at or after the sinks
    high = torch.clamp(torch.div(end, size, rounding_mode="floor"), min=low)
    parts = []
    widest = int(high.max()) - low
    if widest > 0:
        blocks = low + torch.arange(widest, device=q.device)[None].expand(rows.shape[0], -1)
        logits = (_logits(q, summary.gather(rows, blocks), scale)
                  + summary.log_weight[:, None])  # [H, 1]: per query head
        parts.append(logits.masked_fill(~(blocks[:, None, :] < high[:, :, None])[:, :, None],
                                        float("-inf")))
    pos, valid = _exact_positions(first, last, sink, recent, low * size, size)
    if pos is not None:
        j = pos[:, None, :]
        wanted = valid[:, None, :] & (j >= sink) & (j < end[:, :, None]) & (
            (j < low * size) | (j >= high[:, :, None] * size))
        logits = _logits(q, keys.gather(rows, pos), scale)
        parts.append(logits.masked_fill(~wanted[:, :, None], float("-inf")))
    if not parts:
        return torch.full(q.shape[:3], float("-inf"), device=q.device)
    return torch.logsumexp(torch.cat(parts, dim=-1), dim=-1)


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Q, H, D], k [B, N, Hkv, D] -> scale * q.k [B, Q, H, N] (GQA)."""
    b, nq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.float().view(b, nq, hkv, h // hkv, d)
    return torch.einsum("bqhgd,bnhd->bqhgn", qg, k.float()).reshape(b, nq, h, -1) * scale


def _exact_positions(first, last, sink, recent, low_start, size):
    """Distant positions a row's queries may need exactly: [sink, low_start) next to
    the sinks, and [whole blocks' end for `first`, last - recent] next to the window;
    padded with `last` (written this step)."""
    lower = torch.arange(sink, low_start, device=first.device)[None].expand(first.shape[0], -1)
    lower_ok = lower <= (last - recent)[:, None]
    start = torch.clamp(torch.div(first - recent + 1, size, rounding_mode="floor") * size,
                        min=low_start)
    count = torch.clamp(last - recent - start + 1, min=0)
    width = int(count.max()) if count.numel() else 0
    j = torch.arange(width, device=first.device)[None]
    upper, upper_ok = start[:, None] + j, j < count[:, None]
    pos = torch.cat([lower, upper], dim=1)
    if pos.shape[1] == 0:
        return None, None
    valid = torch.cat([lower_ok, upper_ok], dim=1)
    return torch.where(valid, pos, last[:, None]), valid


def estimated_mass(q: torch.Tensor, keys: PagedPart, summary: SummaryPart,
                   query_start_loc: list[int], seq_lens: list[int], sink: int, recent: int,
                   scale: float) -> torch.Tensor:
    """log M [T, H] for every scheduled token (-inf where nothing is distant)."""
    out = torch.full(q.shape[:2], float("-inf"), device=q.device)
    for rows, tokens, first, last in row_batches(query_start_loc, seq_lens, q.device):
        if int(last.max()) - recent < sink:
            continue  # nothing is distant for any of these queries
        q_pos = torch.minimum(first[:, None] + torch.arange(tokens.shape[1], device=q.device),
                              last[:, None])
        out[tokens] = row_mass(q[tokens], keys, summary, rows, q_pos, first, last, sink,
                               recent, scale)
    return out
