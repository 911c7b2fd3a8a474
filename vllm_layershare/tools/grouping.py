"""Forming consecutive layer groups from measurements, and writing the file.

- similarity (the paper's rule): walk the layers in order; a layer joins the current
  group while its similarity to the group's leader is >= the threshold, else it leads
  a new group. A target KV saving picks the highest threshold whose groups reach it.
- damage: the consecutive groups with the fewest followers that reach the target
  saving, chosen to minimise the summed damage(leader, follower), by dynamic
  programming over segments (every follower saves the same bytes).
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


def min_damage_groups(damage: torch.Tensor, followers: int,
                      max_group_size: int | None = None) -> tuple[Groups, float] | None:
    """Consecutive groups with exactly `followers` followers and the least total
    damage; None when `max_group_size` makes that impossible."""
    n = damage.shape[0]
    largest = max_group_size or n
    inf = float("inf")
    # best[i][f]: least damage covering layers 0..i-1 with f followers; via[i][f]: group start
    best = [[inf] * (followers + 1) for _ in range(n + 1)]
    via = [[-1] * (followers + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for end in range(1, n + 1):
        for start in range(max(0, end - largest), end):
            cost = float(damage[start, start + 1:end].sum())
            extra = end - start - 1
            for f in range(extra, followers + 1):
                total = best[start][f - extra] + cost
                if total < best[end][f]:
                    best[end][f], via[end][f] = total, start
    if best[n][followers] == inf:
        return None
    groups, end, f = [], n, followers
    while end > 0:
        start = via[end][f]
        groups.append(list(range(start, end)))
        f -= end - start - 1
        end = start
    return groups[::-1], best[n][followers]


def damage_groups_for_saving(damage: torch.Tensor, target: float, sink: int, recent: int,
                             context: int, max_group_size: int | None = None,
                             summary_tokens: int | None = None) -> tuple[Groups, float]:
    """The least-damage groups with the fewest followers that save >= `target`;
    (groups, total damage)."""
    n = damage.shape[0]
    for followers in range(n):
        shape = [list(range(followers + 1))] + [[i] for i in range(followers + 1, n)]
        if kv_saving(shape, sink, recent, context, summary_tokens) < target:
            continue
        found = min_damage_groups(damage, followers, max_group_size)
        if found is not None:
            return found
    raise ValueError(
        f"no grouping saves {target:.1%} of KV bytes at {context} tokens with sink "
        f"{sink} + recent {recent}. Fix: lower --target-saving, or shorten --recent, or "
        "raise --max-group-size."
    )


def grouping_yaml(groups: Groups, measured: torch.Tensor, sink: int, recent: int,
                  share: str, header: Sequence[str], summary_tokens: int | None = None,
                  measure: str = "similarity", offsets: torch.Tensor | None = None) -> str:
    """A grouping file in the backend's schema; each follower's measurement against its
    leader (`measure`: similarity or damage) as comments; with `offsets` [N, H], the
    followers' summary offsets."""
    lines = [f"# {line}" if line else "#" for line in header]
    lines += [
        f"num_layers: {sum(len(g) for g in groups)}",
        f"sink_tokens: {sink}",
        f"recent_tokens: {recent}",
        f"share: {share}",
        "gate_skip_threshold: null",
    ]
    # The mass is always written out: a file means the same whatever the default.
    if summary_tokens is None:
        lines.append("distant_mass: leader")
    else:
        lines += ["distant_mass: estimated", f"summary_tokens: {summary_tokens}"]
    lines.append("groups:")
    for group in groups:
        entry = f"  - [{', '.join(str(i) for i in group)}]"
        if len(group) > 1:
            scores = " ".join(f"{i}:{float(measured[group[0], i]):.3g}" for i in group[1:])
            entry = f"{entry}  # {measure} to leader {group[0]}: {scores}"
        lines.append(entry)
    followers = [i for g in groups for i in g[1:]]
    if offsets is not None and summary_tokens is not None and followers:
        lines.append("summary_offsets:  # per follower and query head, fitted by calibration")
        lines += [f"  {i}: [{', '.join(f'{float(x):.3f}' for x in offsets[i])}]"
                  for i in followers]
    return "\n".join(lines) + "\n"
