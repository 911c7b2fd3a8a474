"""Stock CPU attention vs layershare on the same model and the same KV memory, one run.

Prints vLLM's planned KV capacity and concurrency at the context length, prefill
tokens/s and decode tokens/s at equal batch (every request decoding), and
layershare/stock ratios (medians of --repeats runs, of decode steps). The model is
random with SmolLM2-135M's geometry (30 layers, 9 query / 3 KV heads, head dim 64):
speed and memory do not depend on the weights.

    python benchmarks/throughput.py [--context 8192] [--kv-mib 256]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[1]


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


def measure(llm, args) -> dict[str, float]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    timed(llm, prompts[:1], 2)  # warm-up
    prefill, steps = [], []
    for _ in range(args.repeats):
        prefill.append(args.batch * args.prompt_len / timed(llm, prompts, 1))
        steps += decode_steps(llm, prompts, args.decode_tokens + 1)
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "kv_tokens": cache.kv_cache_size_tokens,
        "concurrency": cache.kv_cache_max_concurrency,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": args.batch / statistics.median(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--kv-mib", type=int, default=256)
    parser.add_argument("--batched-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--grouping", default=str(ROOT / "configs/smollm2-135m-groups3.yaml"))
    args = parser.parse_args()

    from vllm_layershare.config import load_config
    from vllm_layershare.tools.tiny_model import SMOLLM2_135M_GEOMETRY, build_tiny_llama

    model = build_tiny_llama(ROOT / "models" / "random-smollm2-geometry", num_layers=30,
                             max_positions=args.context, dtype=args.dtype,
                             **SMOLLM2_135M_GEOMETRY)
    results = {}
    for name, grouping in (("stock", None), ("layershare", Path(args.grouping))):
        llm = engine(model, grouping, args)
        results[name] = measure(llm, args)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    formula = 1 / load_config(args.grouping).kv_fraction(args.context)
    print(f"\ncontext {args.context}, KV memory {args.kv_mib} MiB, batch {args.batch} x "
          f"{args.prompt_len} prompt tokens, {args.decode_tokens} decode steps, "
          f"max_num_batched_tokens {args.batched_tokens}, {args.dtype}; prefill: median of "
          f"{args.repeats} runs, decode: median step of {args.repeats} runs; "
          f"formula capacity ratio {formula:.3f}x\n")
    print("| metric | stock | layershare | ratio |\n|---|---|---|---|")
    for key, label in (("kv_tokens", "KV cache tokens (vLLM plan)"),
                       ("concurrency", f"max concurrency at {args.context}"),
                       ("prefill_tok_s", "prefill tokens/s"),
                       ("decode_tok_s", "decode tokens/s")):
        s, ls = results["stock"][key], results["layershare"][key]
        print(f"| {label} | {s:,.2f} | {ls:,.2f} | {ls / s:.3f}x |")


if __name__ == "__main__":
    main()
