"""The invariants of method.md, on the paged implementation against the dense reference."""

from __future__ import annotations

import functools
import math
from dataclasses import fields, replace

import pytest
import torch

from vllm_layershare.attention import native
from vllm_layershare.attention.mass import estimated_mass, write_summaries
from vllm_layershare.attention.paged import LayerInputs, PagedPart, SharedScores, SummaryPart
from vllm_layershare.attention.portable import paged_pod_attention
from vllm_layershare.attention.reference import dense_attention, dense_pod_attention

HEADS, KV_HEADS, DIM = 4, 2, 8
MAX_REQS = 4  # the scheduler limit a bounded Triton run sizes its workspace for
SCALE = 1.0 / math.sqrt(DIM)


def triton_impl(bound: int | None = None, **config):
    """The Triton kernels: compiled on a GPU where there is one, else run by Triton's
    interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET then). Small tiles,
    decode chunks of 16 positions and merges of 2 chunks a step (unless `config` says
    otherwise), so that the short test sequences cross tile, chunk, merge-step and page
    boundaries. With `bound`, the calls get that bound on the context lengths instead
    of each step's longest, and one decode workspace sized for it, reused by every
    step: the conditions of a CUDA graph. Block tables are int32, as vLLM hands them
    over. Summaries are written by the device-side writer (`run.write_summaries`, used
    by run_estimated), or in steps of one-query rows by the decode kernel (run's
    write_summaries)."""
    from vllm_layershare.attention.triton_paged import (
        TritonConfig,
        decode_workspace,
        triton_pod_attention,
        triton_write_summaries,
    )

    config = TritonConfig(**{"split_len": 16, "decode_block_n": 16, "prefill_block_m": 32,
                             "prefill_block_n": 16, "merge_splits": 2, **config})
    workspaces: dict[torch.device, torch.Tensor] = {}

    def run(inputs, query_start_loc, seq_lens, output, write_summaries=False):
        workspace = None
        if bound is not None:
            device = output.device
            if device not in workspaces:
                workspaces[device] = decode_workspace(
                    MAX_REQS, output.shape[1], inputs.k_prox.cache.shape[1], output.shape[2],
                    bound, device, config)
            workspace = workspaces[device]
        triton_pod_attention(int32_tables(inputs), query_start_loc, seq_lens, output,
                             config=config, max_seq_len=bound, workspace=workspace,
                             write_summaries=write_summaries)

    def write_summaries(keys, summary, query_start_loc, seq_lens):
        device = keys.cache.device
        triton_write_summaries(int32_tables(keys), int32_tables(summary),
                               torch.tensor(query_start_loc, device=device),
                               torch.tensor(seq_lens, device=device))

    gpu = torch.cuda.is_available()
    run = on_gpu(run) if gpu else run
    run.write_summaries = on_gpu(write_summaries) if gpu else write_summaries
    run.decode_writes_summaries = True  # triton_pod_attention(write_summaries=True)
    run.workspaces = workspaces
    return run


def int32_tables(value):
    """A copy of paged inputs (LayerInputs, PagedPart, ...) whose block tables are int32."""
    if hasattr(value, "__dataclass_fields__"):
        return replace(value, **{
            f.name: getattr(value, f.name).int() if f.name == "block_table"
            else int32_tables(getattr(value, f.name)) for f in fields(value)})
    return value


def on_gpu(impl):
    """Run `impl` on GPU copies of its CPU arguments (tensors, dataclasses of them); copy
    back every tensor afterwards, the output and the buffers a kernel writes (a leader's
    shared scores, summaries) alike."""
    def run(*args):
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []

        def moved(value):
            if isinstance(value, torch.Tensor):
                copies.append((value, value.cuda()))
                return copies[-1][1]
            if hasattr(value, "__dataclass_fields__"):
                return replace(value, **{f.name: moved(getattr(value, f.name))
                                         for f in fields(value)})
            return value

        impl(*(moved(arg) for arg in args))
        for host, device in copies:
            host.copy_(device.cpu())
    return run


IMPLEMENTATIONS = {"portable": lambda: paged_pod_attention,
                   "native": lambda: native.native_pod_attention, "triton": triton_impl}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def impl(request):
    """Each paged implementation; the native one must be built (make install builds it)."""
    if request.param == "native":
        assert native.available(torch.device("cpu")), "the CPU kernel was not built"
    return IMPLEMENTATIONS[request.param]()


def random_sequence(length: int, gen: torch.Generator, heads: int = HEADS,
                    kv_heads: int = KV_HEADS, dim: int = DIM) -> dict[str, torch.Tensor]:
    """q, k, v of a follower and q, k of its leader."""
    def r(*shape):
        return torch.randn(*shape, generator=gen)
    return {
        "q": r(length, heads, dim), "k": r(length, kv_heads, dim), "v": r(length, kv_heads, dim),
        "qa": r(length, heads, dim), "ka": r(length, kv_heads, dim),
    }


