"""Registration with vLLM and the few patches it needs, all in one place.

Each patch is idempotent, wraps one vLLM function, and says why no hook exists.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from vllm_layershare.config import LayershareConfigError

logger = init_logger("vllm." + __name__)  # under vLLM's log handlers

BACKEND_PATH = "vllm_layershare.backend.LayershareBackend"
ALIAS = "LAYERSHARE"
_PATCHED = "_layershare_patched"


def selected(vllm_config: Any) -> bool:
    """Whether this vLLM instance asked for the layershare backend."""
    attention = getattr(vllm_config, "attention_config", None)
    return getattr(attention, "backend", None) is AttentionBackendEnum.CUSTOM and (
        AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    )


def _wrap(owner: Any, name: str, make) -> None:
    """Replace owner.name (owner: a class or module) by make(original) once."""
    original = owner.__dict__[name]
    func = original.__func__ if isinstance(original, classmethod) else original
    if getattr(func, _PATCHED, False):
        return
    wrapped = make(func)
    functools.update_wrapper(wrapped, func)
    setattr(wrapped, _PATCHED, True)
    setattr(owner, name, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)


def _register_name() -> None:
    # A new enum member would not survive pickling into spawned engine processes
    # before plugins load there; an alias of CUSTOM does (docs/vllm-0.32.md).
    AttentionBackendEnum._member_map_[ALIAS] = AttentionBackendEnum.CUSTOM
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def _register_environment() -> None:
    # vLLM warns about every VLLM_* variable missing from envs.environment_variables, and
    # refuses it with --fail-on-environ-validation; plugins have no hook to declare theirs.
    from vllm import envs

    from vllm_layershare.settings import ENVIRONMENT

    for name in ENVIRONMENT:
        envs.environment_variables.setdefault(name, functools.partial(os.environ.get, name))


def _patch_cpu_backend_choice() -> None:
    # CpuPlatform.get_attn_backend_cls ignores any selected backend (no hook).
    from vllm.platforms.cpu import CpuPlatform

    def make(original):
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
            if selected_backend is AttentionBackendEnum.CUSTOM:
                return AttentionBackendEnum.CUSTOM.get_path()
            return original(cls, selected_backend, attn_selector_config, *args, **kwargs)
        return get_attn_backend_cls

    _wrap(CpuPlatform, "get_attn_backend_cls", make)


def _patch_config_check() -> None:
    # Platform.check_and_update_config is the first point where model and backend are
    # both known, in the process that parses the CLI, before any engine starts.
    from vllm.platforms import current_platform

    def make(original):
        def check_and_update_config(cls, vllm_config):
            if not selected(vllm_config) or vllm_config.model_config is None:
                return original(cls, vllm_config)
            from vllm_layershare.settings import check_block_size, check_vllm_config

            try:
                check_vllm_config(vllm_config)
                result = original(cls, vllm_config)
                check_block_size(vllm_config)  # the platform has chosen the block size
            except LayershareConfigError as exc:
                if "vllm.entrypoints.cli.main" not in sys.modules:
                    raise
                # `vllm serve`: one clear line, not a traceback through pydantic.
                logger.error("%s", exc)
                raise SystemExit(1) from None
            return result
        return check_and_update_config

    for owner in type(current_platform).__mro__:
        if "check_and_update_config" in owner.__dict__:
            _wrap(owner, "check_and_update_config", make)
            return


def _patch_kv_cache_specs() -> None:
    # GPUModelRunner.get_kv_cache_spec asks each layer for one spec; a follower
    # needs two caches (values, and a key window), which no layer hook can declare.
    # V1's runner, which settings.py selects (vLLM 0.32 would run GPUs on V2).
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def get_kv_cache_spec(self):
            specs = original(self)
            if selected(self.vllm_config):
                from vllm_layershare.plan import split_follower_specs

                specs = split_follower_specs(self.vllm_config, specs)
            return specs
        return get_kv_cache_spec

    _wrap(GPUModelRunner, "get_kv_cache_spec", make)


def _patch_kv_cache_grouping() -> None:
    # kv_cache_utils._get_kv_cache_groups_uniform_page_size sizes groups by the
    # smallest layer type (vLLM's FIXME: n:1 hybrid patterns only), which pads uneven
    # calibrated groupings with unused layers; no hook chooses the group size.
    from vllm.v1.core import kv_cache_utils

    def make(original):
        def grouped(kv_cache_spec, *args, **kwargs):
            from vllm_layershare.layout import COMPANION_SUFFIX, kv_cache_group_layers

            if not any(name.endswith(COMPANION_SUFFIX) for name in kv_cache_spec):
                return original(kv_cache_spec, *args, **kwargs)
            return kv_cache_utils.create_kv_cache_group_specs(
                kv_cache_spec, kv_cache_group_layers(kv_cache_spec))
        return grouped

    _wrap(kv_cache_utils, "_get_kv_cache_groups_uniform_page_size", make)


def register() -> None:
    """vllm.general_plugins entry point; runs in every vLLM process."""
    _register_name()
    _register_environment()
    from vllm_layershare.layout import register_specs

    register_specs()
    _patch_cpu_backend_choice()
    _patch_config_check()
    _patch_kv_cache_specs()
    _patch_kv_cache_grouping()
    _patch_kernel_warmup()


def _patch_kernel_warmup() -> None:
    # gpu_worker.kernel_warmup runs a batch through attention before CUDA-graph capture
    # for FlashInfer alone (it checks the backend's name), so without this the Triton
    # kernels would compile at the first request, tens of seconds on a fresh machine.
    from vllm.v1.worker import gpu_worker

    def make(original):
        def kernel_warmup(worker, *args, **kwargs):
            original(worker, *args, **kwargs)
            if selected(worker.vllm_config):
                warm_up_triton_kernels(worker)
        return kernel_warmup

    _wrap(gpu_worker, "kernel_warmup", make)


def warm_up_triton_kernels(worker: Any) -> None:
    """Compile the backend's Triton kernels at start-up (nothing on other paths): a
    dummy batch of prefill chunks and decode rows, then one of decode rows alone, whose
    followers take other kernels (the leader's shared scores only, summaries written in
    the decode merge). Dummy batches write no cache slot (vLLM's slot mapping is -1)."""
    from vllm.config import CUDAGraphMode

    from vllm_layershare.settings import runs_triton

    runner = worker.model_runner
    if runner.is_pooling_model or not runs_triton(worker.vllm_config):
        return
    scheduler = worker.vllm_config.scheduler_config
    tokens = min(16, scheduler.max_num_batched_tokens, worker.model_config.max_model_len)
    start = time.perf_counter()
    for batch in (dict(num_tokens=tokens, create_mixed_batch=True),
                  dict(num_tokens=min(tokens, scheduler.max_num_seqs), uniform_decode=True)):
        runner._dummy_run(**batch, cudagraph_runtime_mode=CUDAGraphMode.NONE,
                          force_attention=True, is_profile=True, skip_eplb=True)
    logger.info("layershare: Triton kernels compiled and run in %.1f s (a mixed and a "
                "decode batch)", time.perf_counter() - start)
