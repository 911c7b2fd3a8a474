"""benchmarks/kernels.py runs on a bare GPU machine, rarely at hand: keep it working by
running its smoke shapes here (Triton's interpreter on CPU without a GPU)."""

from __future__ import annotations

import json
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
        assert ratio(row[12].split("(")[1].rstrip(")")) > 0, row  # estimated mass / full


def test_step_benchmark_smoke_runs():
    """--steps: a group's whole decode step against as many full layers (the CUDA-graph
    columns need a GPU)."""
    rows = smoke_rows("--steps", starts=("| 200 |",))
    assert len(rows) == 1, rows
    assert ratio(rows[0][4]) > 0, rows  # group / full, eager
    assert (rows[0][5] == "-") == (not torch.cuda.is_available()), rows
    assert ratio(rows[0][9].split("(")[1].rstrip(")")) > 0, rows  # estimated mass, eager


def test_sweep_writes_the_fastest_shapes_that_the_benchmark_takes(tmp_path):
    """make gpu-check sweeps the launch shapes, then benchmarks with the fastest: the file
    --sweep writes holds one decode and one prefill shape of the sweep, and --config and
    --steps --config run with it."""
    swept = tmp_path / "swept.json"
    rows = smoke_rows("--sweep", str(swept), starts=("| {",))
    assert len(rows) == 6 + 3, rows  # SWEEP_DECODE on the decode case, SWEEP_PREFILL
    best = json.loads(swept.read_text())
    assert set(best) == {"decode_block_n", "decode_warps", "decode_stages", "programs_per_sm",
                         "prefill_block_m", "prefill_block_n", "prefill_warps",
                         "prefill_stages"}, best
    assert len(smoke_rows("--config", str(swept), starts=("| decode",))) == 1
    steps = smoke_rows("--steps", "--config", str(swept), starts=("| 200 |",))
    assert len(steps) == 1 and ratio(steps[0][4]) > 0, steps