def rising_logits(seq: dict[str, torch.Tensor], slope: float,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    """seq with every logit (q.k and qa.ka) raised by `slope` nats per key position: one
    direction u in every query (its own component along u replaced by 4 u) and n c u
    added to key n, so that q.k_n gains 4 c n. A running softmax maximum then rises
    through a scan, by more than the kernels' STALE_MAX (8 nats) at every 16-key tile
    or every few."""
    dim = seq["q"].shape[-1]
    u = torch.randn(dim, generator=gen)
    u /= u.norm()
    c = slope / (4 * scale_of(seq))
    ramp = c * torch.arange(seq["k"].shape[0], dtype=torch.float32)[:, None, None] * u
    out = dict(seq)
    for name in ("q", "qa"):
        out[name] = seq[name] - (seq[name] @ u)[..., None] * u + 4 * u
    for name in ("k", "ka"):
        out[name] = seq[name] + ramp
    return out


def scale_of(seq: dict[str, torch.Tensor]) -> float:
    return 1.0 / math.sqrt(seq["q"].shape[-1])


class PagedBatch:
    """Sequences laid into paged caches through shuffled block tables, like vLLM's."""

    def __init__(self, lengths: list[int], block_size: int, gen: torch.Generator,
                 dtype=torch.float32):
        self.block_size = block_size
        self.dtype = dtype
        blocks_per_seq = [math.ceil(n / block_size) for n in lengths]
        num_blocks = sum(blocks_per_seq) + 3
        ids = torch.randperm(num_blocks, generator=gen)[: sum(blocks_per_seq)]
        width = max(blocks_per_seq)
        self.block_table = torch.zeros(len(lengths), width, dtype=torch.int64)
        offset = 0
        for row, nb in enumerate(blocks_per_seq):
            self.block_table[row, :nb] = ids[offset : offset + nb]
            offset += nb
        self.num_blocks = num_blocks

    def part(self, rows: list[int], per_seq: list[torch.Tensor]) -> PagedPart:
        """A NaN-filled cache holding per_seq[i] [L, Hkv, D] for request rows[i]."""
        table = self.block_table[rows]
        kv_heads, dim = per_seq[0].shape[1:]
        cache = torch.full((self.num_blocks, kv_heads, self.block_size, dim), float("nan"),
                           dtype=self.dtype)
        for i, data in enumerate(per_seq):
            for pos in range(data.shape[0]):
                cache[table[i, pos // self.block_size], :, pos % self.block_size] = data[pos]
        return PagedPart(cache, 0, dim, table, self.block_size)


def run_paged(impl, seqs, feed, block_size, gen, *, sink, recent, share="scores", tau=None,
              leader=False, cache_dtype=torch.float32):
    """Feed sequences in steps; feed[row] lists query counts per step. Returns outputs."""
    lengths = [s["q"].shape[0] for s in seqs]
    batch = PagedBatch(lengths, block_size, gen, dtype=cache_dtype)
    heads, dim = seqs[0]["q"].shape[1:]
    outs = [torch.zeros(n, heads, dim) for n in lengths]
    done = [0] * len(seqs)
    for step in range(max(len(f) for f in feed)):
        rows = [r for r in range(len(seqs)) if step < len(feed[r])]
        q_parts, qd_parts, loc, seq_lens, spans = [], [], [0], [], []
        for r in rows:
            n = feed[r][step]
            a, b = done[r], done[r] + n
            q_parts.append(seqs[r]["q"][a:b])
            qd_parts.append((seqs[r]["qa"] if share == "scores" else seqs[r]["q"])[a:b])
            loc.append(loc[-1] + n)
            seq_lens.append(b)
            spans.append((r, a, b))
        # A follower holds keys of sinks and of its first query's window only, as vLLM's
        # block manager leaves them; freed keys are NaN, so reading one fails the test.
        k_prox_data = []
        for i, r in enumerate(rows):
            k = seqs[r]["k"][: seq_lens[i]].clone()
            if not leader:
                k[sink : max(sink, done[r] - recent + 1)] = float("nan")
            k_prox_data.append(k)
        inputs = LayerInputs(
            q=torch.cat(q_parts), scale=scale_of(seqs[0]),
            k_prox=batch.part(rows, k_prox_data),
            v=batch.part(rows, [seqs[r]["v"][: seq_lens[i]] for i, r in enumerate(rows)]),
        )
        if not leader:
            inputs.sink, inputs.recent = sink, recent
            inputs.q_distant = torch.cat(qd_parts)
            inputs.k_distant = batch.part(rows, [seqs[r]["ka"][: seq_lens[i]]
                                                 for i, r in enumerate(rows)])
            inputs.gate_skip_threshold = tau
        out = torch.zeros(loc[-1], heads, dim)
        impl(inputs, loc, seq_lens, out)
        for i, (r, a, b) in enumerate(spans):
            outs[r][a:b] = out[loc[i] : loc[i + 1]]
            done[r] = b
    return outs


def reference(seq, *, sink, recent, share="scores", tau=None):
    return dense_pod_attention(seq["q"], seq["k"], seq["v"], seq["qa"], seq["ka"], scale_of(seq),
                               sink=sink, recent=recent, share=share, gate_skip_threshold=tau)


FEEDS = {
    "one_prefill": lambda n: [n],
    "chunks_of_7": lambda n: [7] * (n // 7) + ([n % 7] if n % 7 else []),
    "prefill_then_decode": lambda n: [n // 2] + [1] * (n - n // 2),
    "token_by_token": lambda n: [1] * n,
}


@pytest.mark.parametrize("share", ["scores", "keys"])
@pytest.mark.parametrize("feed", list(FEEDS))
@pytest.mark.parametrize("block_size", [3, 16])
def test_paged_equals_dense_reference(impl, share, feed, block_size):
    """Invariants 3 and 4: any feeding, GQA, several lengths, odd block sizes."""
    gen = torch.Generator().manual_seed(hash((share, feed, block_size)) % 1000)
    lengths = [37, 20, 51]
    seqs = [random_sequence(n, gen) for n in lengths]
    outs = run_paged(impl, seqs, [FEEDS[feed](n) for n in lengths], block_size, gen,
                     sink=3, recent=9, share=share)
    for seq, out in zip(seqs, outs, strict=False):
        ref = reference(seq, sink=3, recent=9, share=share)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bound", [None, 200], ids=["step_longest", "static_bound"])
@pytest.mark.parametrize("split_len", [16, 48, None])
def test_triton_decode_any_split_length(split_len, bound):
    """Decode cut into chunks of any number of whole tiles (None: each request's context
    into as many chunks of >= 16 positions as fill the device), merged by log-sum-exp,
    equals the dense reference; prefill rows in the same steps too. Also with the grid
    from a static bound and one workspace for every step, as a CUDA graph would run it."""
    gen = torch.Generator().manual_seed(5)
    lengths = [37, 20, 51]
    seqs = [random_sequence(n, gen) for n in lengths]
    impl = triton_impl(bound=bound, split_len=split_len, min_split_len=16)
    outs = run_paged(impl, seqs, [FEEDS["prefill_then_decode"](n) for n in lengths], 4, gen,
                     sink=3, recent=9, share="scores")
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, sink=3, recent=9),
                                   atol=2e-5, rtol=1e-4)


def test_decode_split_lengths_fill_the_gpu_and_no_more(monkeypatch):
    """The decode split heuristic: small batches cut the context into enough chunks for
    about programs_per_sm programs per SM (chunks >= min_split_len, whole BLOCK_N tiles,
    so up to one tile's rounding fewer); batches that fill the GPU alone keep one chunk
    per (request, KV head). A static bound instead of the longest context (a CUDA
    graph's grid) changes no request's number of chunks by more than rounding, and no
    request ever needs more chunks than the grid has."""
    from vllm_layershare.attention import triton_decode
    from vllm_layershare.attention.triton_paged import TritonConfig, chunk_len, decode_splits

    sms, kv_heads = 132, 8
    monkeypatch.setattr(triton_decode, "_multiprocessors", lambda device: sms)
    gpu = torch.device("cuda")
    config = TritonConfig(programs_per_sm=2, min_split_len=256, decode_block_n=32)
    target = 2 * sms

    def chunks(context: int, batch: int, bound: int) -> tuple[int, int]:
        splits = decode_splits(batch, kv_heads, bound, gpu, config)
        length = chunk_len(context, splits, config)
        used = -(-context // length)
        assert length % 32 == 0 and length >= 256 and used <= splits, (context, batch, bound)
        return length, used

    for context, batch in [(32768, 1), (32768, 16), (131072, 1), (4096, 64), (300, 1)]:
        length, used = chunks(context, batch, context)
        programs = batch * kv_heads * used
        if length > 256:  # not held up by min_split_len: about the target, not more
            assert programs >= target * (1 - 32 / 256), (context, batch, length)
            assert programs < target + batch * kv_heads, (context, batch, length)
        assert abs(chunks(context, batch, 131072)[1] - used) <= 1, (context, batch)
    assert chunks(32768, 64, 32768)[1] == 1  # 512 programs
    for context in range(1, 3000, 37):  # any context within the bound fits the grid
        for batch in (1, 3, 40):
            chunks(context, batch, 3000)
    fixed = TritonConfig(split_len=64, decode_block_n=32)
    assert chunk_len(100, decode_splits(1, kv_heads, 100, gpu, fixed), fixed) == 64
    assert decode_splits(1, kv_heads, 100, gpu, fixed) == 2
    with pytest.raises(ValueError, match="multiple of decode_block_n"):
        TritonConfig(split_len=48, decode_block_n=32)  # a leader's shared scores are per tile
    with pytest.raises(ValueError, match="power of two"):
        TritonConfig(decode_block_n=24)
    with pytest.raises(ValueError, match="split_len"):
        TritonConfig(split_len=0)
    with pytest.raises(ValueError, match="merge_splits"):
        TritonConfig(merge_splits=12)
    # A follower reading shared scores may take fewer, longer chunks than its leader.
    own = TritonConfig(programs_per_sm=2, scores_programs_per_sm=1, min_split_len=256)
    lead, follow = (decode_splits(4, kv_heads, 131072, gpu, own, reads) for reads in (0, 1))
    assert (lead, follow) == (-(-2 * sms // 32), -(-sms // 32)), (lead, follow)
    assert decode_splits(4, kv_heads, 131072, gpu, config, True) == lead  # None: the leader's
    with pytest.raises(ValueError, match="scores_programs_per_sm"):
        TritonConfig(scores_programs_per_sm=0)
    with pytest.raises(ValueError, match="decode_warps must be a power of two"):
        TritonConfig(decode_warps=6)
    with pytest.raises(ValueError, match="scores_decode_stages"):
        TritonConfig(scores_decode_stages=0)
    with pytest.raises(ValueError, match="scores_write_registers"):
        TritonConfig(scores_write_registers=300)


def test_resident_programs_and_whole_waves():
    """The occupancy arithmetic: registers go out 256 per warp at a time (100 registers
    x 4 warps: 4 programs, not 5), shared memory and warps bind where they are the
    scarcer, 32 programs at most, 0 where one does not fit. Wave filling: 33 chunks x
    128 (request, KV head) pairs on 660 slots are 6.4 waves (7 run) and become 30 (5.8,
    6 run); a grid that ends in a nearly full wave, or fits in one, keeps its chunks;
    never more chunks."""
    from vllm_layershare.attention.waves import resident_programs, whole_wave_splits

    sm = 228 * 1024
    for registers, warps, shared, expected in [
            (80, 4, 16384, 6), (96, 4, 16384, 5), (100, 4, 0, 4), (128, 4, 0, 4),
            (142, 4, 0, 3), (96, 4, 100 * 1024, 2), (16, 24, 0, 2), (16, 1, 0, 32), (16, 1, sm, 0)]:
        assert resident_programs(registers, warps, shared, sm) == expected, registers
    assert whole_wave_splits(33, 128, 660) == 30
    assert whole_wave_splits(9, 512, 660) == 9  # 6.98 waves
    assert whole_wave_splits(3, 2048, 660) == 3  # fewer chunks: more waves per chunk
    assert whole_wave_splits(33, 128, 10_000) == 33  # one wave
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        splits, pairs, slots = (int(torch.randint(1, n, (1,), generator=gen))
                                for n in (80, 600, 3000))
        chosen = whole_wave_splits(splits, pairs, slots)
        waves = [-(-pairs * s // slots) / s for s in range(1, splits + 1)]
        assert 1 <= chosen <= splits and waves[chosen - 1] <= min(waves) * (1 + 1e-12)


@pytest.mark.parametrize("whole_waves", [False, True])
def test_triton_decode_chunks_cut_to_whole_waves(monkeypatch, whole_waves):
    """TritonConfig.whole_waves inside the decode call: once a split kernel's residency
    is known (here 1 program on each of 11 SMs), each launch takes the chunk count that
    fills its waves (for 3 requests x 2 KV heads 5, not decode_splits' 6) and the
    outputs still equal the dense reference; without it, decode_splits' count. On a GPU
    the launches also note their compiled kernel's residency (the interpreter has no
    compiled kernel)."""
    from vllm_layershare.attention import triton_decode
    from vllm_layershare.attention.waves import whole_wave_splits

    class GridSpy:  # records each launch's grid
        def __init__(self, kernel):
            self.kernel, self.grids = kernel, []

        def __getitem__(self, grid):
            self.grids.append(grid)
            return self.kernel[grid]

    spy = GridSpy(triton_decode._decode_split_kernel)
    monkeypatch.setattr(triton_decode, "_decode_split_kernel", spy)
    monkeypatch.setattr(triton_decode, "_multiprocessors", lambda device: 11)
    monkeypatch.setattr(triton_decode, "_resident_programs", lambda variant: 1)
    monkeypatch.setattr(triton_decode, "_RESIDENT", {})
    gen = torch.Generator().manual_seed(6)
    lengths = [37, 20, 51]
    seqs = [random_sequence(n, gen) for n in lengths]
    config = dict(split_len=None, min_split_len=16, programs_per_sm=3)
    impl = triton_impl(bound=200, whole_waves=whole_waves, **config)
    outs = run_paged(impl, seqs, [FEEDS["prefill_then_decode"](n) for n in lengths], 4, gen,
                     sink=3, recent=9, share="keys")
    plain = triton_decode.TritonConfig(decode_block_n=16, **config)
    cut = 0
    for reqs, _, chunks in spy.grids:
        splits = triton_decode.decode_splits(reqs, KV_HEADS, 200, torch.device("cpu"), plain)
        expected = whole_wave_splits(splits, reqs * KV_HEADS, 11) if whole_waves else splits
        assert chunks == expected, (reqs, chunks, splits)
        cut += chunks < splits
    assert (cut > 0) == whole_waves and (5 in {g[2] for g in spy.grids}) == whole_waves
    noted = triton_decode._RESIDENT.values()
    assert bool(noted) == (whole_waves and torch.cuda.is_available()), noted
    assert all(1 <= programs <= 32 for programs in noted), noted
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, sink=3, recent=9, share="keys"),
                                   atol=2e-5, rtol=1e-4)


class NoMergeKernel:
    """Stands in for the decode merge kernel where none may be launched."""

    def __getitem__(self, grid):
        raise AssertionError("the merge kernel was launched")


def fused_counts(workspace: torch.Tensor) -> torch.Tensor:
    """The fused merge's counts at the end of a decode workspace (decode_workspace)."""
    return workspace[-MAX_REQS * KV_HEADS:].view(torch.int32)


@pytest.mark.parametrize("case", ["scores", "keys_gate_skip", "estimated_mass"])
def test_triton_fused_merge_equals_the_dense_reference(monkeypatch, case):
    """TritonConfig.fused_merge: no merge kernel is launched; the last split program of a
    (request, KV head) to finish merges its query heads (and, with the estimated mass,
    writes the summary block the query completes), after an atomic count of the
    programs that reach its context (requests of different lengths: different counts;
    the mass's program counts too). One workspace serves every step, as in a CUDA
    graph: a count not set back to 0 would leave a later step's rows unmerged (0)."""
    from vllm_layershare.attention import triton_decode

    monkeypatch.setattr(triton_decode, "_decode_merge_kernel", NoMergeKernel())
    gen = torch.Generator().manual_seed(17)
    lengths = [37, 20, 51]
    seqs = [random_sequence(n, gen) for n in lengths]
    impl = triton_impl(bound=200, split_len=None, min_split_len=16, fused_merge=True)
    feed = [FEEDS["prefill_then_decode"](n) for n in lengths]
    if case == "estimated_mass":  # one-query steps: the kernel writes the summaries
        feed = [FEEDS["token_by_token"](n) for n in lengths]
        outs, _ = run_estimated(impl, seqs, feed, 8, gen, sink=3, recent=9, size=4)
        expected = [estimated_reference(seq, sink=3, recent=9, size=4) for seq in seqs]
    else:
        share, tau = ("scores", None) if case == "scores" else ("keys", 0.6)
        outs = run_paged(impl, seqs, feed, 4, gen, sink=3, recent=9, share=share, tau=tau)
        expected = [reference(seq, sink=3, recent=9, share=share, tau=tau) for seq in seqs]
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    (workspace,) = impl.workspaces.values()
    assert fused_counts(workspace).eq(0).all()


def test_leader_queries_with_their_own_strides(impl):
    """A follower's distant queries are its leader's: another layer's tensor, with
    strides of its own (here a view into a wider buffer, NaN around it)."""
    def strided(inputs, query_start_loc, seq_lens, output):
        qd = inputs.q_distant
        wide = torch.full((*qd.shape[:2], 3 * qd.shape[2]), float("nan"))
        wide[..., DIM : 2 * DIM] = qd
        impl(replace(inputs, q_distant=wide[..., DIM : 2 * DIM]), query_start_loc, seq_lens,
             output)

    gen = torch.Generator().manual_seed(19)
    seqs = [random_sequence(n, gen) for n in (30, 21)]
    outs = run_paged(strided, seqs, [[12, 1, 17], [20, 1]], 4, gen, sink=2, recent=6)
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, sink=2, recent=6),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("slope", [0.25, 1.0])
@pytest.mark.parametrize("feed", ["one_prefill", "prefill_then_decode"])
def test_rising_logits_equal_dense_reference(impl, feed, slope):
    """Logits that rise along the context (up to about 50 nats), so that the running
    softmax maximum of every scan moves past the kernels' STALE_MAX mid-scan (every
    16-key tile, or every second one): the rescales there leave the result exact."""
    gen = torch.Generator().manual_seed(17)
    lengths = [37, 20, 51]
    seqs = [rising_logits(random_sequence(n, gen), slope, gen) for n in lengths]
    outs = run_paged(impl, seqs, [FEEDS[feed](n) for n in lengths], 8, gen,
                     sink=3, recent=9, share="scores")
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, sink=3, recent=9),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tau", [0.3, 0.7, 1.0])
def test_gate_skip_matches_reference(impl, tau):
    gen = torch.Generator().manual_seed(7)
    seqs = [random_sequence(n, gen) for n in (40, 29)]
    outs = run_paged(impl, seqs, [[13, 1, 1, 25], [29]], 5, gen, sink=2, recent=6, tau=tau)
    for seq, out in zip(seqs, outs, strict=False):
        torch.testing.assert_close(out.double(), reference(seq, sink=2, recent=6, tau=tau),
                                   atol=2e-5, rtol=1e-4)


def test_gate_skip_changes_rows():
    """The gate skip is not a no-op: with tau small enough rows lose their distant part."""
    gen = torch.Generator().manual_seed(3)
    seq = random_sequence(30, gen)
    plain = reference(seq, sink=1, recent=4)
    skipped = reference(seq, sink=1, recent=4, tau=0.05)
    assert (plain - skipped).abs().max() > 1e-3


def test_no_distant_tokens_is_ordinary_attention(impl):
    """Invariant 1: with n_s + n_r beyond every position, a follower is plain attention."""
    gen = torch.Generator().manual_seed(11)
    seqs = [random_sequence(n, gen) for n in (25, 18)]
    outs = run_paged(impl, seqs, [[10, 15], [1] * 18], 4, gen, sink=4, recent=30)
    for seq, out in zip(seqs, outs, strict=False):
        expected = dense_attention(seq["q"], seq["k"], seq["v"], SCALE)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_leader_is_ordinary_attention(impl):
    """Invariant 2, through the paged leader path (no distant branch)."""
    gen = torch.Generator().manual_seed(5)
    seqs = [random_sequence(n, gen) for n in (33, 9)]
    outs = run_paged(impl, seqs, [[20, 1, 12], [4, 5]], 8, gen, sink=0, recent=1, leader=True)
    for seq, out in zip(seqs, outs, strict=False):
        expected = dense_attention(seq["q"], seq["k"], seq["v"], SCALE)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("leader", "recent"), [(True, 9), (False, 9), (False, 40)],
                         ids=["leader", "follower", "follower_long_window"])
def test_triton_prefill_skips_masks_only_where_every_row_keeps_the_tile(leader, recent):
    """A prefill tile that ends at or before its rows' first query (less the window, in
    a follower's distant branch) and, in a follower's window, starts at or after the
    last row's window start runs without masks. Chunks of 7 queries over key tiles of 16
    put those edges at every offset of a tile: a tile let through one position too early
    or too late shows a row a future key, a distant key in its window or a window key
    twice, and fails. A window of 40 holds whole unmasked tiles; one of 9 none. Its
    window tiles start at the first row's window start plus whole tiles, so only chunks
    of 2 + 16k queries put one at the last row's window start less one: they are fed."""
    gen = torch.Generator().manual_seed(23)
    seqs = [random_sequence(n, gen) for n in (115, 30)]
    feed = ([[5] + [7, 2, 18] * 4 + [2], [7, 2, 18, 3]] if recent > 16
            else [[7] * 16 + [3], [7] * 4 + [2]])
    outs = run_paged(triton_impl(), seqs, feed, 4, gen, sink=3, recent=recent, leader=leader)
    for seq, out in zip(seqs, outs, strict=True):
        expected = (dense_attention(seq["q"], seq["k"], seq["v"], SCALE) if leader
                    else reference(seq, sink=3, recent=recent))
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [4, 5], ids=["pages_divide_tiles", "pages_straddle"])
@pytest.mark.parametrize("leader", [True, False], ids=["leader", "follower_keys"])
def test_triton_decode_with_fixed_slots(leader, block_size):
    """TritonConfig.decode_fixed_slots: decode scans compute a key's page slot offset
    once, before the loop, where pages divide a tile (4 into 16), and per tile where
    they do not (5). Windows and chunks start off page boundaries (sink 3, recent 9,
    chunks of 16), so an offset taken from the wrong position reads another key."""
    gen = torch.Generator().manual_seed(29)
    seqs = [random_sequence(n, gen) for n in (43, 26)]
    feed = [[20] + [1] * 23, [17] + [1] * 9]
    outs = run_paged(triton_impl(decode_fixed_slots=True), seqs, feed, block_size, gen,
                     sink=3, recent=9, share="keys", leader=leader)
    for seq, out in zip(seqs, outs, strict=True):
        expected = (dense_attention(seq["q"], seq["k"], seq["v"], SCALE) if leader
                    else reference(seq, sink=3, recent=9, share="keys"))
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_follower_equal_to_leader_gives_leader_output(impl):
    """Invariant 5: share=scores, follower q, K, V equal to the leader's -> leader output."""
    gen = torch.Generator().manual_seed(13)
    seq = random_sequence(45, gen)
    seq["qa"], seq["ka"] = seq["q"], seq["k"]
    out = run_paged(impl, [seq], [[20, 1, 1, 23]], 6, gen, sink=2, recent=7)[0]
    expected = dense_attention(seq["q"], seq["k"], seq["v"], SCALE)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_reference_differs_from_plain_attention():
    """Sanity: the follower rule really changes outputs once distant tokens exist."""
    gen = torch.Generator().manual_seed(17)
    seq = random_sequence(30, gen)
    plain = dense_attention(seq["q"], seq["k"], seq["v"], SCALE)
    assert (reference(seq, sink=2, recent=5) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["native", "triton"])
def test_half_precision_caches(name, dtype):
    """The kernels read bf16/fp16 caches; compare with the reference on the same rounded
    inputs. On a GPU, Triton multiplies probabilities by values in the cache's type
    (as flash attention does): relative error within 1e-2 there."""
    if name == "native":
        assert native.available(torch.device("cpu")), "the CPU kernel was not built"
    impl = IMPLEMENTATIONS[name]()
    gen = torch.Generator().manual_seed(23)
    seqs = [random_sequence(n, gen) for n in (41, 26)]
    for seq in seqs:
        for key in seq:
            seq[key] = seq[key].to(dtype).float()
    outs = run_paged(impl, seqs, [[17, 1, 1, 22], [26]], 8, gen,
                     sink=3, recent=9, cache_dtype=dtype)
    tolerance = 1e-2 if name == "triton" and torch.cuda.is_available() else 1e-4
    for seq, out in zip(seqs, outs, strict=True):
        expected = reference(seq, sink=3, recent=9)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), expected, atol=tolerance / 5, rtol=tolerance)


