"""benchmarks/kernels.py runs on a bare GPU machine, rarely at hand: keep it working by
running its smoke shapes here (Triton's interpreter on CPU without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def smoke_rows(*args: str, starts: tuple[str, ...]) -> list[list[str]]:
    """The table rows (cells) that begin with `starts` of a --smoke run with args."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in done.stdout.splitlines() if line.startswith(starts)]


def ratio(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


def test_kernel_benchmark_smoke_runs():
    rows = smoke_rows(starts=("| decode", "| prefill"))
    assert len(rows) == 2, rows
    for row in rows:
        assert ratio(row[6]) > 0, row  # follower / full


def test_step_benchmark_smoke_runs():
    """--steps: a group's whole decode step against as many full layers (the CUDA-graph
    columns need a GPU)."""
    rows = smoke_rows("--steps", starts=("| 200 |",))
    assert len(rows) == 1, rows
    assert ratio(rows[0][4]) > 0, rows  # group / full, eager
    assert (rows[0][5] == "-") == (not torch.cuda.is_available()), rows
