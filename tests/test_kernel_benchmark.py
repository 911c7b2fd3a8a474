"""benchmarks/kernels.py runs on a bare GPU machine, rarely at hand: keep it working by
running its smoke shapes here (Triton's interpreter on CPU without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    rows = smoke_rows(starts=("| decode", "| prefill", "| follower", "| full"))
    measured, targets = rows[:2], {row[0]: row[1:] for row in rows[2:]}
    assert [row[0] for row in measured] == ["decode", "prefill"], rows
    for row in measured:
        assert ratio(row[6]) > 0, row  # follower / full
        assert ratio(row[12].split("(")[1].rstrip(")")) > 0, row  # estimated mass / full
    # the estimated mass with every request completing a mean key: decode rows only
    assert ratio(measured[0][14].split("(")[1].rstrip(")")) > 0, measured
    assert measured[1][14] == "-", measured
    # the targets: the smoke shapes have no 32K rows, one prefill row
    assert len(targets) == 6, targets
    assert targets["follower decode <= 0.6x full, 32K, batch >= 16"] == [
        "0", "-", "not in this run"], targets
    worst = targets["follower prefill <= 1.3x full"]
    assert worst == ["1", measured[1][6], "yes" if ratio(worst[1]) <= 1.3 else "no"], targets


def test_targets_take_the_worst_of_their_rows():
    """The issue's targets are read off the benchmark's rows: a target holds if its
    worst row does; rows outside its contexts and batches do not count."""
    sys.path.insert(0, str(SCRIPT.parent))
    import kernels

    def row(case, context, batch, follower, copy=80.0):
        return {"case": case, "context": context, "batch": batch, "follower/full": follower,
                "estimated/full": follower + 0.05, "full % copy": copy,
                "follower % copy": copy - 10}

    rows = [row("decode", 32768, 16, 0.58), row("decode", 32768, 64, 0.55, copy=78),
            row("decode", 32768, 1, 0.9, copy=20), row("decode", 4096, 16, 0.8),
            row("prefill", 4096, 1, 1.25), row("prefill", 32768, 1, 1.1)]
    table = {line.split(" | ")[0][2:]: line.split(" | ")[1:]
             for line in kernels.target_table(rows)[2:]}
    assert table["follower decode <= 0.6x full, 32K, batch >= 16"] == ["2", "0.58x", "yes |"]
    assert table["full decode >= 70% of copy bandwidth, 32K, batch >= 16"] == [
        "2", "78%", "yes |"]
    assert table["follower decode >= 70% of copy bandwidth, 32K, batch >= 16"] == [
        "2", "68%", "no |"]
    assert table["follower prefill <= 1.3x full"] == ["2", "1.25x", "yes |"]


def test_decode_requests_sit_at_different_points_of_their_mean_key_blocks():
    """A real decode step has few requests completing a mean-key block (a follower with
    the estimated mass then writes one): the benchmark's decode batch has one in SUMMARY,
    its worst case (aligned_lens) all, and prefill the context as asked."""
    sys.path.insert(0, str(SCRIPT.parent))
    import kernels

    cpu, batch, context = torch.device("cpu"), 70, 2 * kernels.SUMMARY
    lens = kernels.paged_layer(batch, context, 1, cpu, torch.float32)[-1]
    assert lens.max() == context and lens.min() == context - kernels.SUMMARY + 1, lens
    completing = (lens % kernels.SUMMARY == 0).nonzero().flatten().tolist()
    assert completing == [0, kernels.SUMMARY], lens
    assert (kernels.aligned_lens(batch, context, cpu) % kernels.SUMMARY == 0).all()
    assert kernels.paged_layer(1, context, 8, cpu, torch.float32)[-1].tolist() == [context]


def test_step_benchmark_smoke_runs():
    """--steps: a group's whole decode step against as many full layers (the CUDA-graph
    columns need a GPU)."""
    rows = smoke_rows("--steps", starts=("| 192 |",))
    assert len(rows) == 1, rows
    assert ratio(rows[0][4]) > 0, rows  # group / full, eager
    assert (rows[0][5] == "-") == (not torch.cuda.is_available()), rows
    assert ratio(rows[0][9].split("(")[1].rstrip(")")) > 0, rows  # estimated mass, eager


def test_sweep_writes_the_fastest_shapes_that_the_benchmark_takes(tmp_path):
    """make gpu-check sweeps the launch shapes, then benchmarks with the fastest: the file
    --sweep writes holds one decode and one prefill shape of the sweep, and --config and
    --steps --config run with it."""
    swept = tmp_path / "swept.json"
    shapes = [dict(decode_block_n=n, decode_warps=4, decode_stages=2, programs_per_sm=32)
              for n in (16, 32)]
    rows = smoke_rows("--sweep", str(swept), "--shapes", json.dumps(shapes), starts=("| {",))
    assert len(rows) == 2 + 3, rows  # the shapes on the decode case, SWEEP_PREFILL
    assert all(float(cell) > 0 for row in rows for cell in row[1:]), rows
    best = json.loads(swept.read_text())
    assert set(best) == {"decode_block_n", "decode_warps", "decode_stages", "programs_per_sm",
                         "scores_decode_stages", "scores_programs_per_sm", "prefill_block_m",
                         "prefill_block_n", "prefill_warps", "prefill_stages"}, best
    # the file is a launch setting the backend takes (VLLM_LAYERSHARE_TRITON_CONFIG)
    from vllm_layershare.attention import tuning

    config = tuning.from_setting(str(swept))
    assert {field: getattr(config, field) for field in best} == best, (config, best)
    assert len(smoke_rows("--config", str(swept), starts=("| decode",))) == 1
    steps = smoke_rows("--steps", "--config", str(swept), starts=("| 192 |",))
    assert len(steps) == 1 and ratio(steps[0][4]) > 0, steps


def test_sweep_gives_followers_reading_shared_scores_their_own_stages_and_splits():
    """The sweep times each decode shape with one pipeline depth and one number of
    programs per SM for every role. Among shapes that differ in those two fields only, a
    leader (alone and writing shared scores) takes the stages and programs per SM it runs
    fastest with, the followers reading shared scores (estimated mass or not) theirs;
    the other fields (the tile, the fused merge) are shared by every role, so they are
    chosen by all the roles' time. A shape that leaves a field out has the default."""
    sys.path.insert(0, str(SCRIPT.parent))
    import kernels

    def shape(stages: int, programs: int, block_n: int = 32) -> str:
        return json.dumps(dict(decode_block_n=block_n, decode_warps=4, decode_stages=stages,
                               programs_per_sm=programs))

    def times(by_shape: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        # per role: full, writing, follower (shared scores alone), estimated
        return {key: dict(zip(kernels.SWEEP_ROLES, ms, strict=True))
                for key, ms in by_shape.items()}

    totals = {shape(2, 32): [1.0, 1.1, 0.9, 0.8], shape(3, 32): [1.1, 1.1, 0.7, 0.7],
              shape(4, 16): [1.05, 1.1, 0.5, 0.5], shape(2, 16): [1.2, 1.1, 0.9, 0.8],
              shape(2, 32, 64): [1.5, 1.5, 0.4, 0.4]}  # 3.8 ms against 2.1 + 1.0
    best = kernels.fastest(times(totals), decode=True)
    assert best == dict(json.loads(shape(2, 32)), scores_decode_stages=4,
                        scores_programs_per_sm=16)
    # a shared option slower for the leaders wins by its followers: 2.15 + 0.6 ms
    fused = dict(json.loads(shape(3, 32)), fused_merge=True)
    totals[json.dumps(fused)] = [1.05, 1.1, 0.3, 0.3]
    assert kernels.fastest(times(totals), decode=True) == dict(
        fused, scores_decode_stages=3, scores_programs_per_sm=32)
    partial = {"{}": [1.0, 1.0, 0.8, 0.8], '{"programs_per_sm": 16}': [1.1, 1.1, 0.6, 0.6],
               '{"decode_block_n": 64}': [1.5, 1.5, 0.4, 0.4]}
    assert kernels.fastest(times(partial), decode=True) == {
        "scores_decode_stages": kernels.DEFAULT_CONFIG.decode_stages,
        "scores_programs_per_sm": 16}
    config = kernels.shape_config(json.loads(shape(4, 16)))
    assert (config.scores_decode_stages, config.scores_programs_per_sm) == (4, 16)
    prefill = {json.dumps(dict(prefill_stages=n)): dict.fromkeys(kernels.SWEEP_ROLES, 3.0 - n)
               for n in (2, 3)}
    assert kernels.fastest(prefill, decode=False) == {"prefill_stages": 3}


@pytest.mark.parametrize("config", [[], ["--config", '{"fused_merge": true}']],
                         ids=["defaults", "fused_merge"])
def test_host_overhead_benchmark_runs_with_stubbed_launches(config):
    """benchmarks/host_overhead.py --stub: the backend's Python per decode call, each role,
    with the default launch shapes or a given config."""
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "host_overhead.py"), "--stub",
                           "--calls", "20", *config], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"fused_merge={bool(config)}" in done.stdout, done.stdout
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0] for row in rows[1:]] == ["full", "writing", "follower", "estimated"], rows
    assert all(float(row[1]) > 0 for row in rows[1:]), rows