@pytest.mark.parametrize("dim", [64, 128, 40])
@pytest.mark.parametrize("share", ["scores", "keys"])
def test_native_bf16_at_real_head_sizes(dim, share):
    """bf16 caches at real head sizes: with AVX-512 BF16 the kernel takes its vector
    paths here (bf16 dot products, 16-key decode steps, register-blocked value sums;
    40 is not a multiple of 32 and takes the generic one). Whole and chunked prefill,
    decode and mixed steps, GQA, a block size that divides no length."""
    assert native.available(torch.device("cpu")), "the CPU kernel was not built"
    gen = torch.Generator().manual_seed(dim)
    seqs = [random_sequence(n, gen, heads=6, kv_heads=2, dim=dim) for n in (83, 50, 37)]
    for seq in seqs:
        for key in seq:
            seq[key] = seq[key].bfloat16().float()
    feeds = [[40, 1, 1, 2, 39], [1] * 50, [5, 7, 25]]
    outs = run_paged(native.native_pod_attention, seqs, feeds, 16, gen, sink=3, recent=20,
                     share=share, cache_dtype=torch.bfloat16)
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, sink=3, recent=20, share=share),
                                   atol=2e-5, rtol=1e-4)


def test_native_threads_give_the_same_outputs():
    """Tasks are handed to threads dynamically; every one is done once, whatever the count."""
    assert native.available(torch.device("cpu")), "the CPU kernel was not built"
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(3)
    seqs = [random_sequence(n, gen, heads=6, kv_heads=2, dim=64) for n in (70, 33, 51, 9)]
    feeds = [[70], [33], [30, 21], [9]]
    outs = {}
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            outs[count] = run_paged(native.native_pod_attention, seqs, feeds, 16,
                                    torch.Generator().manual_seed(4), sink=2, recent=16)
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(outs[1], outs[3], strict=True):
        assert torch.equal(one, many)


