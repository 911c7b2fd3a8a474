"""Glue between vLLM's configuration and the grouping file: load once, check early."""

from __future__ import annotations

import math
import os
from functools import cache
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger

from vllm_layershare.attention import native
from vllm_layershare.config import (
    ENV_VAR,
    LayershareConfig,
    LayershareConfigError,
    config_path_from,
    load_config,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger("vllm." + __name__)  # under vLLM's log handlers

SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
# Forces one attention implementation (native | triton | portable); triton on CPU
# tensors runs in Triton's interpreter (TRITON_INTERPRET=1): the engine tests use it.
KERNELS_ENV = "VLLM_LAYERSHARE_KERNELS"
PATHS = ("native", "triton", "portable")
# "1": let vLLM capture decode steps whole in CUDA graphs on the Triton path
# (experimental: the replay is tested on CPU, not yet inside vLLM on a GPU).
FULL_GRAPHS_ENV = "VLLM_LAYERSHARE_FULL_CUDA_GRAPHS"
# The Triton kernels' launch shapes: TritonConfig fields as JSON, or a file of them
# (benchmarks/kernels.py --sweep writes one); attention/tuning.py says what else applies.
TRITON_CONFIG_ENV = "VLLM_LAYERSHARE_TRITON_CONFIG"
# Ours, declared to vLLM (integration.py), which checks every VLLM_* variable it sees.
ENVIRONMENT = (ENV_VAR, KERNELS_ENV, FULL_GRAPHS_ENV, TRITON_CONFIG_ENV)
# vLLM's switch between its model runners; the backend's KV-cache layout is wired into V1.
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def forced_path() -> str | None:
    """KERNELS_ENV's path, checked; None when it is not set."""
    forced = os.environ.get(KERNELS_ENV) or None
    if forced is not None and forced not in PATHS:
        raise LayershareConfigError(f"{KERNELS_ENV}={forced!r}: expected one of "
                                    f"{', '.join(PATHS)}.")
    return forced


def attention_path(device: torch.device, head_size: int = 0) -> str:
    """Which implementation runs: KERNELS_ENV if set; else the CPU kernel where it is
    built, the Triton kernels on CUDA, the portable PyTorch path otherwise."""
    forced = forced_path()
    if forced:
        if forced == "native" and not native.available(device, head_size):
            raise ValueError(f"{KERNELS_ENV}=native, but the CPU kernel does not run here "
                             f"({native.describe()}, {device}, head size {head_size}).")
        return forced
    if native.available(device, head_size):
        return "native"
    return "triton" if device.type == "cuda" else "portable"


def runs_triton(vllm_config: VllmConfig) -> bool:
    """Whether attention will run the Triton kernels on this platform: what the impl's
    attention_path will say on its device, known here at planning time."""
    from vllm.platforms import current_platform

    device = torch.device(current_platform.device_type)
    return attention_path(device, vllm_config.model_config.get_head_size()) == "triton"


def full_graphs_requested() -> bool:
    """FULL_GRAPHS_ENV, checked."""
    value = os.environ.get(FULL_GRAPHS_ENV, "0")
    if value not in ("0", "1"):
        raise LayershareConfigError(f"{FULL_GRAPHS_ENV}={value!r}: expected 0 or 1.")
    return value == "1"


def full_decode_graphs(vllm_config: VllmConfig) -> bool:
    """Whether the backend offers vLLM full CUDA graphs of decode steps: requested, and
    attention runs the Triton kernels (their metadata and launches are graph-safe)."""
    return full_graphs_requested() and runs_triton(vllm_config)


@cache
def _load(path: str) -> LayershareConfig:
    return load_config(path)


def config_for(vllm_config: VllmConfig) -> LayershareConfig:
    """The grouping file this vLLM instance was given (parsed once per process)."""
    return _load(config_path_from(vllm_config.additional_config))


def unsupported_features(vllm_config: VllmConfig) -> list[str]:
    """Model and engine features the method does not cover (method.md)."""
    model_config = vllm_config.model_config
    hf = model_config.hf_text_config
    found = []
    if model_config.get_sliding_window() is not None or getattr(hf, "layer_types", None) and any(
        t != "full_attention" for t in hf.layer_types
    ):
        found.append("sliding-window attention")
    if getattr(hf, "attn_logit_softcapping", None):
        found.append("attention logit softcapping")
    if getattr(hf, "alibi", False) or getattr(hf, "use_alibi", False) or hf.model_type in (
        "bloom", "mpt"
    ):
        found.append("ALiBi")
    if model_config.use_mla:
        found.append("multi-head latent attention (MLA)")
    if vllm_config.cache_config.cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        found.append(f"kv-cache dtype {vllm_config.cache_config.cache_dtype}")
    if vllm_config.speculative_config is not None:
        found.append("speculative decoding")
    return found


def check_vllm_config(vllm_config: VllmConfig) -> LayershareConfig:
    """Validate the grouping against the model, adjust vLLM settings, log the plan."""
    config = config_for(vllm_config)
    model_config = vllm_config.model_config
    config.check_model(model_config.hf_text_config.num_hidden_layers,
                       unsupported_features(vllm_config),
                       model_config.hf_text_config.num_attention_heads)
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        # Sink-keeping key windows have no prefix-cache hit rule in vLLM yet.
        logger.warning("layershare: prefix caching is not supported yet; turning it off.")
        cache_config.enable_prefix_caching = False
    _use_v1_model_runner(vllm_config)
    _check_full_graphs(vllm_config)
    _check_launch_shapes(vllm_config)
    logger.info(config.describe(model_config.max_model_len, score_fraction(vllm_config)))
    return config


def _use_v1_model_runner(vllm_config: VllmConfig) -> None:
    """vLLM 0.32 runs GPUs on its V2 model runner by default, but the backend's KV-cache
    layout (followers' split caches, integration.py) is wired into the V1 runner's KV
    specs: choose V1 where vLLM would choose V2, refuse where the user asked for V2.
    Set in the environment, before vLLM starts its engine processes, which read it."""
    if not vllm_config.use_v2_model_runner:
        return
    if os.environ.get(RUNNER_ENV) is None:
        os.environ[RUNNER_ENV] = "0"
        if not vllm_config.use_v2_model_runner:
            logger.info("layershare: using vLLM's V1 model runner (%s=0): the backend's "
                        "KV-cache layout is wired into it.", RUNNER_ENV)
            return
    raise LayershareConfigError(
        f"layershare runs on vLLM's V1 model runner, but this configuration needs V2 "
        f"({RUNNER_ENV}={os.environ[RUNNER_ENV]}; HiSparse and watermarking need V2 too). "
        f"Fix: unset {RUNNER_ENV} or set it to 0, without V2-only features.")


def _check_full_graphs(vllm_config: VllmConfig) -> None:
    """Say what FULL_GRAPHS_ENV does here; where it applies, one eager warm-up run per
    captured size, so that each layer's first forward (its one-time set-up, the Triton
    compiles) runs outside the capture."""
    if not full_graphs_requested():
        return
    if not full_decode_graphs(vllm_config):
        logger.warning("layershare: %s=1 has no effect: attention does not run the Triton "
                       "kernels on this platform.", FULL_GRAPHS_ENV)
        return
    compilation = vllm_config.compilation_config
    compilation.cudagraph_num_of_warmups = max(1, compilation.cudagraph_num_of_warmups)
    logger.warning("layershare: decode steps may be captured whole in CUDA graphs "
                   "(experimental: tested by replay on CPU, not yet inside vLLM on a GPU).")


def _check_launch_shapes(vllm_config: VllmConfig) -> None:
    """Read TRITON_CONFIG_ENV at start-up, so that a mistake in it stops `vllm serve` with
    its message before any model loads; the workers read it again (tuning.py)."""
    setting = os.environ.get(TRITON_CONFIG_ENV)
    if not setting:
        return
    if not runs_triton(vllm_config):
        logger.warning("layershare: %s has no effect: attention does not run the Triton "
                       "kernels on this platform.", TRITON_CONFIG_ENV)
        return
    from vllm_layershare.attention import tuning

    try:
        tuning.from_setting(setting, TRITON_CONFIG_ENV)
    except ValueError as error:  # `vllm serve` prints a LayershareConfigError as one line
        raise LayershareConfigError(str(error)) from None


def score_fraction(vllm_config: VllmConfig) -> float:
    """A leader's shared decode logits (share `scores`, GPU kernels) as a fraction of a
    full layer's K+V bytes: one float32 per query head against K and V per KV head."""
    config = config_for(vllm_config)
    if config.share != "scores" or not runs_triton(vllm_config):
        return 0.0
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    group = (model_config.get_num_attention_heads(parallel)
             // model_config.get_num_kv_heads(parallel))
    cache_dtype = vllm_config.cache_config.cache_dtype
    item = 2 if cache_dtype in ("float16", "bfloat16") else model_config.dtype.itemsize
    return group * 4 / (2 * model_config.get_head_size() * item)


def check_block_size(vllm_config: VllmConfig) -> None:
    """Summaries must tile the follower key blocks (2 x block size), once it is known."""
    config = config_for(vllm_config)
    block_size = vllm_config.cache_config.block_size
    if not config.estimates_mass or block_size is None:
        return
    key_block = 2 * block_size
    if key_block % config.summary_tokens:
        raise LayershareConfigError(
            f"layershare config {config.source}: key 'summary_tokens' is "
            f"{config.summary_tokens} but must divide the follower key block of {key_block} "
            f"tokens (2 x block size {block_size}). Fix: use a divisor of {key_block}, "
            f"e.g. {math.gcd(key_block, config.summary_tokens)}."
        )
