"""How many programs of a kernel a GPU runs at once, and a split count that fills its
waves (pure arithmetic: no GPU, no Triton).

A grid of P programs of equal length L, on S slots (resident programs per
multiprocessor x multiprocessors), takes about ceil(P / S) x L: at 6.4 waves the
seventh runs 40% full. Cutting each (request, KV head) into s chunks makes L about
1 / s, so a decode grid of `pairs` x s programs takes about ceil(pairs x s / S) / s;
whole_wave_splits picks the s that minimises it.
"""

from __future__ import annotations

import functools
from fractions import Fraction

# Per multiprocessor on sm_80-sm_90: registers, warps, programs (CUDA's limits), and
# the shared memory the driver keeps per program (bytes).
SM_REGISTERS, SM_WARPS, SM_PROGRAMS, RESERVED_SHARED = 65536, 64, 32, 1024
REGISTER_UNIT = 256  # registers are given out per warp in units of this many


def resident_programs(registers: int, warps: int, shared: int, sm_shared: int,
                      sm_registers: int = SM_REGISTERS, sm_warps: int = SM_WARPS) -> int:
    """Programs of a kernel one multiprocessor holds at once, as its registers per
    thread, warps per program and shared memory per program (bytes) allow; sm_shared is
    the multiprocessor's shared memory (bytes). 0 where one program does not fit."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = sm_registers // (per_warp * warps) if per_warp else SM_PROGRAMS
    by_shared = sm_shared // (shared + RESERVED_SHARED)
    return min(by_registers, by_shared, sm_warps // warps, SM_PROGRAMS)  # 0: does not fit


@functools.cache
def whole_wave_splits(splits: int, pairs: int, slots: int) -> int:
    """Chunks per (request, KV head), at most `splits`, whose grid of pairs x chunks
    programs on `slots` programs at once takes least time in the model above; ties go
    to more chunks (shorter programs even out unequal ones). At 32K context x 16
    requests x 8 KV heads and 660 slots (5 per SM on an H200): 33 chunks are 6.4 waves
    (7 run), 30 chunks are 5.8 (6 run)."""
    def time(chunks: int) -> Fraction:
        return Fraction(-(-pairs * chunks // slots), chunks)

    return min(range(splits, 0, -1), key=time)  # min keeps the first: the most chunks
