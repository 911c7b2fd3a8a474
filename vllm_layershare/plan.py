"""Turn the model's per-layer specs into the layershare layout (see layout.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from vllm_layershare.layout import (
    COMPANION_SUFFIX,
    SCORES_SUFFIX,
    SUMMARY_SUFFIX,
    follower_specs,
    scores_spec,
    summary_spec,
)
from vllm_layershare.settings import config_for, runs_triton

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger("vllm." + __name__)  # under vLLM's log handlers


class CompanionCache(AttentionLayerBase):
    """A weightless stand-in layer that owns one of a follower's extra caches."""

    def __init__(self, layer_name: str, backend: type, spec: KVCacheSpec) -> None:
        self.layer_name = layer_name
        self.backend = backend
        self.spec = spec
        self.kv_cache = None

    def get_attn_backend(self) -> type:
        return self.backend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return self.spec


def split_follower_specs(
    vllm_config: VllmConfig, specs: dict[str, KVCacheSpec]
) -> dict[str, KVCacheSpec]:
    """Give each follower a V-only spec and register its companions (key window, and
    mean-key summaries when the distant mass is estimated); give each leader with
    followers a scores companion when the GPU kernels share scores."""
    config = config_for(vllm_config)
    context = vllm_config.compilation_config.static_forward_context
    share_scores = config.share == "scores" and runs_triton(vllm_config)
    heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    result: dict[str, KVCacheSpec] = {}
    for name, spec in specs.items():
        if name.endswith((COMPANION_SUFFIX, SUMMARY_SUFFIX, SCORES_SUFFIX)):
            continue  # rebuilt below when asked again
        index = extract_layer_index(name)
        companions: dict[str, KVCacheSpec | None] = {}
        if not config.is_follower(index):
            result[name] = spec
            if share_scores and config.has_followers(index) and isinstance(
                    spec, FullAttentionSpec):
                companions[name + SCORES_SUFFIX] = _scores_spec(spec, heads)
        elif not isinstance(spec, FullAttentionSpec):
            raise ValueError(f"layershare: layer {name} is not full attention ({spec}).")
        else:
            values, keys = follower_specs(spec, config)
            result[name] = values
            companions[name + COMPANION_SUFFIX] = keys
            if config.estimates_mass:
                companions[name + SUMMARY_SUFFIX] = summary_spec(spec, config)
        backend = context[name].get_attn_backend()
        for companion, companion_spec in companions.items():
            if companion_spec is None:
                continue
            context[companion] = CompanionCache(companion, backend, companion_spec)
            result[companion] = companion_spec
    return result


def _scores_spec(full: FullAttentionSpec, heads: int) -> KVCacheSpec | None:
    """The scores companion's spec, logged once; None (the leader then keeps its scores
    outside vLLM's plan) when the page size does not allow one."""
    group = heads // full.num_kv_heads
    spec = scores_spec(full, group)
    if spec is None:
        logger.warning_once("layershare: a page of %d bytes holds no whole number of tokens' "
                            "decode scores (%d terms per KV head): leaders keep them outside "
                            "vLLM's KV plan", full.page_size_bytes, group)
    else:
        logger.info_once("layershare: leaders' shared decode scores are in vLLM's KV plan: "
                         "%.1f%% of a leader's K+V bytes",
                         100 * spec.state_content_bytes / full.state_content_size_bytes)
    return spec
