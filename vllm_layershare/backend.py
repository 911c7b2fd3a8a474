"""The `layershare` attention backend: backend class, metadata builder and impl.

Shaped like vLLM's own `v1/attention/backends/*`. One builder runs per KV-cache
group (leaders, follower values, follower keys); each layer's impl finds the
caches and metadata of the other layers it reads (its leader, its key companion)
in the step's forward context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_layershare.attention import native
from vllm_layershare.attention.mass import write_summaries
from vllm_layershare.attention.paged import LayerInputs, PagedPart, SharedScores, SummaryPart
from vllm_layershare.attention.portable import paged_pod_attention
from vllm_layershare.config import LayershareConfig
from vllm_layershare.layout import (
    COMPANION_SUFFIX,
    SCORES_SUFFIX,
    SUMMARY_SUFFIX,
    layer_name_at,
)
from vllm_layershare.settings import (
    attention_path,
    config_for,
    forced_path,
    full_decode_graphs,
)

if TYPE_CHECKING:
    from vllm_layershare.attention.triton_config import TritonConfig

logger = init_logger("vllm." + __name__)  # under vLLM's log handlers

# Name under which vLLM knows this backend: the CUSTOM slot (see integration.py).
BACKEND_NAME = "CUSTOM"
# Forward-context key where a leader leaves its queries for its followers.
LEADER_QUERY_KEY = "layershare_leader_query"
# ... and, on the GPU kernels with share `scores`, its buffer of decode rows' distant logits.
LEADER_SCORES_KEY = "layershare_leader_scores"
# Oldest NVIDIA GPU generation the GPU kernels serve: Ampere.
MIN_CAPABILITY = DeviceCapability(8, 0)
# Which decode kernel runs on GPUs, and why (benchmarks/kernels.py, docs/benchmarks.md).
GPU_KERNELS = ("Triton kernels (decode: Triton split over the context; csrc's CUDA decode "
               "kernel writes no shared scores, and on an H200 at 32K x 16 it took 3.8x "
               "the Triton leader's time and 8x the follower's)")
# Forward calls with real metadata in this process: tests use it to prove this code ran.
FORWARD_CALLS = 0


def triton_kernels():
    """The Triton kernels' module, imported on first use: only the "triton" path needs
    Triton, and the tests set TRITON_INTERPRET before it is first imported."""
    from vllm_layershare.attention import triton_paged

    return triton_paged


def launch_shapes(device: torch.device) -> tuple[TritonConfig, str]:
    """The Triton kernels' launch shapes on this device and where they come from (the
    user's setting, a file tuned for this GPU, or the defaults: tuning.py)."""
    from vllm_layershare.attention import tuning

    return tuning.device_launch_config(device)


def describe_path(path: str, device: torch.device) -> str:
    """The start-up line's words for an attention path."""
    if path == "triton":
        from vllm_layershare.attention import tuning

        return f"{GPU_KERNELS}; {tuning.describe(*launch_shapes(device))}"
    return native.describe() if path == "native" else "portable PyTorch path"


class LayershareBackend(AttentionBackend):
    """PoD attention: followers borrow the leader's distant-token scores."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[LayershareImpl]:
        return LayershareImpl

    @staticmethod
    def get_builder_cls() -> type[LayershareMetadataBuilder]:
        return LayershareMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # the portable path takes any head size

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        # The GPU kernels are built and tested for sm_80 and newer (bf16 in Triton too).
        return capability is None or capability >= MIN_CAPABILITY


@dataclass
class LayershareMetadata:
    """One KV-cache group's view of a step."""

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    query_start_loc_cpu: torch.Tensor  # the same, as int64 host tensors (CPU kernel)
    seq_lens_cpu: torch.Tensor
    query_start_loc_device: torch.Tensor  # vLLM's device copies (GPU kernels)
    seq_lens_device: torch.Tensor
    max_query_len: int
    max_seq_len: int  # host maxima: the GPU kernels' grids, without a device sync
    decode_rows: bool  # whether a request has one query: else no decode launches
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    block_size: int
    # Scheduled tokens that complete a summary block (distant_mass: estimated): their
    # request rows and positions, found once per step on the host, not per layer (CPU
    # paths; empty on the Triton path, which finds them on the device).
    summary_rows: torch.Tensor
    summary_ends: torch.Tensor
    # Scratch of the Triton decode kernels, sized once from the scheduler's limits.
    decode_workspace: torch.Tensor | None = None
    # Where a leader leaves its queries for its followers (share `scores`).
    leader_queries: torch.Tensor | None = None


