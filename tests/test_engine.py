"""The backend inside real vLLM (in-process engine, tiny random Llama, fp32)."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest
import torch
from conftest import close_llm, make_llm, write_grouping
from hf_reference import reference_logprobs
from vllm import SamplingParams

from vllm_layershare import backend, integration
from vllm_layershare.config import load_config


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(length + 7 * i)] for i in range(n)]


def generate(llm, prompts, max_tokens=24):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_no_distant_tokens_is_token_identical_to_stock(tiny_model, tmp_path):
    """Invariant 1 end to end: recent window beyond the context -> stock outputs."""
    prompts = random_prompts(3, 60, seed=1)
    stock = make_llm(tiny_model, None)
    expected = generate(stock, prompts)
    close_llm(stock)

    grouping = write_grouping(tmp_path / "g.yaml", recent_tokens=2048)
    calls = backend.FORWARD_CALLS
    llm = make_llm(tiny_model, grouping)
    got = generate(llm, prompts)
    close_llm(llm)
    assert backend.FORWARD_CALLS > calls, "the layershare impl never ran"
    assert got == expected


@pytest.mark.parametrize(
    "overrides",
    [
        {"distant_mass": "leader"},
        {"share": "keys", "distant_mass": "leader"},
        {"gate_skip_threshold": 0.6, "sink_tokens": 0, "distant_mass": "leader"},
        {"distant_mass": "estimated", "summary_tokens": 16, "sink_tokens": 5},
        {"distant_mass": "estimated", "summary_tokens": 16, "summary_offsets": {
            1: [1.5, -0.7, 0.3, 2.0], 2: [0.0, 1.1, -1.2, 0.6], 4: [2.2, 0.4, 0.9, -0.3],
            5: [-0.5, 1.8, 0.2, 1.0]}},
        {"distant_mass": "estimated", "share": "keys", "gate_skip_threshold": 0.7},
    ],
    ids=["scores", "keys", "gate_skip", "estimated_mass", "estimated_offsets",
         "estimated_keys_skip"],
)
def test_prompt_logprobs_match_hf_reference(tiny_model, tmp_path, overrides):
    """Real sharing, chunked prefill and a mixed batch: prompt logprobs equal the HF
    forward pass with PoD attention (to 1e-3)."""
    grouping = write_grouping(tmp_path / "g.yaml", **overrides)
    config = load_config(grouping)
    prompts = random_prompts(2, 70, seed=2)
    llm = make_llm(tiny_model, grouping, max_num_batched_tokens=48, max_num_seqs=4)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    close_llm(llm)
    for prompt, out in zip(prompts, outs, strict=True):
        got = [entry_for(d, t) for d, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)]
        expected = reference_logprobs(tiny_model, config, prompt)
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-3


def entry_for(logprobs: dict, token: int) -> float:
    return logprobs[token].logprob


def test_sharing_changes_outputs(tiny_model, tmp_path):
    """The reference comparison above is not vacuous: sharing moves the logprobs."""
    grouping = write_grouping(tmp_path / "g.yaml")  # default: estimated distant mass
    prompt = random_prompts(1, 70, seed=2)[0]
    shared = reference_logprobs(tiny_model, load_config(grouping), prompt)
    plain = reference_logprobs(
        tiny_model, load_config(write_grouping(tmp_path / "p.yaml", recent_tokens=4096)), prompt
    )
    assert max(abs(a - b) for a, b in zip(shared, plain, strict=True)) > 1e-2


def test_preemption_recompute_gives_same_outputs(tiny_model, tmp_path, monkeypatch):
    """A KV cache too small for the batch makes vLLM preempt and recompute requests;
    greedy outputs must equal those of a run with room to spare."""
    from vllm.v1.core.sched.scheduler import Scheduler

    preemptions = []
    original = Scheduler._preempt_request

    def counting(self, request, *args, **kwargs):
        preemptions.append(request.request_id)
        return original(self, request, *args, **kwargs)

    grouping = write_grouping(tmp_path / "g.yaml")
    prompts = random_prompts(6, 40, seed=4)
    roomy = make_llm(tiny_model, grouping, max_model_len=512)
    expected = generate(roomy, prompts, max_tokens=400)
    close_llm(roomy)

    monkeypatch.setattr(Scheduler, "_preempt_request", counting)
    tight = make_llm(tiny_model, grouping, max_model_len=512,
                     kv_cache_memory_bytes=1_700_000, max_num_batched_tokens=128)
    got = generate(tight, prompts, max_tokens=400)
    close_llm(tight)
    assert preemptions, "the small cache did not force any preemption"
    assert got == expected


def greedy_with_logprobs(model, grouping, prompts, **engine_args):
    """(vLLM's compilation mode, each prompt's 6 greedy tokens with their logprobs)."""
    llm = make_llm(model, grouping, **{"max_num_batched_tokens": 48, "max_num_seqs": 4,
                                       **engine_args})
    mode = llm.llm_engine.vllm_config.compilation_config.mode
    got = greedy_of(llm, prompts)
    close_llm(llm)
    return mode, got


def greedy_of(llm, prompts):
    """Each prompt's 6 greedy tokens with their logprobs, from an engine."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [[(t, d[t].logprob) for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs,
                                                strict=True)]
            for o in outs]