def triton_write_slots():
    from vllm_layershare.attention.triton_paged import triton_write_slots as write

    if not torch.cuda.is_available():
        return write

    def on_gpu(*writes):
        moved = [(cache.cuda(), slots.cuda(), size, data.cuda())
                 for cache, slots, size, data in writes]
        write(*moved)
        for (cache, *_), (done, *_) in zip(writes, moved, strict=True):
            cache.copy_(done.cpu())
    return on_gpu


@pytest.mark.parametrize("name", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_slots_matches_indexing(name, dtype):
    """The kernels' cache writers store each token at its slot, into one channel slice
    of the cache, in the cache's dtype, and skip padding (-1) and tokens past the slots."""
    assert name != "native" or native.available(torch.device("cpu")), "CPU kernel not built"
    write = (native.write_slots if name == "native"
             else lambda *one_write: triton_write_slots()(one_write))
    gen = torch.Generator().manual_seed(29)
    cache = torch.zeros(6, KV_HEADS, 4, 2 * DIM, dtype=dtype)
    expected = cache.clone()
    # one more token than slots; in the cache's dtype, as vLLM hands keys and values over
    data = torch.randn(6, KV_HEADS, DIM, generator=gen).to(dtype)
    slots = torch.tensor([7, 0, 22, -1, 13])
    write(cache[..., DIM:], slots, 4, data)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // 4, :, slot % 4, DIM:] = data[t]
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [KV_HEADS, 3])
def test_triton_writes_a_layers_key_and_value_in_one_launch(dtype, kv_heads):
    """Two writes in one launch, as a follower makes them: its values into its own
    cache, its keys into the key window's cache, each at its own slots, block size and
    channel count; padding (-1) skipped in either; nothing else in the caches moves, with
    a number of KV heads that is not a power of two too (one program writes them all)."""
    write = triton_write_slots()
    gen = torch.Generator().manual_seed(31)
    values = torch.randn(5, kv_heads, 4, DIM, generator=gen).to(dtype)
    keys = torch.randn(3, kv_heads, 8, DIM + 8, generator=gen).to(dtype)
    expected_values, expected_keys = values.clone(), keys.clone()
    new_v = torch.randn(4, kv_heads, DIM, generator=gen).to(dtype)
    new_k = torch.randn(4, kv_heads, DIM, generator=gen).to(dtype)
    v_slots, k_slots = torch.tensor([9, -1, 2, 19]), torch.tensor([17, 3, -1, 8])
    write((values, v_slots, 4, new_v), (keys[..., :DIM], k_slots, 8, new_k))
    for t in range(4):
        v_slot, k_slot = int(v_slots[t]), int(k_slots[t])
        if v_slot >= 0:
            expected_values[v_slot // 4, :, v_slot % 4] = new_v[t]
        if k_slot >= 0:
            expected_keys[k_slot // 8, :, k_slot % 8, :DIM] = new_k[t]
    assert torch.equal(values, expected_values)
    assert torch.equal(keys, expected_keys)


# --- estimated distant mass (distant_mass: estimated) ---------------------------------


def oracle_gate_reference(seq, *, sink, recent):
    """share=scores with the follower's TRUE distant mass: o = g o_P + (1 - g) o_D with
    g = sum_P exp(s) / (sum_P exp(s) + sum_D exp(q_l . k_l))."""
    q, k, v = seq["q"].double(), seq["k"].double(), seq["v"].double()
    qa, ka = seq["qa"].double(), seq["ka"].double()
    group = HEADS // KV_HEADS
    out = torch.zeros(q.shape[0], HEADS, DIM, dtype=torch.float64)
    for i in range(q.shape[0]):
        near = [j for j in range(i + 1) if j < sink or j > i - recent]
        far = [j for j in range(i + 1) if j not in near]
        for h in range(HEADS):
            kv = h // group
            s_near = SCALE * k[near, kv] @ q[i, h]
            o = torch.softmax(s_near, 0) @ v[near, kv]
            if far:
                own = torch.exp(SCALE * k[far, kv] @ q[i, h]).sum()
                g = torch.exp(s_near).sum() / (torch.exp(s_near).sum() + own)
                o = g * o + (1 - g) * (torch.softmax(SCALE * ka[far, kv] @ qa[i, h], 0)
                                       @ v[far, kv])
            out[i, h] = o
    return out


def brute_force_mass(seq, i, h, *, sink, recent, size, offsets=None):
    """log M(i) from its definition: whole blocks by their mean key (weighed S e^delta_h),
    the rest exactly."""
    q, k = seq["q"].double(), seq["k"].double()
    kv = h // (HEADS // KV_HEADS)
    terms = []
    for j in range(sink, i - recent + 1):
        b = j // size
        whole = b * size >= sink and (b + 1) * size - 1 <= i - recent
        if not whole:
            terms.append(SCALE * q[i, h] @ k[j, kv])
        elif j % size == 0:
            delta = 0.0 if offsets is None else offsets[h]
            terms.append(SCALE * q[i, h] @ k[j:j + size, kv].mean(0) + math.log(size) + delta)
    return torch.logsumexp(torch.stack(terms), 0) if terms else torch.tensor(float("-inf"))


def estimated_reference(seq, *, sink, recent, size, share="scores", tau=None, offsets=None):
    return dense_pod_attention(seq["q"], seq["k"], seq["v"], seq["qa"], seq["ka"], SCALE,
                               sink=sink, recent=recent, share=share, gate_skip_threshold=tau,
                               distant_mass="estimated", summary_tokens=size,
                               summary_offsets=offsets)


def host_summaries(keys: PagedPart, summary: SummaryPart, loc: list[int],
                   seq_lens: list[int]) -> None:
    """mass.write_summaries for a step given as query_start_loc and seq_lens: the tokens
    that complete a summary block are selected on the host, as the metadata builder does."""
    positions = torch.cat([torch.arange(n - (loc[i + 1] - loc[i]), n)
                           for i, n in enumerate(seq_lens)])
    token_rows = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(loc).diff())
    ends = (positions + 1) % summary.summary_tokens == 0
    write_summaries(keys, summary, token_rows[ends], positions[ends])


def run_estimated(impl, seqs, feed, block_size, gen, *, sink, recent, size, share="scores",
                  tau=None, offsets=None):
    """Like run_paged, with vLLM's block-granular freeing of follower keys (a key block
    goes once all its tokens are distant; sink blocks stay) and a persistent summary
    cache of two states per page, written each step. Returns (outputs, log M per step)."""
    lengths = [s["q"].shape[0] for s in seqs]
    batch = PagedBatch(lengths, block_size, gen)
    per_page = 2 * size
    pages = [math.ceil(n / per_page) for n in lengths]
    table = torch.randperm(sum(pages) + 2, generator=gen)[: sum(pages)]
    summary_table = torch.zeros(len(seqs), max(pages), dtype=torch.int64)
    offset = 0
    for row, n in enumerate(pages):
        summary_table[row, :n] = table[offset:offset + n]
        offset += n
    summary_cache = torch.full((sum(pages) + 2, KV_HEADS, 2, DIM), float("nan"))
    outs = [torch.zeros(n, HEADS, DIM) for n in lengths]
    masses = [torch.zeros(n, HEADS) for n in lengths]
    done = [0] * len(seqs)
    kept_blocks = math.ceil(sink / block_size)
    for step in range(max(len(f) for f in feed)):
        rows = [r for r in range(len(seqs)) if step < len(feed[r])]
        loc, seq_lens, spans, keys = [0], [], [], []
        for r in rows:
            a, b = done[r], done[r] + feed[r][step]
            loc.append(loc[-1] + b - a)
            seq_lens.append(b)
            spans.append((r, a, b))
            k = seqs[r]["k"][:b].clone()
            for blk in range(kept_blocks, b // block_size + 1):
                if (blk + 1) * block_size - 1 < a - recent + 1:
                    k[blk * block_size:(blk + 1) * block_size] = float("nan")
            keys.append(k)
        own_keys = batch.part(rows, keys)
        summary = SummaryPart(summary_cache, summary_table[rows], per_page, size,
                              SummaryPart.log_weights(size, HEADS, offsets))
        # Triton: in steps of one-query rows the decode kernel writes them, else a
        # device-side writer; the others: the host-driven writer
        in_kernel = (getattr(impl, "decode_writes_summaries", False)
                     and all(b - a == 1 for _, a, b in spans))
        if not in_kernel:
            getattr(impl, "write_summaries", host_summaries)(own_keys, summary, loc, seq_lens)
        q = torch.cat([seqs[r]["q"][a:b] for r, a, b in spans])
        inputs = LayerInputs(
            q=q, scale=SCALE, k_prox=own_keys,
            v=batch.part(rows, [seqs[r]["v"][:b] for r, _, b in spans]),
            sink=sink, recent=recent, gate_skip_threshold=tau,
            q_distant=torch.cat([seqs[r]["qa" if share == "scores" else "q"][a:b]
                                 for r, a, b in spans]),
            k_distant=batch.part(rows, [seqs[r]["ka"][:b] for r, _, b in spans]),
            summary=summary,  # each implementation estimates the mass itself
        )
        mass = estimated_mass(q, own_keys, summary, loc, seq_lens, sink, recent, SCALE)
        out = torch.zeros(loc[-1], HEADS, DIM)
        impl(inputs, loc, seq_lens, out, *([True] if in_kernel else []))
        for i, (r, a, b) in enumerate(spans):
            outs[r][a:b] = out[loc[i]:loc[i + 1]]
            masses[r][a:b] = mass[loc[i]:loc[i + 1]]
            done[r] = b
    return outs, masses


@pytest.mark.parametrize("feed", list(FEEDS))
@pytest.mark.parametrize("size, block_size, sink, offsets", [
    (4, 8, 3, None), (8, 8, 5, [0.9, -0.4, 1.7, 2.5]), (1, 4, 2, None)])
def test_estimated_mass_equals_dense_reference(impl, feed, size, block_size, sink, offsets):
    """Paged estimated mass (summaries written as blocks complete, any feeding, freed
    key blocks NaN, calibrated per-head offsets or none) equals the dense reference of
    the same estimate."""
    assert offsets is None or len(offsets) == HEADS
    gen = torch.Generator().manual_seed(hash((feed, size, block_size)) % 1000)
    lengths = [45, 20, 58]
    seqs = [random_sequence(n, gen) for n in lengths]
    outs, masses = run_estimated(impl, seqs, [FEEDS[feed](n) for n in lengths], block_size, gen,
                                 sink=sink, recent=9, size=size, offsets=offsets)
    for seq, out, mass in zip(seqs, outs, masses, strict=True):
        ref = estimated_reference(seq, sink=sink, recent=9, size=size, offsets=offsets)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
        for i in {0, 13, len(out) // 2 + 5, len(out) - 1}:
            for h in (0, 3):
                expected = brute_force_mass(seq, i, h, sink=sink, recent=9, size=size,
                                            offsets=offsets)
                torch.testing.assert_close(mass[i, h].double(), expected.double(), atol=1e-5,
                                           rtol=1e-5)


@pytest.mark.parametrize("share, tau", [("keys", None), ("scores", 0.6)])
def test_estimated_mass_with_keys_share_and_gate_skip(impl, share, tau):
    gen = torch.Generator().manual_seed(31)
    seqs = [random_sequence(n, gen) for n in (50, 33)]
    outs, _ = run_estimated(impl, seqs, [[21, 1, 1, 27], [33]], 8, gen, sink=3, recent=7,
                            size=4, share=share, tau=tau)
    for seq, out in zip(seqs, outs, strict=True):
        ref = estimated_reference(seq, sink=3, recent=7, size=4, share=share, tau=tau)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("writer", ["torch", "triton"])
@pytest.mark.parametrize("feed", list(FEEDS))
def test_summaries_are_the_block_means(writer, feed):
    """After every step, exactly the summary blocks whose last token has been written hold
    the mean of their keys, at the page and state the summary table gives; the rest of
    the cache is untouched (NaN), padding rows (no query, no context) included."""
    size, per_page, gen = 4, 8, torch.Generator().manual_seed(41)
    lengths = [45, 20, 58]
    seqs = [random_sequence(n, gen) for n in lengths]
    batch = PagedBatch(lengths, 8, gen)
    pages = [math.ceil(n / per_page) for n in lengths]
    ids = torch.randperm(sum(pages) + 2, generator=gen)
    table = torch.zeros(len(lengths) + 1, max(pages), dtype=torch.int64)  # + a padding row
    table[:-1] = torch.stack([ids[sum(pages[:r]):][:max(pages)] for r in range(len(pages))])
    cache = torch.full((sum(pages) + 2, KV_HEADS, per_page // size, DIM), float("nan"))
    feeds = [FEEDS[feed](n) for n in lengths]
    write = triton_impl().write_summaries if writer == "triton" else host_summaries
    done = [0] * len(lengths)
    for step in range(max(len(f) for f in feeds)):
        rows = [r for r in range(len(lengths)) if step < len(feeds[r])]
        loc, seq_lens = [0], []
        for r in rows:
            done[r] += feeds[r][step]
            loc.append(loc[-1] + feeds[r][step])
            seq_lens.append(done[r])
        loc.append(loc[-1])  # the padding row
        seq_lens.append(0)
        keys = batch.part(rows, [seqs[r]["k"] for r in rows])  # later keys too: none read
        keys.block_table = torch.cat([keys.block_table, keys.block_table[:1] * 0])
        summary = SummaryPart(cache, table[rows + [len(lengths)]], per_page, size,
                              SummaryPart.log_weights(size, HEADS))
        write(keys, summary, loc, seq_lens)
        expected = torch.full_like(cache, float("nan"))
        for r, n in enumerate(done):
            for b in range(n // size):
                page = table[r, b * size // per_page]
                expected[page, :, (b * size % per_page) // size] = (
                    seqs[r]["k"][b * size:(b + 1) * size].mean(0))
        torch.testing.assert_close(cache, expected, equal_nan=True, atol=1e-6, rtol=1e-6)


def test_one_token_summaries_give_the_oracle_gate():
    """With every distant block summarised exactly (S = 1) the estimated mass is the
    true mass: the follower equals the oracle-gate reference."""
    gen = torch.Generator().manual_seed(37)
    seq = random_sequence(36, gen)
    expected = oracle_gate_reference(seq, sink=3, recent=8)
    got = estimated_reference(seq, sink=3, recent=8, size=1)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    coarse = estimated_reference(seq, sink=3, recent=8, size=4)
    assert (coarse - expected).abs().max() > 1e-4  # a real estimate, not the oracle
    published = reference(seq, sink=3, recent=8)
    assert (published - expected).abs().max() > 1e-3


@pytest.mark.parametrize("slope", [None, 1.0], ids=["random_logits", "rising_logits"])
@pytest.mark.parametrize("bound", [None, 64], ids=["step_longest", "static_bound"])
@pytest.mark.parametrize("score_page, split_len", [(5, 16), (32, 48)],
                         ids=["pages_across_tiles", "tiles_within_pages"])
def test_decode_followers_read_the_leaders_scores(bound, score_page, split_len, slope):
    """Share `scores` on the GPU kernels: in one-query rows the leader writes the
    softmax terms of the distant tokens per key tile and the follower reads them
    instead of the leader's keys, which are NaN for it there; rows with several queries
    still read keys. Leader and follower equal the dense references, prefill, chunks
    and decode mixed in steps. Scores pages of 5 tokens (a 16-position tile spans
    several) and of 32 (two tiles per page, decode chunks of three tiles); the cache
    starts as NaN, so any value the follower reads and the leader did not write shows.
    In steps of one-query rows the follower has no leader's queries, as in the backend.
    Rising logits (rising_logits) make the follower's running maximum move mid-scan."""
    impl = triton_impl(bound=bound, split_len=split_len)
    gen = torch.Generator().manual_seed(41)
    sink, recent, block_size = 3, 7, 8
    lengths = [40, 29, 52]
    seqs = [random_sequence(n, gen) for n in lengths]
    if slope is not None:
        seqs = [rising_logits(seq, slope, gen) for seq in seqs]
    feed = [[30] + [1] * 10, [20, 9], [20, 20] + [1] * 12]
    batch = PagedBatch(lengths, block_size, gen)
    # The scores companion: its own pages and block table.
    score_pages = PagedBatch(lengths, score_page, gen)
    cell = SharedScores.cell_floats(HEADS // KV_HEADS, score_page, torch.float32)
    scores = torch.full((score_pages.num_blocks, KV_HEADS, cell), float("nan"))
    lead_outs = [torch.zeros(n, HEADS, DIM) for n in lengths]
    outs = [torch.zeros(n, HEADS, DIM) for n in lengths]
    done = [0] * len(seqs)
    for step in range(max(map(len, feed))):
        rows = [r for r in range(len(seqs)) if step < len(feed[r])]
        spans = [(r, done[r], done[r] + feed[r][step]) for r in rows]
        loc = [0]
        for _, a, b in spans:
            loc.append(loc[-1] + b - a)
        seq_lens = [b for _, _, b in spans]
        lead_keys, follower_view = [], []
        for r, a, b in spans:
            lead_keys.append(seqs[r]["ka"][:b])
            hidden = seqs[r]["ka"][:b].clone()
            if b - a == 1:  # a shared row: the follower must not read these keys
                hidden[sink:max(sink, b - recent)] = float("nan")
            follower_view.append(hidden)
        leader = LayerInputs(
            q=torch.cat([seqs[r]["qa"][a:b] for r, a, b in spans]), scale=SCALE,
            k_prox=batch.part(rows, lead_keys),
            v=batch.part(rows, [seqs[r]["v"][:b] for r, _, b in spans]),
            shared_scores=SharedScores(scores, score_pages.block_table[rows], score_page, sink,
                                       recent, write=True))
        lead_out = torch.zeros(loc[-1], HEADS, DIM)
        impl(leader, loc, seq_lens, lead_out)
        own_keys = []
        for r, a, b in spans:
            k = seqs[r]["k"][:b].clone()
            k[sink:max(sink, a - recent + 1)] = float("nan")
            own_keys.append(k)
        follower = LayerInputs(
            q=torch.cat([seqs[r]["q"][a:b] for r, a, b in spans]), scale=SCALE,
            k_prox=batch.part(rows, own_keys), v=leader.v, sink=sink, recent=recent,
            q_distant=None if all(b - a == 1 for _, a, b in spans) else leader.q,
            k_distant=batch.part(rows, follower_view),
            shared_scores=SharedScores(scores, score_pages.block_table[rows], score_page, sink,
                                       recent, write=False))
        out = torch.zeros(loc[-1], HEADS, DIM)
        impl(follower, loc, seq_lens, out)
        for i, (r, a, b) in enumerate(spans):
            lead_outs[r][a:b] = lead_out[loc[i]:loc[i + 1]]
            outs[r][a:b] = out[loc[i]:loc[i + 1]]
            done[r] = b
    assert all(done[r] == lengths[r] for r in range(len(seqs)))
    for seq, lead_out, out in zip(seqs, lead_outs, outs, strict=True):
        plain = dense_attention(seq["qa"], seq["ka"], seq["v"], SCALE)
        torch.testing.assert_close(lead_out.double(), plain, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.double(), reference(seq, sink=sink, recent=recent),
                                   atol=2e-5, rtol=1e-4)


def test_follower_without_leader_queries_is_refused_where_it_needs_them():
    """A share-`scores` follower may go without its leader's queries only in a step of
    one-query rows that reads the leader's shared scores: a row of several queries
    recomputes the distant logits from them, so the call refuses it by name."""
    from vllm_layershare.attention.triton_paged import triton_pod_attention

    gen = torch.Generator().manual_seed(5)
    seq = random_sequence(20, gen)
    batch = PagedBatch([20], 8, gen)
    cell = SharedScores.cell_floats(HEADS // KV_HEADS, 8, torch.float32)
    scores = SharedScores(torch.zeros(batch.num_blocks, KV_HEADS, cell), batch.block_table,
                          8, 3, 7, write=False)
    part = batch.part([0], [seq["k"]])
    for shared in (scores, None):
        follower = LayerInputs(q=seq["q"][16:20], scale=SCALE, k_prox=part,
                               v=batch.part([0], [seq["v"]]), sink=3, recent=7,
                               k_distant=part, shared_scores=shared)
        with pytest.raises(ValueError, match="leader's queries"):
            triton_pod_attention(int32_tables(follower), [0, 4], [20],
                                 torch.zeros(4, HEADS, DIM))


def test_triton_refuses_shared_scores_cells_too_small():
    """A shared-scores cache whose cells cannot hold a page's terms and its tiles'
    log-sum-exps (fewer floats than SharedScores.cell_floats asks) is refused with a
    message that names the need, before any kernel writes past a cell. (On a GPU the
    call that fits runs there.)"""
    from vllm_layershare.attention.triton_paged import triton_pod_attention

    gen = torch.Generator().manual_seed(2)
    seq = random_sequence(20, gen)
    batch = PagedBatch([20], 8, gen)
    group = HEADS // KV_HEADS
    cell = SharedScores.cell_floats(group, 8, torch.float32)
    for floats, ok in ((cell, True), (group * 8, False)):
        scores = SharedScores(torch.zeros(batch.num_blocks, KV_HEADS, floats),
                              batch.block_table, 8, 3, 7, write=True)
        leader = LayerInputs(q=seq["qa"][19:20], scale=SCALE,
                             k_prox=batch.part([0], [seq["ka"]]),
                             v=batch.part([0], [seq["v"]]), shared_scores=scores)
        launch = on_gpu(triton_pod_attention) if torch.cuda.is_available() else (
            triton_pod_attention)
        call = functools.partial(launch, int32_tables(leader), [0, 1], [20],
                                 torch.zeros(1, HEADS, DIM))
        if ok:
            call()
        else:
            with pytest.raises(ValueError, match="cell_floats"):
                call()


@pytest.mark.parametrize("fused_merge", [False, True], ids=["merge_kernel", "fused_merge"])
def test_triton_decode_step_replays_in_a_cuda_graph(fused_merge):
    """A decode step as a full CUDA graph runs it: a leader writing its followers'
    logits and a follower reading them, launched on static tensors (queries, lengths,
    outputs, one workspace, a static bound on the context), then replayed for later
    steps with new queries and lengths copied into those tensors; leader and follower
    equal the dense references at every step, and the follower's summaries of the
    blocks its steps completed are written. The static batch has a padding row, as
    vLLM pads a batch to a captured size (no query, no context, block-table row 0), and
    from step 3 a second one (a request that finished). On a GPU the launches are
    captured in a CUDA graph and replayed; without one the same calls are repeated
    (interpreter). With fused_merge, the merge's counts are back at 0 after every step.
    """
    from vllm_layershare.attention.triton_paged import (
        TritonConfig,
        decode_workspace,
        triton_pod_attention,
        triton_write_summaries,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(43)
    sink, recent, bound, steps = 3, 7, 64, 5
    lengths, first = [40, 29, 52], [30, 12, 46]  # first: each row's first query position
    seqs = [random_sequence(n, gen) for n in lengths]
    batch, score_pages = PagedBatch(lengths, 8, gen), PagedBatch(lengths, 5, gen)

    def padded(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([table, torch.zeros_like(table[:1])]).to(device)

    def cached(key: str, fill: float | None = None) -> PagedPart:
        part = batch.part([0, 1, 2], [s[key] if fill is None else torch.full_like(s[key], fill)
                                      for s in seqs])
        return replace(part, cache=part.cache.to(device), block_table=padded(part.block_table))

    def zeros(*shape, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    q_lead, q_own, lead_out, out = (zeros(4, HEADS, DIM) for _ in range(4))
    starts, lens = zeros(5, dtype=torch.int64), zeros(4, dtype=torch.int64)
    scores = SharedScores(
        torch.full((score_pages.num_blocks, KV_HEADS,
                    SharedScores.cell_floats(HEADS // KV_HEADS, 5, torch.float32)), float("nan"),
                   device=device), padded(score_pages.block_table), 5, sink, recent,
        write=True)
    values = cached("v")
    leader = LayerInputs(q=q_lead, k_prox=cached("ka"), v=values, scale=SCALE,
                         shared_scores=scores)
    follower = LayerInputs(q=q_own, k_prox=cached("k"), v=values, scale=SCALE, sink=sink,
                           recent=recent, q_distant=q_lead, k_distant=cached("ka", float("nan")),
                           shared_scores=replace(scores, write=False))
    # Under the interpreter (one "SM") the follower runs one chunk, the leader 4: it reads
    # the leader's scores per tile, whichever chunk wrote them.
    config = TritonConfig(decode_block_n=16, min_split_len=16, scores_programs_per_sm=8,
                          fused_merge=fused_merge)
    workspace = decode_workspace(4, HEADS, KV_HEADS, DIM, bound, device, config)
    size, per_page, summary_pages = 4, 8, PagedBatch(lengths, 8, gen)
    summary = SummaryPart(torch.full((summary_pages.num_blocks, KV_HEADS, 2, DIM), float("nan"),
                                     device=device), padded(summary_pages.block_table),
                          per_page, size, SummaryPart.log_weights(size, HEADS))

    def step() -> None:
        triton_write_summaries(follower.k_prox, summary, starts, lens)
        for inputs, output in ((leader, lead_out), (follower, out)):
            triton_pod_attention(inputs, starts, lens, output, 1, bound, config, workspace)

    def load(t: int) -> list[int]:
        """Step t's queries and context lengths into the static tensors; rows past the
        live requests are padding."""
        positions = [f + t for f in first][: 3 if t < 3 else 2]
        live = len(positions)
        q_lead[:live] = torch.stack([seqs[r]["qa"][p] for r, p in enumerate(positions)])
        q_own[:live] = torch.stack([seqs[r]["q"][p] for r, p in enumerate(positions)])
        starts.copy_(torch.tensor([min(r, live) for r in range(5)]))
        lens.copy_(torch.tensor([p + 1 for p in positions] + [0] * (4 - live)))
        return positions

    run = step
    if device.type == "cuda":
        load(0)
        step()  # compiles the kernels before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    expected_lead = [dense_attention(s["qa"], s["ka"], s["v"], SCALE) for s in seqs]
    expected = [reference(s, sink=sink, recent=recent) for s in seqs]
    last = list(first)
    for t in range(steps):
        positions = load(t)
        last[: len(positions)] = positions
        lead_out.fill_(float("nan"))
        out.fill_(float("nan"))
        run()
        for r, p in enumerate(positions):
            torch.testing.assert_close(lead_out[r].cpu().double(), expected_lead[r][p],
                                       atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(out[r].cpu().double(), expected[r][p],
                                       atol=2e-5, rtol=1e-4)
        means = torch.full_like(summary.cache, float("nan"))  # blocks completed in steps
        for r, seq in enumerate(seqs):
            for b in range(first[r] // size, (last[r] + 1) // size):
                page = summary_pages.block_table[r, b * size // per_page]
                means[page, :, b % 2] = seq["k"][b * size:(b + 1) * size].mean(0)
        torch.testing.assert_close(summary.cache, means, equal_nan=True)
        assert fused_counts(workspace).eq(0).all()


def test_host_integer_helpers_match_tritons():
    """The launcher's host arithmetic avoids triton.cdiv / next_power_of_2 (constexpr
    functions, microseconds a call on the host) and must agree with them."""
    import triton

    from vllm_layershare.attention import triton_paging

    for a in range(300):
        for b in (1, 2, 3, 7, 16, 256):
            assert triton_paging._cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in range(1, 1100):
        assert triton_paging._pow2(n) == triton.next_power_of_2(n), n


def test_triton_steps_without_decode_rows_launch_no_decode_kernels(monkeypatch):
    """Only steps with a one-query row launch the decode kernels (two launches per layer
    saved in a prefill step): seen in the host lists, or as the backend says it
    (decode_rows, from vLLM's host query lengths); mixed steps still decode every row."""
    from vllm_layershare.attention import triton_paged

    launches = []
    real = triton_paged._decode
    monkeypatch.setattr(triton_paged, "_decode",
                        lambda *args: launches.append(args[4].shape[0]) or real(*args))
    gen = torch.Generator().manual_seed(8)
    seqs = [random_sequence(n, gen) for n in (12, 10)]
    feed = [[5, 1, 4, 2], [2, 2, 1, 5]]  # steps: prefill, mixed, mixed, prefill
    outs = run_paged(triton_impl(), seqs, feed, 4, gen, sink=2, recent=3)
    for seq, out in zip(seqs, outs, strict=True):
        torch.testing.assert_close(out.double(), reference(seq, sink=2, recent=3),
                                   atol=2e-5, rtol=1e-4)
    assert launches == [2, 2], launches  # the two mixed steps, each with both requests

    launches.clear()
    seq = random_sequence(6, gen)
    batch = PagedBatch([6], 4, gen)
    inputs = LayerInputs(q=seq["q"], scale=scale_of(seq), k_prox=batch.part([0], [seq["k"]]),
                         v=batch.part([0], [seq["v"]]))
    out = torch.zeros(6, HEADS, DIM)
    starts, lens = torch.tensor([0, 6]), torch.tensor([6])

    def told(*args):  # as the backend calls it: device tensors, its host flag
        triton_paged.triton_pod_attention(*args, 6, 6, decode_rows=False)

    (on_gpu(told) if torch.cuda.is_available() else told)(int32_tables(inputs), starts, lens,
                                                          out)
    assert launches == []
    torch.testing.assert_close(out.double(), dense_attention(
        seq["q"].double(), seq["k"].double(), seq["v"].double(), scale_of(seq)),
        atol=2e-5, rtol=1e-4)
