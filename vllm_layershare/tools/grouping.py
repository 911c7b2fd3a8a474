"""Forming consecutive layer groups from a similarity matrix, and writing the file.

The rule of the paper: walk the layers in order; a layer joins the current group
while its similarity to the group's leader is >= the threshold, else it leads a new
group. A target KV saving picks the highest threshold whose groups reach it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_layershare.config import LayershareConfig

Groups = list[list[int]]


def greedy_groups(similarity: torch.Tensor, threshold: float,
                  max_group_size: int | None = None) -> Groups:
    """Consecutive groups: follow the leader while S(leader, layer) >= threshold."""
    groups: Groups = [[0]]
    for layer in range(1, similarity.shape[0]):
        group = groups[-1]
        full = max_group_size is not None and len(group) >= max_group_size
        if not full and float(similarity[group[0], layer]) >= threshold:
            group.append(layer)
        else:
            groups.append([layer])
    return groups


def kv_saving(groups: Sequence[Sequence[int]], sink: int, recent: int, context: int,
              summary_tokens: int | None = None) -> float:
    """Fraction of KV bytes saved at `context` tokens (method.md's formula); with
    `summary_tokens`, the followers' mean-key summaries are paid for."""
    config = LayershareConfig(
        num_layers=sum(len(g) for g in groups), sink_tokens=sink, recent_tokens=recent,
        share="scores", groups=tuple(tuple(g) for g in groups),
        distant_mass="leader" if summary_tokens is None else "estimated",
        summary_tokens=summary_tokens or 1,
    )
    return 1.0 - config.kv_fraction(context)


def groups_for_saving(similarity: torch.Tensor, target: float, sink: int, recent: int,
                      context: int, max_group_size: int | None = None,
                      summary_tokens: int | None = None) -> tuple[Groups, float]:
    """The highest threshold whose greedy groups save >= `target`; (groups, threshold)."""
    n = similarity.shape[0]
    upper = similarity[torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)]
    # Groups only change where the threshold crosses one of the measured similarities.
    for threshold in sorted({round(float(s), 6) for s in upper}, reverse=True):
        groups = greedy_groups(similarity, threshold, max_group_size)
        if kv_saving(groups, sink, recent, context, summary_tokens) >= target:
            return groups, threshold
    most = kv_saving(greedy_groups(similarity, -1.0, max_group_size), sink, recent, context,
                     summary_tokens)
    raise ValueError(
        f"no grouping saves {target:.1%} of KV bytes at {context} tokens with sink "
        f"{sink} + recent {recent}; the most possible is {most:.1%}. Fix: lower "
        "--target-saving, or shorten --recent, or raise --max-group-size."
    )


def grouping_yaml(groups: Groups, similarity: torch.Tensor, sink: int, recent: int,
                  share: str, header: Sequence[str], summary_tokens: int | None = None) -> str:
    """A grouping file in the backend's schema; measured similarities as comments."""
    lines = [f"# {line}" if line else "#" for line in header]
    lines += [
        f"num_layers: {sum(len(g) for g in groups)}",
        f"sink_tokens: {sink}",
        f"recent_tokens: {recent}",
        f"share: {share}",
        "gate_skip_threshold: null",
    ]
    if summary_tokens is not None:
        lines += ["distant_mass: estimated", f"summary_tokens: {summary_tokens}"]
    lines.append("groups:")
    for group in groups:
        entry = f"  - [{', '.join(str(i) for i in group)}]"
        if len(group) > 1:
            scores = " ".join(f"{i}:{float(similarity[group[0], i]):.3f}" for i in group[1:])
            entry = f"{entry}  # similarity to leader {group[0]}: {scores}"
        lines.append(entry)
    return "\n".join(lines) + "\n"