def assert_same_greedy(got, expected, tolerance: float = 1e-3) -> None:
    """Same tokens, logprobs within `tolerance`."""
    for seq_got, seq_expected in zip(got, expected, strict=True):
        assert [t for t, _ in seq_got] == [t for t, _ in seq_expected]
        assert max(abs(a - b) for (_, a), (_, b) in zip(seq_got, seq_expected,
                                                          strict=True)) < tolerance


def build_also_blind(monkeypatch) -> list[int]:
    """Make every metadata build run a second time on meta-device copies of vLLM's device
    tensors, where any host read (on a GPU: a wait for the device) raises; the host
    results must be the real build's. Returns the growing list of blind builds' sizes."""
    real = backend.LayershareMetadataBuilder.build
    device_fields = ("query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping")
    blind_builds = []

    def build(self, common_prefix_len, m, fast_build=False):
        got = real(self, common_prefix_len, m, fast_build)
        blind = dataclasses.replace(m, **{f: getattr(m, f).to("meta") for f in device_fields})
        host = real(self, common_prefix_len, blind, fast_build)
        assert (host.seq_lens, host.query_start_loc) == (got.seq_lens, got.query_start_loc)
        assert host.summary_ends.shape == got.summary_ends.shape
        blind_builds.append(len(got.seq_lens))
        return got

    monkeypatch.setattr(backend.LayershareMetadataBuilder, "build", build)
    return blind_builds


@pytest.mark.parametrize("heads", [4, 6], ids=["scores_planned", "scores_outside_plan"])
def test_gpu_path_inside_vllm_equals_cpu_kernel(tiny_model, tmp_path, monkeypatch, heads):
    """The backend's GPU path inside real vLLM: Triton kernels for prefill chunks and
    split decode, Triton cache writes, leaders sharing their decode logits with their
    followers, the estimated mass; here in Triton's interpreter on CPU tensors
    (VLLM_LAYERSHARE_KERNELS=triton). Greedy tokens and their logprobs equal the CPU
    kernel's, and the shared-scores path did run: in the scores companion that vLLM
    planned, or (3 query heads per KV head: no whole number of tokens fills a page)
    over the leader's own pages. Every layer's decode used the one workspace the
    builders made from the scheduler's limits; the builders never read a device
    tensor on the host (on a GPU, a wait for the device every step); the prefill step
    told the kernels it has no decode rows (they then launch no decode kernels); in
    steps of one-query rows the followers' decode kernels wrote their summaries, and the
    leaders neither kept their queries nor did the followers read them."""
    from vllm.forward_context import get_forward_context

    from vllm_layershare.attention import triton_paged
    from vllm_layershare.tools.tiny_model import build_tiny_llama

    model = tiny_model if heads == 4 else build_tiny_llama(
        tmp_path / "gqa3", num_heads=heads, hidden_size=32 * heads)
    grouping = write_grouping(tmp_path / "g.yaml")  # share scores, estimated mass
    prompts = random_prompts(2, 60, seed=4)
    _, expected = greedy_with_logprobs(model, grouping, prompts)  # the CPU kernel
    shared_calls, page_sizes, workspaces, decode_rows = [], set(), set(), set()
    summary_writes, leader_queries = set(), set()
    real = triton_paged.triton_pod_attention

    def spying(inputs, *args, **kwargs):
        queries = tuple(args[0].diff().tolist())  # the step's query lengths
        decode_rows.add((queries, kwargs["decode_rows"]))
        if inputs.shared_scores is not None:
            shared_calls.append(inputs.shared_scores.write)
            page_sizes.add(inputs.shared_scores.block_size)
            kept = {key for key in get_forward_context().additional_kwargs
                    if key[0] == backend.LEADER_QUERY_KEY}
            # (decode step, role, leader's queries there: kept by it / given to a follower)
            leader_queries.add((max(queries) == 1, inputs.shared_scores.write,
                                bool(kept) if inputs.shared_scores.write
                                else inputs.q_distant is not None))
        workspaces.add(kwargs["workspace"].data_ptr())
        summary_writes.add((inputs.summary is not None and max(queries) == 1,
                            kwargs["write_summaries"]))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(triton_paged, "triton_pod_attention", spying)
    monkeypatch.setenv("VLLM_LAYERSHARE_KERNELS", "triton")
    blind_builds = build_also_blind(monkeypatch)
    _, got = greedy_with_logprobs(model, grouping, prompts)
    assert 2 in blind_builds, blind_builds  # decode steps of both prompts were built
    assert True in shared_calls and False in shared_calls, "no leader shared its scores"
    own_pages = {32}  # make_llm's block size: the leader's pages
    assert (page_sizes == own_pages) == (heads == 6), page_sizes
    assert len(workspaces) == 1, workspaces
    assert all(flag == (1 in queries) for queries, flag in decode_rows), decode_rows
    assert {flag for _, flag in decode_rows} == {True, False}, decode_rows
    assert summary_writes == {(True, True), (False, False)}, summary_writes
    assert leader_queries == {(True, True, False), (True, False, False), (False, True, True),
                              (False, False, True)}, leader_queries
    assert_same_greedy(got, expected)


