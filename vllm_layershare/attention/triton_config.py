"""Launch shapes of layershare's Triton kernels (tile sizes, warps, pipeline stages, how
decode splits the context). Imports no Triton: settings and tuning.py read it before
any kernel is needed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TritonConfig:
    """Launch shapes of the kernels; the defaults are the fastest of
    `benchmarks/kernels.py --sweep` on an H200 (docs/benchmarks.md)."""

    prefill_block_m: int = 128  # rows (query tokens x the heads of a KV head) per tile
    prefill_block_n: int = 64  # key positions per step
    prefill_warps: int = 8
    prefill_stages: int = 3
    decode_block_n: int = 32
    decode_warps: int = 4
    # 3: every decode program double-buffers its K and V copies. On an H200 (CUDA graph
    # replays, 32K) 2 stages: a leader alone within 4%, the other roles 8-16% slower.
    decode_stages: int = 3
    # A follower reading the leader's shared scores (estimated mass or not): its own
    # stages, as it reads V and the scores, no distant keys (the same on the H200).
    scores_decode_stages: int = 3
    # A leader writing its followers' shared scores: a register cap for its decode
    # program, so that four fit on an sm_90 multiprocessor (142 registers: three) without
    # spilling (benchmarks/kernel_resources.py); None: ptxas's choice (an H200 at 32K,
    # 2 decode stages: 13-14% slower).
    scores_write_registers: int | None = 128
    # Decode scans compute a key's page slot offset once, not per tile (prefill always
    # does): 12-15% fewer instructions per tile on sm_90; on an H200 a leader writing
    # shared scores 1-3% faster at 32K, the other roles within 1-2% either way; off, as
    # ptxas then spills the estimated-mass followers (8 bytes; kernel_resources.py).
    decode_fixed_slots: bool = False
    # Context positions per decode program, whole tiles (a leader's shared scores are
    # per tile); None: cut the context so that there are about programs_per_sm programs
    # per multiprocessor, each >= min_split_len positions.
    split_len: int | None = None
    programs_per_sm: int = 32
    # A follower reading shared scores: its own programs per SM (None: programs_per_sm).
    # It reads about half a leader's bytes per position (V and one logit per query head,
    # no keys), so at equal splits its programs are half as long and their fixed costs
    # (table and metadata loads before the first tile, the partials) weigh twice as much.
    scores_programs_per_sm: int | None = None
    min_split_len: int = 256
    # Decode: fewer chunks per (request, KV head) where the grid would end in a part-filled
    # wave of programs (waves.whole_wave_splits, from the residency of the compiled split
    # kernel, known from its first launch on). Off until a GPU has timed it.
    whole_waves: bool = False
    # Decode: the last split program of a (request, KV head) to finish merges its query
    # heads, after an atomic count, so no merge kernel is launched (one launch fewer per
    # layer and step: tens of microseconds of host time in an eager call). Off until a
    # GPU has timed it: the merge then runs in the grid's tail, GROUP heads a program.
    fused_merge: bool = False
    # Splits whose partial states a merge program loads per step, as one tile per branch
    # (sm_90: 48-64 registers at 32; a 128K context at batch 1 has 512 splits).
    merge_splits: int = 32

    def __post_init__(self) -> None:
        for name in ("prefill_block_m", "prefill_block_n", "decode_block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):  # tl.dot's smallest side; power of two
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, not {size}")
        if self.merge_splits < 1 or self.merge_splits & (self.merge_splits - 1):
            raise ValueError(f"TritonConfig.merge_splits must be a power of two, not "
                             f"{self.merge_splits}")
        for name in ("prefill_warps", "decode_warps"):
            warps = getattr(self, name)
            if not 1 <= warps <= 32 or warps & (warps - 1):  # Triton's num_warps
                raise ValueError(f"TritonConfig.{name} must be a power of two <= 32, not {warps}")
        for name in ("programs_per_sm", "scores_programs_per_sm", "prefill_stages",
                     "decode_stages", "scores_decode_stages", "min_split_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"TritonConfig.{name} must be >= 1")
        registers = self.scores_write_registers
        if registers is not None and not 16 <= registers <= 255:  # ptxas's register range
            raise ValueError(f"TritonConfig.scores_write_registers must be 16-255 or None, "
                             f"not {registers}")
        if self.split_len is not None and (self.split_len < 1
                                           or self.split_len % self.decode_block_n):
            raise ValueError(f"TritonConfig.split_len must be a positive multiple of "
                             f"decode_block_n ({self.decode_block_n}), not {self.split_len}")


DEFAULT_CONFIG = TritonConfig()
