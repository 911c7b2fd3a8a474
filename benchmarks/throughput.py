"""Stock CPU attention vs layershare on the same model and the same KV memory, one run.

Prints vLLM's planned KV capacity and concurrency at the context length, prefill
tokens/s and decode tokens/s at equal batch (every request decoding), and
layershare/stock ratios. Each engine runs in its own process, as a user runs it;
the backends' processes alternate for --rounds rounds so that the machine's slow
drifts fall on both, and each process measures --repeats prefill runs and decode
runs (pooled medians: of prefill runs, of decode steps). The model is random with
SmolLM2-135M's geometry (30 layers, 9 query / 3 KV heads, head dim 64): speed and
memory do not depend on the weights.

    python benchmarks/throughput.py [--grouping A.yaml B.yaml] [--context 8192] [--kv-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[1]
STOCK = "stock"
RESULT_TAG = "RESULT "


def engine(model: Path, grouping: Path | None, args):
    from vllm import LLM

    kwargs = dict(
        model=str(model), dtype=args.dtype, kv_cache_memory_bytes=args.kv_mib << 20,
        distributed_executor_backend="uni", max_model_len=args.context, block_size=32,
        max_num_batched_tokens=args.batched_tokens, enable_prefix_caching=False, seed=0,
    )
    if grouping is not None:
        kwargs.update(attention_backend="layershare",
                      additional_config={"layershare": {"config": str(grouping)}})
    return LLM(**kwargs)


def timed(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def decode_steps(llm, prompts, max_tokens: int) -> list[float]:
    """Durations of the engine steps in which every request decodes (all prefills done,
    none finished: requests that finished prefill early also finish early).

    Timed step by step: the difference of two whole runs would bury decode's second
    in prefill's noise.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"decode-{time.monotonic_ns()}-{i}", {"prompt_token_ids": prompt},
                           params)
    started, finished, durations = set(), set(), []
    while engine.has_unfinished_requests():
        all_decoding = len(started) == len(prompts) and not finished
        start = time.perf_counter()
        outputs = engine.step()
        if all_decoding:
            durations.append(time.perf_counter() - start)
        started.update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
        finished.update(o.request_id for o in outputs if o.finished)
    return durations


def measure(llm, args) -> dict:
    """Prefill tokens/s of each run and the decode step durations, in one engine."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    timed(llm, prompts[:1], 2)  # warm-up
    prefill, steps = [], []
    for _ in range(args.repeats):
        prefill.append(args.batch * args.prompt_len / timed(llm, prompts, 1))
        steps += decode_steps(llm, prompts, args.decode_tokens + 1)
    cache = llm.llm_engine.vllm_config.cache_config
    return {"kv_tokens": cache.kv_cache_size_tokens,
            "concurrency": cache.kv_cache_max_concurrency,
            "prefill_tok_s": prefill, "decode_steps_s": steps}


def worker(args) -> None:
    """Measure one backend in this process and print the result as one JSON line."""
    from vllm_layershare.tools.tiny_model import SMOLLM2_135M_GEOMETRY, build_tiny_llama

    model = build_tiny_llama(ROOT / "models" / "random-smollm2-geometry", num_layers=30,
                             max_positions=args.context, dtype=args.dtype,
                             **SMOLLM2_135M_GEOMETRY)
    grouping = None if args.worker == STOCK else Path(args.worker)
    result = measure(engine(model, grouping, args), args)
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(backend: str, argv: list[str]) -> dict:
    """One engine in a fresh process, as a user runs it. Engines run one after the
    other in one process gave decode steps that differed up to 1.6x between runs."""
    done = subprocess.run([sys.executable, __file__, *argv, "--worker", backend],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode or not lines:
        sys.exit(f"benchmark worker for {backend} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def summarise(runs: list[dict], batch: int) -> dict[str, float]:
    """Pool one backend's processes: median prefill run, median decode step."""
    prefill = [x for run in runs for x in run["prefill_tok_s"]]
    steps = [x for run in runs for x in run["decode_steps_s"]]
    return {"kv_tokens": runs[0]["kv_tokens"], "concurrency": runs[0]["concurrency"],
            "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": batch / statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--kv-mib", type=int, default=256)
    parser.add_argument("--batched-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine process")
    parser.add_argument("--rounds", type=int, default=3,
                        help="engine processes per backend, started in alternating order")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--grouping", nargs="+",
                        default=[str(ROOT / "configs/smollm2-135m-groups3.yaml")])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from vllm_layershare.config import load_config

    argv = sys.argv[1:]
    backends = [STOCK, *args.grouping]
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for round_index in range(args.rounds):
        order = backends if round_index % 2 == 0 else backends[::-1]  # cancels slow drifts
        for backend in order:
            run = run_worker(backend, argv)
            runs[backend].append(run)
            step_ms = 1e3 * statistics.median(run["decode_steps_s"])
            print(f"round {round_index + 1}/{args.rounds} {Path(backend).stem}: prefill "
                  f"{statistics.median(run['prefill_tok_s']):.1f} tok/s, decode step "
                  f"{step_ms:.1f} ms", flush=True)
    results = {b: summarise(r, args.batch) for b, r in runs.items()}

    print(f"\ncontext {args.context}, KV memory {args.kv_mib} MiB, batch {args.batch} x "
          f"{args.prompt_len} prompt tokens, {args.decode_tokens} decode steps, "
          f"max_num_batched_tokens {args.batched_tokens}, {args.dtype}; {args.rounds} engine "
          f"processes per backend x {args.repeats} runs; prefill: median run, decode: "
          f"median step while every request decodes\n")
    for grouping in args.grouping:
        formula = 1 / load_config(grouping).kv_fraction(args.context)
        print(f"{Path(grouping).name} (formula capacity ratio {formula:.3f}x)\n")
        print("| metric | stock | layershare | ratio |\n|---|---|---|---|")
        for key, label in (("kv_tokens", "KV cache tokens (vLLM plan)"),
                           ("concurrency", f"max concurrency at {args.context}"),
                           ("prefill_tok_s", "prefill tokens/s"),
                           ("decode_tok_s", "decode tokens/s")):
            s, ls = results[STOCK][key], results[grouping][key]
            print(f"| {label} | {s:,.2f} | {ls:,.2f} | {ls / s:.3f}x |")
        print()


if __name__ == "__main__":
    main()