def test_triton_kernels_run_before_the_first_request(tiny_model, tmp_path, monkeypatch):
    """vLLM runs a dummy batch through attention before serving for FlashInfer alone; the
    plugin wraps that step (gpu_worker.kernel_warmup, which CPU workers lack: called
    here) to run the Triton kernels in a mixed and a decode-only dummy batch, so that
    they compile at start-up: every layer, leaders and followers, both kinds of step.
    The dummy batches leave the caches as they were: the tokens and logprobs afterwards
    are the CPU kernel's."""
    from vllm.v1.worker import gpu_worker

    from vllm_layershare.attention import triton_paged

    grouping = write_grouping(tmp_path / "g.yaml")  # share scores, estimated mass
    prompts = random_prompts(2, 60, seed=9)
    _, expected = greedy_with_logprobs(tiny_model, grouping, prompts)  # the CPU kernel
    assert getattr(gpu_worker.kernel_warmup, "_layershare_patched", False)  # plugin loaded
    calls = []
    real = triton_paged.triton_pod_attention

    def spying(inputs, *args, **kwargs):
        queries = set(args[0].diff().tolist())
        step = "decode" if queries == {1} else "mixed" if 1 in queries else "prefill"
        calls.append((step, "follower" if inputs.k_distant is not None else "leader"))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(triton_paged, "triton_pod_attention", spying)
    monkeypatch.setenv("VLLM_LAYERSHARE_KERNELS", "triton")
    llm = make_llm(tiny_model, grouping, max_num_batched_tokens=48, max_num_seqs=4)
    assert not calls  # vLLM's own start-up ran no attention
    llm.collective_rpc(integration.warm_up_triton_kernels)
    assert sorted(calls) == sorted(
        [(step, role) for step in ("mixed", "decode")
         for role in ["leader"] * 2 + ["follower"] * 4]), calls  # 2 groups of 3 layers
    got = greedy_of(llm, prompts)
    close_llm(llm)
    assert_same_greedy(got, expected)


