"""KV-cache layout: what each layer keeps, declared so that vLLM's planner sees it.

| layer              | spec                                      | holds                 |
|--------------------|-------------------------------------------|-----------------------|
| leader / singleton | FullAttentionSpec (K and V)               | K, V of every token   |
| follower           | FullAttentionSpec, V channels only        | V of every token      |
| follower companion | FollowerKeySpec (a sink-keeping window)   | K of sinks and window |
| summary companion  | FullAttentionSpec, one state per S tokens | mean K of each block  |
| scores companion   | FullAttentionSpec, 2G values per KV head  | a leader's decode     |
|                    |   and token (GPU kernels, share `scores`) | softmax terms         |

A follower's companion is a weightless layer object named `<layer>.layershare_k`
that lives only in vLLM's static forward context, so vLLM gives it its own
KV-cache group, block table and slot mapping. Its manager frees a key block once
all of its tokens are distant, and keeps the blocks of the sink tokens. With
`distant_mass: estimated` a second companion `<layer>.layershare_ksum` holds one
mean key per `summary_tokens` tokens (vLLM's compressed-state spec,
`tokens_per_state`), so the summaries are in vLLM's plan too. On the GPU kernels with
share `scores`, a leader with followers gets `<layer>.layershare_scores`: its decode
pass writes there the softmax terms of its followers' distant tokens (one value per
token and query head, and per key tile their log-sum-exp), which its followers read
instead of the leader's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_layershare.attention.paged import SharedScores
from vllm_layershare.config import LayershareConfig

COMPANION_SUFFIX = ".layershare_k"
SUMMARY_SUFFIX = ".layershare_ksum"
SCORES_SUFFIX = ".layershare_scores"


@dataclass(frozen=True, kw_only=True)
class FollowerKeySpec(SlidingWindowSpec):
    """Keys of a follower: the last `sliding_window` tokens plus the first `sink_tokens`."""

    sink_tokens: int = 0

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + cdiv(self.sink_tokens, self.block_size),
                   cdiv(max_model_len, self.block_size))


class SinkWindowManager(SlidingWindowManager):
    """A sliding-window manager that never frees the blocks holding sink tokens."""

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        spec = self.kv_cache_spec
        assert isinstance(spec, FollowerKeySpec)
        first = cdiv(spec.sink_tokens, self.block_size)
        self._remove_blocks_in_range(request_id, first, skipped // self.block_size)


def register_specs() -> None:
    """Make vLLM's spec registry know FollowerKeySpec (built-ins registered first)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(FollowerKeySpec, SinkWindowManager,
                                 uniform_type_base_spec=FollowerKeySpec)


def follower_specs(
    full: FullAttentionSpec, config: LayershareConfig
) -> tuple[FullAttentionSpec, FollowerKeySpec]:
    """Split a full K+V spec into a follower's V spec and its companion's K spec.

    Each keeps the full spec's page size (block size doubled, half the channels),
    so vLLM can pool all pages together without padding.
    """
    block_size = full.block_size * 2
    value_bytes = full.head_size_v * full.dtype.itemsize
    key_bytes = full.head_size * full.dtype.itemsize
    values = replace(full, block_size=block_size, state_content_bytes=value_bytes)
    keys = FollowerKeySpec(
        block_size=block_size,
        num_kv_heads=full.num_kv_heads,
        head_size=full.head_size,
        head_size_v=full.head_size_v,
        dtype=full.dtype,
        kv_quant_mode=full.kv_quant_mode,
        state_content_bytes=key_bytes,
        sliding_window=config.recent_tokens,
        sink_tokens=config.sink_tokens,
    )
    if {values.page_size_bytes, keys.page_size_bytes} != {full.page_size_bytes}:
        raise ValueError(
            "layershare needs equal key and value head sizes (page sizes "
            f"{full.page_size_bytes}, {values.page_size_bytes}, {keys.page_size_bytes})."
        )
    return values, keys


def summary_spec(full: FullAttentionSpec, config: LayershareConfig) -> FullAttentionSpec:
    """A follower's mean-key summaries: one K-sized state per `summary_tokens` tokens.

    A page keeps the full spec's page size, so it holds page_bytes / K-bytes states
    and covers that many times `summary_tokens` tokens.
    """
    tokens = config.summary_tokens
    if (2 * full.block_size) % tokens:
        raise ValueError(
            f"layershare: summary_tokens {tokens} must divide the follower key block "
            f"({2 * full.block_size} tokens)."
        )
    key_bytes = full.head_size * full.dtype.itemsize
    states = full.page_size_bytes // (full.num_kv_heads * key_bytes)
    spec = replace(full, block_size=states * tokens, state_content_bytes=key_bytes,
                   tokens_per_state=tokens)
    assert spec.page_size_bytes == full.page_size_bytes
    return spec


def scores_spec(full: FullAttentionSpec, group: int) -> FullAttentionSpec | None:
    """A leader's shared decode scores (SharedScores): per KV head and token, `group`
    softmax terms in the model's dtype and as many bytes again for the key tiles'
    log-sum-exps; pages of the full spec's size (so vLLM pools them with the rest); None
    when no whole number of tokens fills such a page."""
    cell = 4 * SharedScores.cell_floats(group, 1, full.dtype)  # bytes per token
    if full.page_size_bytes % (full.num_kv_heads * cell):
        return None
    tokens = full.page_size_bytes // (full.num_kv_heads * cell)
    spec = replace(full, block_size=tokens, state_content_bytes=cell)
    assert spec.page_size_bytes == full.page_size_bytes
    return spec


def kv_cache_group_layers(specs: dict[str, object], max_waste: float = 0.05) -> list[list[str]]:
    """Layer names of each KV-cache group, for a layershare layout.

    vLLM pools one page per layer of every group, so all groups hold the same number
    of layers; a short group is padded with unused layers (memory lost). vLLM sizes
    groups by the smallest layer type, which suits its n:1 hybrid models but pads a
    calibrated grouping (12 leaders and 18 followers: groups of 12, six padding layers
    in each follower cache). Here: the largest group size whose padding stays under
    `max_waste` of all layers (12 and 18 -> 6), else the gcd of the counts (no padding).
    """
    buckets: dict[object, list[str]] = {}
    for name, spec in specs.items():
        buckets.setdefault(spec, []).append(name)
    counts = [len(names) for names in buckets.values()]
    size = math.gcd(*counts)
    for candidate in range(max(counts), size, -1):
        if sum(-c % candidate for c in counts) <= max_waste * sum(counts):
            size = candidate
            break
    groups = []
    for names in buckets.values():
        parts = cdiv(len(names), size)
        groups += [names[i::parts] for i in range(parts)]
    return groups


def layer_name_at(name: str, layer: int, index: int) -> str:
    """The name of layer `index` in the naming scheme of `name` (layer `layer`)."""
    marker = f".{layer}."
    head, sep, tail = name.rpartition(marker)
    if not sep:
        raise ValueError(f"layershare cannot find layer index {layer} in name {name!r}")
    return f"{head}.{index}.{tail}"