@functools.cache
def shared_leader_queries(device: torch.device, tokens: int, heads: int, head_size: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """A persistent copy of a leader's queries for its followers, one per device (groups
    are consecutive layers). Not the op's own query tensor: under torch.compile its
    memory is reused for later layers' activations once the attention op returns."""
    queries = torch.empty(tokens, heads, head_size, dtype=dtype, device=device)
    logger.info("layershare: leaders keep their queries for their followers in %.1f MiB",
                queries.numel() * queries.element_size() / 2**20)
    return queries


@functools.cache
def shared_decode_workspace(device: torch.device, max_reqs: int, heads: int, kv_heads: int,
                            head_size: int, max_len: int, launch: TritonConfig) -> torch.Tensor:
    """One Triton decode workspace per device, for every layer and KV-cache group:
    layers run one after another. Its size depends on the launch shapes (splits)."""
    workspace = triton_kernels().decode_workspace(max_reqs, heads, kv_heads, head_size,
                                                  max_len, device, launch)
    logger.info("layershare: decode workspace of %.1f MiB (up to %d requests of %d tokens)",
                workspace.numel() * 4 / 2**20, max_reqs, max_len)
    return workspace


def host_seq_lens(m: CommonAttentionMetadata) -> torch.Tensor:
    """The step's context lengths on the host, int64, without waiting for the device:
    vLLM's host bound is exact when no draft tokens are in flight (speculative decoding
    is refused at start-up, settings.py). A copy: vLLM refills its buffer next step."""
    bound = m.seq_lens_cpu_upper_bound
    if bound is None:  # callers that build metadata without it (none in vLLM 0.32's runner)
        return m.seq_lens[: m.num_reqs].cpu().long()
    return bound[: m.num_reqs].to(torch.int64, copy=True)


class LayershareMetadataBuilder(AttentionMetadataBuilder[LayershareMetadata]):
    """Turns vLLM's common metadata into the host lists the portable path loops over."""

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        config = config_for(vllm_config)
        self.summary_tokens = config.summary_tokens if config.estimates_mass else 0
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        heads = model.get_num_attention_heads(parallel)
        self.leader_queries = None
        if config.share == "scores":
            self.leader_queries = shared_leader_queries(
                device, vllm_config.scheduler_config.max_num_batched_tokens, heads,
                model.get_head_size(), model.dtype)
        self.decode_workspace = None
        self.runs_triton = attention_path(device, model.get_head_size()) == "triton"
        if self.runs_triton:
            self.decode_workspace = shared_decode_workspace(
                device, vllm_config.scheduler_config.max_num_seqs, heads,
                model.get_num_kv_heads(parallel), model.get_head_size(), model.max_model_len,
                launch_shapes(device)[0])

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig,
                              kv_cache_spec: AttentionSpec) -> AttentionCGSupport:
        # Decode steps on the Triton path read their data through persistent buffers
        # only (test_engine's replay test); opt-in until run inside vLLM on a GPU.
        if full_decode_graphs(vllm_config):
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> LayershareMetadata:
        m = common_attn_metadata
        query_start_loc = m.query_start_loc_cpu[: m.num_reqs + 1].long()
        seq_lens = host_seq_lens(m)
        device = m.block_table_tensor.device
        summary_rows, summary_ends = self._completed_summaries(query_start_loc, seq_lens,
                                                               device)
        return LayershareMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=query_start_loc.tolist(),
            seq_lens=seq_lens.tolist(),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
            query_start_loc_device=m.query_start_loc[: m.num_reqs + 1],
            seq_lens_device=m.seq_lens[: m.num_reqs],
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            decode_rows=bool((query_start_loc.diff() == 1).any()),
            # The Triton kernels read vLLM's int32 table itself (persistent: CUDA graphs
            # replay it); the CPU kernel and torch indexing take int64.
            block_table=(m.block_table_tensor[: m.num_reqs] if self.runs_triton
                         else m.block_table_tensor[: m.num_reqs].long()),
            slot_mapping=m.slot_mapping[: m.num_actual_tokens].long(),  # int64 already
            block_size=self.block_size,
            summary_rows=summary_rows,
            summary_ends=summary_ends,
            decode_workspace=self.decode_workspace,
            leader_queries=self.leader_queries,
        )

    def _completed_summaries(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(request rows, positions) of the step's tokens that complete a summary block,
        found on the host for the CPU paths' writes; empty without the estimated mass and
        on the Triton path, whose writer finds them on the device."""
        if not self.summary_tokens or self.runs_triton:
            none = torch.empty(0, dtype=torch.int64, device=device)
            return none, none
        token_rows = torch.repeat_interleave(torch.arange(seq_lens.shape[0]),
                                             query_start_loc.diff())
        positions = (seq_lens[token_rows] - query_start_loc[token_rows + 1]
                     + torch.arange(token_rows.shape[0]))
        ends = (positions + 1) % self.summary_tokens == 0
        return token_rows[ends].to(device), positions[ends].to(device)


@dataclass(frozen=True)
class LayerRole:
    """Where a layer reads from: its leader's layer name, and its key companion."""

    leader: str | None  # None for a leader or a one-layer group
    key_cache: str | None  # the companion layer holding a follower's keys
    summary_cache: str | None = None  # the companion holding its mean keys (estimated mass)
    shares_scores: bool = False  # share `scores`: a leader with followers, or a follower
    scores_cache: str | None = None  # a leader's scores companion (GPU kernels, if planned)


def write_cache(writes: list[tuple[torch.Tensor, torch.Tensor, LayershareMetadata]],
                path: str) -> None:
    """Store each write's data [T, Hkv, C] into its cache slice [blocks, Hkv, block_size,
    C] at the slots of its metadata's slot mapping; on the Triton path a layer's writes
    share one launch."""
    if path == "triton":
        triton_kernels().triton_write_slots(
            *[(cache, meta.slot_mapping, meta.block_size, data) for cache, data, meta in writes])
        return
    for cache, data, meta in writes:
        slots = meta.slot_mapping
        if path == "native":
            native.write_slots(cache, slots, meta.block_size, data)
            continue
        data = data[: slots.shape[0]]
        keep = slots >= 0
        if not bool(keep.all()):
            slots, data = slots[keep], data[keep]
        cache[slots // meta.block_size, :, slots % meta.block_size] = data.to(cache.dtype)


class LayershareImpl(AttentionImpl[LayershareMetadata]):
    """Leaders run ordinary attention; followers run the PoD two-branch attention."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        unsupported = [
            name for name, present in (
                ("ALiBi", alibi_slopes is not None),
                ("sliding-window attention", sliding_window is not None),
                ("logit softcapping", bool(logits_soft_cap)),
                (f"{attn_type} attention", attn_type != AttentionType.DECODER),
                ("cross-layer KV sharing", kv_sharing_target_layer_name is not None),
                ("attention sinks", kwargs.get("sinks") is not None),
            ) if present
        ]
        if unsupported:
            raise ValueError(f"layershare does not support {', '.join(unsupported)}.")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.config: LayershareConfig = config_for(get_current_vllm_config())
        self.role: LayerRole | None = None
        self.summary_log_weight: torch.Tensor | None = None  # [H] on the layer's device
        self.score_buffer: torch.Tensor | None = None  # a leader's SharedScores buffer
        self.path: str | None = None  # attention_path, fixed at the first forward
        self.launch: TritonConfig | None = None  # the Triton path's, with the path
        forced_path()  # a bad setting stops start-up here, not at the first request

    def _role(self, layer_name: str) -> LayerRole:
        if self.role is None:
            index = extract_layer_index(layer_name)
            leader = self.config.leader_of(index)
            scores = self.config.share == "scores"
            if leader == index:
                shares = scores and self.config.has_followers(index)
                self.role = LayerRole(None, None, shares_scores=shares,
                                      scores_cache=layer_name + SCORES_SUFFIX if shares else None)
            else:
                summary = layer_name + SUMMARY_SUFFIX if self.config.estimates_mass else None
                self.role = LayerRole(layer_name_at(layer_name, index, leader),
                                      layer_name + COMPANION_SUFFIX, summary, scores)
                if summary is not None:
                    self.summary_log_weight = self._log_weights(index)
        return self.role

    def _log_weights(self, index: int) -> torch.Tensor:
        """log S + this rank's query heads' calibrated offsets (the file lists all heads)."""
        offsets = self.config.offsets_of(index)
        if offsets is not None:
            first = get_tensor_model_parallel_rank() * self.num_heads
            offsets = offsets[first:first + self.num_heads]
        return SummaryPart.log_weights(self.config.summary_tokens, self.num_heads, offsets)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: LayershareMetadata,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert output is not None
        if attn_metadata is None:  # profiling run: no cache yet
            return output.fill_(0)
        if self.path is None:
            self.path = attention_path(query.device, self.head_size)
            if self.path == "triton":  # the builder sized the workspace for the same shapes
                self.launch = launch_shapes(query.device)[0]
        global FORWARD_CALLS
        FORWARD_CALLS += 1
        if FORWARD_CALLS == 1:
            logger.info("layershare: attention impl running in this process, %s",
                        describe_path(self.path, query.device))
        name = layer.layer_name
        role = self._role(name)
        n = attn_metadata.num_actual_tokens
        query = query[:n]
        ctx = get_forward_context()
        d = self.head_size
        if role.leader is None:
            write_cache([(kv_cache[..., :d], key, attn_metadata),
                         (kv_cache[..., d:], value, attn_metadata)], self.path)
            if role.shares_scores and self._followers_read_leader_queries(attn_metadata):
                kept = attn_metadata.leader_queries[:n]
                kept.copy_(query)
                ctx.additional_kwargs[(LEADER_QUERY_KEY, name)] = kept
            inputs = LayerInputs(
                q=query, scale=self.scale,
                k_prox=self._part(kv_cache, 0, d, attn_metadata),
                v=self._part(kv_cache, d, kv_cache.shape[-1], attn_metadata),
                shared_scores=self._scores_to_share(role, kv_cache, attn_metadata, query),
            )
            if inputs.shared_scores is not None:
                ctx.additional_kwargs[(LEADER_SCORES_KEY, name)] = inputs.shared_scores
        else:
            inputs = self._follower_inputs(ctx, role, query, key, value, kv_cache, attn_metadata)
        if self.path == "native":
            native.native_pod_attention(inputs, attn_metadata.query_start_loc_cpu,
                                        attn_metadata.seq_lens_cpu, output[:n])
        elif self.path == "triton":
            triton_kernels().triton_pod_attention(
                inputs, attn_metadata.query_start_loc_device, attn_metadata.seq_lens_device,
                output[:n], attn_metadata.max_query_len, attn_metadata.max_seq_len,
                config=self.launch, workspace=attn_metadata.decode_workspace,
                decode_rows=attn_metadata.decode_rows,
                write_summaries=self._kernel_writes_summaries(inputs.summary, attn_metadata))
        else:
            paged_pod_attention(inputs, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                                output[:n])
        return output

    def _scores_to_share(self, role: LayerRole, kv_cache: torch.Tensor,
                         meta: LayershareMetadata, query: torch.Tensor) -> SharedScores | None:
        """Where a leader leaves its followers' distant logits (Triton kernels only): its
        scores companion, which vLLM planned (layout.py); else (no such plan for this page
        size) a buffer over the leader's own pages, made on first use."""
        if not role.shares_scores or self.path != "triton":
            return None
        ctx = get_forward_context()
        window = (self.config.sink_tokens, self.config.recent_tokens)
        companion = ctx.no_compile_layers.get(role.scores_cache)
        if companion is not None:
            scores_meta = ctx.attn_metadata[role.scores_cache]
            return SharedScores(SharedScores.cells(companion.kv_cache), scores_meta.block_table,
                                scores_meta.block_size, *window, write=True)
        if self.score_buffer is None:
            group = self.num_heads // self.num_kv_heads
            floats = SharedScores.cell_floats(group, meta.block_size, kv_cache.dtype)
            self.score_buffer = torch.empty(kv_cache.shape[0], self.num_kv_heads, floats,
                                            dtype=torch.float32, device=query.device)
            logger.info_once("layershare: leaders share decode scores with their followers "
                             "(%.1f MiB per leader, outside vLLM's KV plan)",
                             self.score_buffer.numel() * 4 / 2**20)
        return SharedScores(self.score_buffer, meta.block_table, meta.block_size, *window,
                            write=True)

    def _follower_inputs(self, ctx, role: LayerRole, query, key, value, kv_cache,
                         meta: LayershareMetadata) -> LayerInputs:
        assert role.leader is not None and role.key_cache is not None
        key_cache = ctx.no_compile_layers[role.key_cache].kv_cache
        key_meta = ctx.attn_metadata[role.key_cache]
        lead_cache = ctx.no_compile_layers[role.leader].kv_cache
        lead_meta = ctx.attn_metadata[role.leader]
        write_cache([(kv_cache, value, meta), (key_cache[..., : self.head_size], key, key_meta)],
                    self.path)
        config = self.config
        q_distant = query
        if config.share == "scores":  # None: the shared scores stand in for them
            q_distant = (ctx.additional_kwargs[(LEADER_QUERY_KEY, role.leader)]
                         if self._followers_read_leader_queries(meta) else None)
        own_keys = self._part(key_cache, 0, self.head_size, key_meta)
        summary = None
        if role.summary_cache is not None:
            summary_meta = ctx.attn_metadata[role.summary_cache]
            assert self.summary_log_weight is not None
            if self.summary_log_weight.device != query.device:  # once: the first forward
                self.summary_log_weight = self.summary_log_weight.to(query.device)
            summary = SummaryPart(ctx.no_compile_layers[role.summary_cache].kv_cache,
                                  summary_meta.block_table, summary_meta.block_size,
                                  config.summary_tokens, self.summary_log_weight)
            if self.path == "triton":  # on the device, from the step's lengths
                if not self._kernel_writes_summaries(summary, key_meta):
                    triton_kernels().triton_write_summaries(
                        own_keys, summary, key_meta.query_start_loc_device,
                        key_meta.seq_lens_device)
            elif key_meta.summary_ends.numel():  # known on the host: no sync
                write_summaries(own_keys, summary, key_meta.summary_rows, key_meta.summary_ends)
        return LayerInputs(
            q=query, scale=self.scale,
            k_prox=own_keys,
            v=self._part(kv_cache, 0, kv_cache.shape[-1], meta),
            sink=config.sink_tokens, recent=config.recent_tokens,
            q_distant=q_distant,
            k_distant=self._part(lead_cache, 0, self.head_size, lead_meta),
            gate_skip_threshold=config.gate_skip_threshold,
            summary=summary,
            shared_scores=self._shared_with(ctx, role),
        )

    def _followers_read_leader_queries(self, meta: LayershareMetadata) -> bool:
        """Whether share-`scores` followers need their leader's queries this step: not on
        the Triton path in a step of one-query rows, whose followers read the leader's
        shared scores instead; the leader then skips a copy launch per step."""
        return self.path != "triton" or meta.max_query_len > 1

    @staticmethod
    def _kernel_writes_summaries(summary: SummaryPart | None, meta: LayershareMetadata) -> bool:
        """Whether the Triton decode kernel writes a follower's completed summary blocks
        itself (a step of one-query rows), which saves that layer a launch per step."""
        return summary is not None and meta.max_query_len == 1

    @staticmethod
    def _shared_with(ctx, role: LayerRole) -> SharedScores | None:
        """The leader's shared scores of this step, read-only (share `scores`, GPU)."""
        shared = ctx.additional_kwargs.get((LEADER_SCORES_KEY, role.leader))
        return replace(shared, write=False) if shared is not None and role.shares_scores else None

    @staticmethod
    def _part(cache: torch.Tensor, lo: int, hi: int, meta: LayershareMetadata) -> PagedPart:
        return PagedPart(cache, lo, hi, meta.block_table, meta.block_size)
