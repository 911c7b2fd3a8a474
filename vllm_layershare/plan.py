"""Turn the model's per-layer specs into the layershare layout (see layout.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from vllm_layershare.layout import (
    COMPANION_SUFFIX,
    SUMMARY_SUFFIX,
    follower_specs,
    summary_spec,
)
from vllm_layershare.settings import config_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig


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
    mean-key summaries when the distant mass is estimated)."""
    config = config_for(vllm_config)
    context = vllm_config.compilation_config.static_forward_context
    result: dict[str, KVCacheSpec] = {}
    for name, spec in specs.items():
        if name.endswith((COMPANION_SUFFIX, SUMMARY_SUFFIX)):
            continue  # rebuilt below when asked again
        index = extract_layer_index(name)
        if not config.is_follower(index):
            result[name] = spec
            continue
        if not isinstance(spec, FullAttentionSpec):
            raise ValueError(f"layershare: layer {name} is not full attention ({spec}).")
        values, keys = follower_specs(spec, config)
        result[name] = values
        companions = {name + COMPANION_SUFFIX: keys}
        if config.estimates_mass:
            companions[name + SUMMARY_SUFFIX] = summary_spec(spec, config)
        backend = context[name].get_attn_backend()
        for companion, companion_spec in companions.items():
            context[companion] = CompanionCache(companion, backend, companion_spec)
            result[companion] = companion_spec
    return result
