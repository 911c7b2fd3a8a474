"""New keys and values into vLLM's paged caches, at each token's slot (vLLM's
slot_mapping): a layer's K and V writes in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_layershare.attention.triton_paging import _pow2


@triton.jit
def _write_token(cache_ptr, c_sb, c_sh, c_ss, slots_ptr, block_size, data_ptr, d_st, d_sh,
                 token, H: tl.constexpr, C: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """cache[slot // block_size, :H, slot % block_size, :C] = data[token, :H, :C]: every
    KV head of one token in one program (one per (token, head) made a 128K prefill
    launch 2 million 128-thread programs of 256 bytes each)."""
    slot = tl.load(slots_ptr + token)
    h = tl.arange(0, BLOCK_H)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    inside = (h < H) & (c < C)
    rows = tl.load(data_ptr + token * d_st + h * d_sh + c, mask=inside, other=0.0)
    at = cache_ptr + (slot // block_size) * c_sb + h * c_sh + (slot % block_size) * c_ss + c
    written = inside & ((h * 0 + c * 0 + slot) >= 0)  # full-shaped: the interpreter's masks
    tl.store(at, rows.to(cache_ptr.dtype.element_ty), mask=written)


@triton.jit
def _write_slots_kernel(a_ptr, a_sb, a_sh, a_ss, a_slots, a_bs, a_data, a_st, a_dh,
                        b_ptr, b_sb, b_sh, b_ss, b_slots, b_bs, b_data, b_st, b_dh,
                        H: tl.constexpr, BLOCK_H: tl.constexpr,
                        A: tl.constexpr, BLOCK_A: tl.constexpr,
                        B: tl.constexpr, BLOCK_B: tl.constexpr):
    """Write a (axis 1 = 0) or b (axis 1 = 1): one token's rows each."""
    token = tl.program_id(0)
    if tl.program_id(1) == 0:
        _write_token(a_ptr, a_sb, a_sh, a_ss, a_slots, a_bs, a_data, a_st, a_dh, token,
                     H, A, BLOCK_H, BLOCK_A)
    else:
        _write_token(b_ptr, b_sb, b_sh, b_ss, b_slots, b_bs, b_data, b_st, b_dh, token,
                     H, B, BLOCK_H, BLOCK_B)


SlotWrite = tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]  # cache, slots, size, data


def _write_args(write: SlotWrite) -> tuple:
    cache, slots, block_size, data = write
    return (cache, *cache.stride()[:3], slots, block_size, data, *data.stride()[:2])


def triton_write_slots(*writes: SlotWrite) -> None:
    """For each of one or two writes (cache, slots, block_size, data): cache [blocks, Hkv,
    block_size, C] (channels dense) at each token's slot = data [T, Hkv, C]. Two writes
    (a layer's key and value) share one launch: at small batches an eager decode step
    waits on the host, and each launch costs it tens of microseconds. Slots < 0
    (padding) are skipped on the device, with no host sync, so the writes can sit in a
    CUDA graph; the writes' slot mappings have one length and their caches one Hkv."""
    if not 1 <= len(writes) <= 2:
        raise ValueError(f"triton_write_slots takes one or two writes, not {len(writes)}")
    first, second = writes[0], writes[-1]
    tokens, heads = first[1].shape[0], first[0].shape[1]
    if (second[1].shape[0], second[0].shape[1]) != (tokens, heads):
        raise ValueError("triton_write_slots: the writes differ in tokens or KV heads")
    if tokens == 0:
        return
    a, b = first[0].shape[-1], second[0].shape[-1]
    _write_slots_kernel[(tokens, len(writes))](
        *_write_args(first), *_write_args(second), H=heads, BLOCK_H=_pow2(heads),
        A=a, BLOCK_A=_pow2(a), B=b, BLOCK_B=_pow2(b))
