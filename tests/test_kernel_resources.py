"""Every Triton kernel the backend launches compiles for the GPUs it serves on, here,
without a GPU: benchmarks/kernel_resources.py runs Triton's compiler and ptxas for
sm_90 (H100, H200) through the backend's own calls. This catches what the interpreter
cannot: a kernel that does not compile for a GPU, spills registers, needs more shared
memory than a multiprocessor has, or runs its dots in another type than the cache's."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

from vllm_layershare import attention
from vllm_layershare.attention import triton_paged

# Every module of the Triton kernels (attention/triton_*.py): their kernels must all show.
TRITON_MODULES = [importlib.import_module(f"{attention.__name__}.{module.name}")
                  for module in pkgutil.iter_modules(attention.__path__)
                  if module.name.startswith("triton_")]
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
PHASE_ROLES = {"prefill": ["full", "follower keys", "follower keys, estimated"],
               "decode": ["full", "full+share", "follower keys", "follower keys, estimated",
                          "follower scores", "follower scores, estimated"]}
DOT_TYPE = {"bf16": "bf16", "fp16": "f16"}


def compiled_rows(tmp_path: Path, *args: str) -> list[dict]:
    """The rows of a kernel_resources.py run for sm_90 with args."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when it is unset
    out = tmp_path / "resources.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--json", str(out),
                           *args], capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    rows = compiled_rows(tmp_path)

    kernels = {name for module in TRITON_MODULES for name in vars(module)
               if name.endswith("_kernel")}
    geometries = {row["geometry"] for row in rows}
    assert len(geometries) == 3, geometries
    for geometry in geometries:
        mine = [row for row in rows if row["geometry"] == geometry]
        assert {row["kernel"] for row in mine} == kernels, geometry
        variants = {row["variant"] for row in mine}
        for phase, roles in PHASE_ROLES.items():
            assert {f"{phase}, {role}" for role in roles} <= variants, (geometry, variants)
        # The dots take the cache's type: the interpreter's float32 upcast stays there.
        dots = {row["mma"] for row in mine if row["mma"]}
        assert dots == {DOT_TYPE[geometry.split()[-1]]}, (geometry, dots)
        assert any(row["kernel"] == "_prefill_kernel" and row["mma"] for row in mine)
        assert any(row["kernel"] == "_decode_split_kernel" and row["mma"] for row in mine)
        # A prefill tile that every row keeps in full skips _scan's masks: a shorter path
        # through the scan loops (the leader's runs over all keys but the last few).
        for row in mine:
            if row["kernel"] == "_prefill_kernel":
                assert any(free < masked for free, masked in row["tile_instructions"]), row
    for row in rows:
        assert row["spilled"] == 0, row
        assert row["programs_per_sm"] >= 1, row  # its shared memory fits
        if row["kernel"] == "_decode_split_kernel" and row["variant"].startswith("decode"):
            # With 3 stages (the defaults) every decode program double-buffers its K and
            # V copies: block-table entries are read a tile ahead, so the pipeliner keeps
            # the next tiles in flight while one is computed.
            dim = 64 if row["geometry"].startswith("smollm2") else 128
            block_n = triton_paged.DEFAULT_CONFIG.decode_block_n
            assert row["buffers"] == f"2x{block_n}x{dim}", row
        assert all(free <= masked for free, masked in row["tile_instructions"]), row


def test_kernels_compile_when_query_starts_and_lengths_are_int64(tmp_path):
    """vLLM passes int32 metadata; a caller's lists become int64 tensors. The kernels read
    both as int32, so that their loop counters keep one type (Triton refuses to compile
    a loop whose carried positions change from int32 to int64; the interpreter does not
    check it)."""
    rows = compiled_rows(tmp_path, "--metadata", "int64",
                         "--only", "prefill, follower keys, estimated", "summary write")
    assert {"_prefill_kernel", "_prefill_mass_kernel", "_decode_split_kernel",
            "_write_summaries_kernel"} <= {
        row["kernel"] for row in rows}
