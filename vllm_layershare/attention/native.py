"""The compiled CPU kernel (csrc/pod_attention_cpu.cpp), same contract as portable.py.

It walks the paged caches directly (no gathers) with one online softmax per branch.
Absent when the package was built without PyTorch; then portable.py is used.
"""

from __future__ import annotations

import torch

from vllm_layershare.attention.paged import LayerInputs

try:
    from vllm_layershare import _C
except ImportError:  # built without the extension
    _C = None


MAX_HEAD_SIZE = 256  # the kernel's row buffers; larger heads take the portable path


def available(device: torch.device, head_size: int = 0) -> bool:
    """Whether the compiled kernel can run attention with this head size on `device`."""
    return _C is not None and device.type == "cpu" and head_size <= MAX_HEAD_SIZE


def describe() -> str:
    """Which attention path runs on CPU, for the start-up log."""
    if _C is None:
        return "portable PyTorch path (the CPU kernel was not built)"
    return f"compiled CPU kernel ({_C.vector_isa()} vector paths)"


def write_slots(cache: torch.Tensor, slots: torch.Tensor, block_size: int,
                data: torch.Tensor) -> None:
    """cache[block, :, offset] = data[t] for each token's slot (negative slots skipped)."""
    _C.write_slots(cache, slots, block_size, data[: slots.shape[0]].to(cache.dtype))


def native_pod_attention(
    inputs: LayerInputs,
    query_start_loc: list[int] | torch.Tensor,
    seq_lens: list[int] | torch.Tensor,
    output: torch.Tensor,
) -> None:
    """Write attention of every scheduled token into `output` [T, H, Dv]."""
    kp, v, kd, summary = inputs.k_prox, inputs.v, inputs.k_distant, inputs.summary
    q = inputs.q.float()
    out = torch.empty(output.shape, dtype=torch.float32)
    distant = kd is not None
    estimated = distant and summary is not None
    _C.pod_attention(
        out, q, inputs.q_distant.float() if distant else q,
        kp.cache[..., kp.lo : kp.hi], kp.block_table, kp.block_size,
        v.cache[..., v.lo : v.hi], v.block_table, v.block_size,
        kd.cache[..., kd.lo : kd.hi] if distant else None,
        kd.block_table if distant else None, kd.block_size if distant else 1,
        torch.as_tensor(query_start_loc, dtype=torch.int64),
        torch.as_tensor(seq_lens, dtype=torch.int64),
        inputs.scale, inputs.sink, inputs.recent,
        -1.0 if inputs.gate_skip_threshold is None else inputs.gate_skip_threshold,
        summary.cache if estimated else None,
        summary.block_table if estimated else None,
        summary.tokens_per_page // summary.summary_tokens if estimated else 1,
        summary.summary_tokens if estimated else 1,
        summary.log_weight.float().contiguous() if estimated else None,
    )
    output.copy_(out)
