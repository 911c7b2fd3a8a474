"""The pictures of calibration and evaluation (matplotlib, written as PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

DAMAGE_LABELS = {"output": "relative change of the follower's attention output",
                 "next-token": "KL change of the next-token distribution (nats)"}


def similarity_heatmap(matrix, groups: Sequence[Sequence[int]], title: str, out: Path,
                       measure: str = "similarity") -> None:
    """Layer-by-layer similarity (or a damage measure: `output`, `next-token`) with
    each chosen group outlined."""
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(7, 6))
    if measure == "similarity":
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        label = "1 - JSD (distant-token attention)"
    else:  # damage(leader a, follower l), a < l: the upper triangle
        image = ax.imshow(matrix, vmin=0.0, cmap="magma_r")
        label = DAMAGE_LABELS[measure]
    for group in groups:
        ax.add_patch(Rectangle((group[0] - 0.5, group[0] - 0.5), len(group), len(group),
                               fill=False, edgecolor="red", linewidth=2))
    ticks = range(0, n, max(1, n // 15))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    _save(fig, out)


def needle_heatmap(accuracy: dict[str, dict[int, dict[int, float]]], out: Path) -> None:
    """Needle accuracy per (haystack length, depth), one panel per backend."""
    names = list(accuracy)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.5, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        lengths = sorted(accuracy[name])
        depths = sorted(next(iter(accuracy[name].values())))
        grid = [[accuracy[name][n][d] for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for y, row in enumerate(grid):
            for x, value in enumerate(row):
                ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths], fontsize=7)
        ax.set_xlabel("haystack tokens", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        ax.set_title(name, fontsize=8)
    _save(fig, out)


def frontier(points: Sequence[dict], out: Path) -> None:
    """KV saving (x) against quality change (y), stock at the origin; two panels and
    one legend (names as labels overlap where points share a saving)."""
    legend_rows = -(-len(points) // 3)
    height = 4.2 + 0.22 * legend_rows  # inches; the legend's rows go below the panels
    fig, (ppl_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, height))
    markers = "osD^vP*Xph<>"
    for ax, key, label in (
        (ppl_ax, "perplexity_change", "perplexity change (%)"),
        (acc_ax, "retrieval_change", "retrieval accuracy change (points)"),
    ):
        for index, point in enumerate(points):
            ax.scatter(100 * point["kv_saving"], point[key], s=40, label=point["name"],
                       marker=markers[index % len(markers)], color=f"C{index % 10}")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("KV bytes saved at equal memory (%, vLLM's plan)")
        ax.set_ylabel(label)
    ppl_ax.set_yscale("symlog", linthresh=10)  # a failed gate can cost +1000%
    ppl_ax.axhline(3.0, color="red", linestyle="--", linewidth=0.8)  # the quality bar
    acc_ax.axhline(-5.0, color="red", linestyle="--", linewidth=0.8)
    fig.legend(*ppl_ax.get_legend_handles_labels(), loc="lower center",
               ncol=min(3, len(points)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.22 * legend_rows + 0.15) / height, 1, 1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _save(fig, out: Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
