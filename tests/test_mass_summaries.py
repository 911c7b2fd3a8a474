"""benchmarks/mass_summaries.py chose the shipped block summary: keep it honest."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mass_summaries.py"


def load_script():
    spec = importlib.util.spec_from_file_location("mass_summaries", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kmeans2_separates_two_clusters():
    gen = torch.Generator().manual_seed(3)
    near = torch.randn(5, 4, generator=gen) * 0.01
    far = torch.randn(3, 4, generator=gen) * 0.01 + 10.0
    keys = torch.cat([near, far])[torch.randperm(8, generator=gen)]
    centroids, counts = load_script().kmeans2(keys[None])
    order = counts[0].argsort(descending=True)
    torch.testing.assert_close(counts[0][order], torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(centroids[0][order], torch.stack([near.mean(0), far.mean(0)]))


def test_block_estimates_are_exact_for_identical_keys():
    """A block of S equal keys holds mass S exp(c q.k): every summary gets it right."""
    script = load_script()
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 8, generator=gen)
    k = torch.randn(2, 1, 8, generator=gen).expand(2, 16, 8)
    exact = torch.logsumexp(torch.einsum("hqd,htd->hqt", q, k[:, :8]) * 0.5, -1)
    for kind in script.KINDS:
        got = script.block_logits(q, k, 8, kind, 0.5)
        torch.testing.assert_close(got, exact[..., None].expand(2, 3, 2), atol=1e-5, rtol=0)


def test_runs_on_the_tiny_model(tiny_model):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model), "--windows", "2",
         "--window-tokens", "120", "--sink", "4", "--recent", "16", "--queries", "6",
         "--sizes", "4", "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines()
            if line.startswith(tuple(f"| {kind} " for kind in script_kinds()))]
    assert sorted((r[1].strip(), int(r[2])) for r in rows) == sorted(
        (kind, size) for kind in script_kinds() for size in (4, 8))
    assert all(float(r[6]) >= 0.0 for r in rows)


def script_kinds() -> tuple[str, ...]:
    return load_script().KINDS