def test_decode_steps_replay_the_metadata_of_their_first_step(tiny_model, tmp_path,
                                                              monkeypatch):
    """What a full CUDA graph of decode steps needs from the GPU path: it reads a step's
    data only through buffers that keep their addresses from step to step. Every decode
    step here runs on the metadata built for the first decode step of its batch size,
    as a replayed graph does (that step's host values; the buffers' current contents),
    across a new page of the block table (position 64), and a summary block completed
    in such a step (at 69) and read in another (at 71); tokens and logprobs are still
    the CPU kernel's."""
    grouping = write_grouping(tmp_path / "g.yaml", recent_tokens=2, summary_tokens=2)
    prompts = random_prompts(2, 60, seed=8)  # one prefill step, then decode 60-64, 67-71
    _, expected = greedy_with_logprobs(tiny_model, grouping, prompts,
                                       max_num_batched_tokens=256)
    real = backend.LayershareMetadataBuilder.build
    first_of_size, replayed_lens = {}, set()

    def build(self, common_prefix_len, m, fast_build=False):
        got = real(self, common_prefix_len, m, fast_build)
        if got.max_query_len != 1:
            return got
        first = first_of_size.setdefault((id(self), m.num_reqs), got)
        if first is not got:
            replayed_lens.update(got.seq_lens)
        return first

    monkeypatch.setattr(backend.LayershareMetadataBuilder, "build", build)
    monkeypatch.setenv("VLLM_LAYERSHARE_KERNELS", "triton")
    _, got = greedy_with_logprobs(tiny_model, grouping, prompts, max_num_batched_tokens=256)
    assert {65, 70, 72} <= replayed_lens, replayed_lens  # positions 64, 69 and 71
    # fp32: the kernels agree to 1e-6 here; a summary left unwritten moves them 1e-4
    assert_same_greedy(got, expected, tolerance=1e-5)


def test_launch_shapes_from_the_setting_reach_the_kernels(tiny_model, tmp_path, monkeypatch):
    """VLLM_LAYERSHARE_TRITON_CONFIG sets the Triton kernels' launch shapes inside vLLM
    (interpreted here): every layer's call gets them, the one decode workspace is sized
    for them (more splits than the defaults), and with the merge fused into the split
    kernel over 32-position chunks, two per merge step, tokens and logprobs are still the
    CPU kernel's. A mistake in the setting stops start-up with its message."""
    from vllm_layershare.attention import triton_paged

    grouping = write_grouping(tmp_path / "g.yaml")  # share scores, estimated mass
    prompts = random_prompts(2, 60, seed=5)
    _, expected = greedy_with_logprobs(tiny_model, grouping, prompts)  # the CPU kernel
    fields = {"fused_merge": True, "split_len": 32, "merge_splits": 2}
    launch = triton_paged.TritonConfig(**fields)
    configs, workspaces = set(), set()
    real = triton_paged.triton_pod_attention

    def spying(inputs, *args, **kwargs):
        configs.add(kwargs["config"])
        workspaces.add(kwargs["workspace"].numel())
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(triton_paged, "triton_pod_attention", spying)
    monkeypatch.setenv("VLLM_LAYERSHARE_KERNELS", "triton")
    monkeypatch.setenv("VLLM_LAYERSHARE_TRITON_CONFIG", json.dumps(fields))
    _, got = greedy_with_logprobs(tiny_model, grouping, prompts)
    assert configs == {launch}, configs
    # the tiny model's heads (4 query, 2 KV, dim 32); the engine's 4 requests of 1024
    sized = [triton_paged.decode_workspace(4, 4, 2, 32, 1024, torch.device("cpu"),
                                           config).numel()
             for config in (launch, triton_paged.DEFAULT_CONFIG)]
    assert workspaces == {sized[0]} and sized[0] > sized[1], (workspaces, sized)
    assert_same_greedy(got, expected)

    monkeypatch.setenv("VLLM_LAYERSHARE_TRITON_CONFIG", '{"fused_merge": 1}')
    with pytest.raises(Exception, match="VLLM_LAYERSHARE_TRITON_CONFIG: TritonConfig."
                                        "fused_merge must be bool, not 1"):
        engine_config(tiny_model, grouping)


