"""Shared fixtures: a tiny random Llama built offline, grouping files, in-process vLLM."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import yaml

# In-process engine: plugin code runs in the test process and starts in seconds.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton
# reads this when it is first imported, so it is set before anything imports it; vLLM
# on CPU does not use Triton, with or without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NUM_LAYERS = 6


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vllm_layershare.tools.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", NUM_LAYERS)


def write_grouping(path: Path, **overrides) -> Path:
    """A grouping file for the tiny model; keys may be overridden or set to None to drop."""
    raw = {
        "num_layers": NUM_LAYERS, "sink_tokens": 4, "recent_tokens": 16, "share": "scores",
        "gate_skip_threshold": None, "groups": [[0, 1, 2], [3, 4, 5]],
    }
    raw.update(overrides)
    path.write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not ...}))
    return path


def make_llm(model: Path, grouping: Path | None, **kwargs):
    """An in-process vLLM engine, layershare when a grouping is given, else stock."""
    from vllm import LLM

    args = dict(
        model=str(model), dtype="float32", kv_cache_memory_bytes=32 << 20,
        distributed_executor_backend="uni", max_model_len=1024, block_size=32,
        enforce_eager=True, seed=0,
    )
    if grouping is not None:
        args["attention_backend"] = "layershare"
        args["additional_config"] = {"layershare": {"config": str(grouping)}}
    args.update(kwargs)
    return LLM(**args)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
