"""benchmarks/kernels.py runs on a bare GPU machine, rarely at hand: keep it working by
running its smoke shapes here (Triton's interpreter on CPU without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_kernel_benchmark_smoke_runs():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| decode", "| prefill"))]
    assert len(rows) == 2, done.stdout
    for row in rows:
        ratio = row.split("|")[7].strip()  # follower / full
        assert ratio.endswith("x") and float(ratio[:-1]) > 0, row