def engine_config(model, grouping):
    """The VllmConfig `vllm serve` would make (start-up checks run; no engine starts)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), dtype="float32", max_model_len=1024, block_size=32,
                      attention_backend="layershare",
                      additional_config={"layershare": {"config": str(grouping)}},
                      ).create_engine_config()


def test_vllm_knows_the_plugins_environment_variables(tiny_model, tmp_path, monkeypatch):
    """vLLM checks every VLLM_* variable it sees (a warning each; an error with
    --fail-on-environ-validation): ours are declared to it, so such a start-up passes,
    and a misspelt one is still caught."""
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs

    for name in list(os.environ):  # left by earlier engines here (vLLM's VLLM_DIST_IDENT)
        if name.startswith("VLLM_") and name not in envs.environment_variables:
            monkeypatch.delenv(name)
    ours = {"VLLM_LAYERSHARE_CONFIG": str(write_grouping(tmp_path / "g.yaml")),
            "VLLM_LAYERSHARE_KERNELS": "portable", "VLLM_LAYERSHARE_FULL_CUDA_GRAPHS": "0",
            "VLLM_LAYERSHARE_TRITON_CONFIG": "{}"}
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    args = EngineArgs(model=str(tiny_model), dtype="float32", max_model_len=1024,
                      block_size=32, attention_backend="layershare",
                      fail_on_environ_validation=True)
    assert integration.selected(args.create_engine_config())  # the grouping from the variable
    monkeypatch.setenv("VLLM_LAYERSHARE_KERNEL", "portable")
    with pytest.raises(ValueError, match="detected: VLLM_LAYERSHARE_KERNEL$"):
        args.create_engine_config()


def test_full_decode_graphs_only_when_asked_on_the_triton_path(tiny_model, tmp_path,
                                                               monkeypatch):
    """VLLM_LAYERSHARE_FULL_CUDA_GRAPHS=1 offers vLLM uniform-decode CUDA graphs only where
    attention runs the Triton kernels, with an eager warm-up before each capture; other
    values are refused at start-up."""
    from vllm.v1.attention.backend import AttentionCGSupport

    grouping = write_grouping(tmp_path / "g.yaml")
    for kernels, requested in [("triton", "1"), ("triton", "0"), ("native", "1")]:
        monkeypatch.setenv("VLLM_LAYERSHARE_KERNELS", kernels)
        monkeypatch.setenv("VLLM_LAYERSHARE_FULL_CUDA_GRAPHS", requested)
        config = engine_config(tiny_model, grouping)
        support = backend.LayershareMetadataBuilder.get_cudagraph_support(config, None)
        offered = kernels == "triton" and requested == "1"
        assert support == (AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if offered
                           else AttentionCGSupport.NEVER), (kernels, requested)
        assert config.compilation_config.cudagraph_num_of_warmups == int(offered)
    monkeypatch.setenv("VLLM_LAYERSHARE_FULL_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="VLLM_LAYERSHARE_FULL_CUDA_GRAPHS='yes'"):
        engine_config(tiny_model, grouping)


def test_v1_model_runner_where_vllm_would_pick_v2(tiny_model, tmp_path, monkeypatch):
    """vLLM 0.32 runs GPUs on its V2 model runner (wherever Triton works), but the
    backend's KV-cache layout is wired into V1: start-up chooses V1 there, for the
    engine processes too (environment), and refuses an explicit request for V2."""
    import vllm.config.vllm as vllm_config_module

    grouping = write_grouping(tmp_path / "g.yaml")
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)  # as on a GPU
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")  # unset, restored after the test
    config = engine_config(tiny_model, grouping)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert not config.use_v2_model_runner
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(Exception, match="runs on vLLM's V1 model runner"):  # in pydantic's
        engine_config(tiny_model, grouping)


def test_compiled_model_gives_the_eager_outputs(tiny_model, tmp_path, monkeypatch):
    """vLLM compiles a model unless told not to (--enforce-eager): on CPU Dynamo traces
    it once with attention as an opaque op (on GPUs the graph is cut there for piecewise
    CUDA graphs). Under compilation the backend, on its GPU path (Triton, interpreted
    here), gives the eager CPU kernel's tokens and logprobs."""
    from vllm.config import CompilationMode

    grouping = write_grouping(tmp_path / "g.yaml")
    prompts = random_prompts(2, 50, seed=6)
    mode, expected = greedy_with_logprobs(tiny_model, grouping, prompts)
    assert mode == CompilationMode.NONE
    monkeypatch.setenv("VLLM_LAYERSHARE_KERNELS", "triton")
    calls = backend.FORWARD_CALLS
    mode, got = greedy_with_logprobs(tiny_model, grouping, prompts, enforce_eager=False)
    assert mode != CompilationMode.NONE
    assert backend.FORWARD_CALLS > calls
    assert_same_greedy(got, expected)


def test_bad_kernels_setting_is_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LAYERSHARE_KERNELS", "cuda")
    with pytest.raises(Exception, match="VLLM_LAYERSHARE_KERNELS='cuda': expected one of"):
        make_llm(tiny_model, write_grouping(tmp_path / "g.yaml"))
