"""Which per-block key summary estimates a follower's own distant mass best?

    .venv/bin/python benchmarks/mass_summaries.py --model models/SmolLM2-135M-Instruct

`distant_mass: estimated` replaces each whole distant block of S keys by a summary
and estimates the block's share of the softmax denominator, sum_j exp(c q.k_j), from
it (c = the attention scale). Candidates, per block and KV head:

    mean      log S + c q.mu                                   (D numbers)
    gauss     log S + c q.mu + c^2/2 sum_d q_d^2 var_d         (2D: mean, variance)
    kmeans2   logsumexp_m(log n_m + c q.mu_m), 2 centroids     (2D: two means)
    outlier   logaddexp(c q.k_far, log(S-1) + c q.mu_rest)     (2D: a key, a mean)
    offset    log S + c q.mu + delta_h                         (D, and one number
                                                                per layer and head)

"gauss" is the second-order cumulant of a diagonal Gaussian fit; "kmeans2" clusters
the block's keys (Lloyd, 8 rounds); "outlier" keeps the key farthest from the block's
mean exactly; "offset" corrects the mean's bias (Jensen: it underestimates) by a
constant per layer and query head, fitted on the first window (what calibration
writes as `summary_offsets`). Compared at equal
bytes: mean at S/2 costs what gauss, kmeans2 and outlier cost at S. For every layer,
on sampled queries of calibration text (the dense model, every layer as a follower
of itself: the distant branch is exact, only the merge weight is estimated), prints
the error of log M and the relative error of the attention output it causes,
averaged over layers, heads and queries of every window but the first.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from tqdm import tqdm

from vllm_layershare.tools import texts
from vllm_layershare.tools.capture import CapturingModel
from vllm_layershare.tools.damage import estimated_lse, mass_offsets, whole_blocks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, default=2,
                        help="text windows: the first fits the offsets, the others measure")
    parser.add_argument("--window-tokens", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--recent", type=int, default=1008)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    return parser.parse_args()


def kmeans2(keys: torch.Tensor, rounds: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [..., S, D] -> (centroids [..., 2, D], counts [..., 2]); seeded with the
    first key and the key farthest from it (deterministic)."""
    far = (keys - keys[..., :1, :]).norm(dim=-1).argmax(-1)
    seeds = torch.stack([keys[..., 0, :], torch.take_along_dim(
        keys, far[..., None, None], dim=-2)[..., 0, :]], dim=-2)
    for _ in range(rounds):
        nearest = torch.cdist(keys, seeds).argmin(-1)  # [..., S]
        onehot = torch.nn.functional.one_hot(nearest, 2).to(keys.dtype)  # [..., S, 2]
        counts = onehot.sum(-2)
        sums = onehot.transpose(-1, -2) @ keys
        seeds = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], seeds)
    return seeds, counts


KINDS = ("mean", "offset", "gauss", "kmeans2", "outlier")


def block_logits(q: torch.Tensor, k: torch.Tensor, size: int, kind: str,
                 scale: float, offset: torch.Tensor | None = None) -> torch.Tensor:
    """[H, Q, nb]: the estimated log mass of every whole block of `size` keys."""
    heads, tokens, dim = k.shape
    blocks = k[:, : tokens // size * size].reshape(heads, -1, size, dim)
    mean = blocks.mean(2)
    base = torch.einsum("hqd,hbd->hqb", q, mean) * scale + math.log(size)
    if kind == "mean":
        return base
    if kind == "offset":
        return base + (0.0 if offset is None else offset[:, None, None])
    if kind == "gauss":
        var = blocks.var(2, unbiased=False)
        return base + 0.5 * scale**2 * torch.einsum("hqd,hbd->hqb", q * q, var)
    if kind == "outlier":
        far = (blocks - mean[:, :, None]).norm(dim=-1).argmax(-1)  # [H, nb]
        key = torch.take_along_dim(blocks, far[..., None, None], dim=2)[:, :, 0]
        rest = (mean * size - key) / max(size - 1, 1)
        logits = torch.stack([torch.einsum("hqd,hbd->hqb", q, key) * scale,
                              torch.einsum("hqd,hbd->hqb", q, rest) * scale
                              + math.log(max(size - 1, 1))], -1)
        return torch.logsumexp(logits, -1) if size > 1 else logits[..., 0]
    centroids, counts = kmeans2(blocks)  # [H, nb, 2, D], [H, nb, 2]
    logits = torch.einsum("hqd,hbmd->hqbm", q, centroids) * scale + counts.log()[:, None]
    return torch.logsumexp(logits, -1)


def estimate(q, k, positions, scale, sink, recent, size, kind, offset=None) -> torch.Tensor:
    """log M [H, Q]: whole distant blocks by their summary, other distant keys exactly
    (the same split as the backend's `attention/mass.py`)."""
    tokens = k.shape[1]
    nb = tokens // size
    end = positions - recent + 1
    whole = whole_blocks(positions, tokens, size, sink, recent)
    in_whole = torch.nn.functional.pad(whole.repeat_interleave(size, 1), (0, tokens - nb * size))
    j = torch.arange(tokens)[None]
    exact = (j >= sink) & (j < end[:, None]) & ~in_whole
    token_logits = torch.einsum("hqd,htd->hqt", q, k) * scale
    parts = [block_logits(q, k, size, kind, scale, offset).masked_fill(~whole, -math.inf),
             token_logits.masked_fill(~exact, -math.inf)]
    return torch.logsumexp(torch.cat(parts, -1), -1)


def attend(q, k, v, mask, scale):
    logits = (torch.einsum("hqd,htd->hqt", q, k) * scale).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(logits, -1)
    return torch.einsum("hqt,htd->hqd", torch.exp(logits - lse[..., None]), v), lse


def layer_inputs(qkv, positions):
    """q at the sampled positions, K and V repeated to every query head (float32)."""
    q, k, v = qkv
    heads = q.shape[0]
    return (q[:, positions].float(),
            *(x.float().repeat_interleave(heads // x.shape[0], 0) for x in (k, v)))


def layer_errors(qkv, positions, scale, args, candidates, offsets) -> dict:
    """{candidate: (|error of log M|, bias of log M, relative output error)} of one layer."""
    q, k, v = layer_inputs(qkv, positions)
    j, i = torch.arange(k.shape[1])[None], positions[:, None]
    causal = j <= i
    near = causal & ((j < args.sink) | (j > i - args.recent))
    exact, _ = attend(q, k, v, causal, scale)
    o_p, lse_p = attend(q, k, v, near, scale)
    o_d, lse_d = attend(q, k, v, causal & ~near, scale)
    out = {}
    for size, kind in candidates:
        lse = estimate(q, k, positions, scale, args.sink, args.recent, size, kind,
                       offsets[size])
        gate = torch.sigmoid(lse_p - lse)[..., None]
        pod = gate * o_p + (1 - gate) * o_d
        error = ((pod - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()
        out[(size, kind)] = (float((lse - lse_d).abs().mean()), float((lse - lse_d).mean()),
                             float(error))
    return out


def same_as_calibration(window, positions, args) -> None:
    """Our "mean" is the estimate calibration uses (tools/damage.py), or the table lies."""
    q, k, _ = window.qkv[-1]
    q, k = q[:, positions].float(), k.float().repeat_interleave(q.shape[0] // k.shape[0], 0)
    size = args.sizes[0]
    ours = estimate(q, k, positions, window.scale, args.sink, args.recent, size, "mean")
    theirs = estimated_lse(q, k, positions, window.scale, args.sink, args.recent, size)
    if not torch.allclose(ours, theirs, atol=1e-4):
        raise SystemExit("mass_summaries: the mean estimate differs from calibration's")


def main() -> None:
    args = parse_args()
    model = CapturingModel(args.model)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(args.model)(
        texts.calibration_text(), add_special_tokens=False).input_ids
    windows = texts.token_windows(ids, args.window_tokens, args.windows, "calibration text")
    candidates = [(s, kind) for s in args.sizes for kind in KINDS]
    first = args.sink + args.recent
    rows: dict = {c: [] for c in candidates}
    offsets: list[dict] = []  # per layer: {size: [H]}, fitted on window 0
    with tqdm(total=args.windows * model.num_layers, desc="layers") as bar:
        for index, tokens in enumerate(windows):
            gen = torch.Generator().manual_seed(index)
            positions = (torch.randperm(len(tokens) - first, generator=gen)[:args.queries]
                         + first).sort().values
            window = model.run(tokens, positions)
            if index == 0:
                same_as_calibration(window, positions, args)
            for layer, qkv in enumerate(window.qkv):
                with torch.no_grad():
                    if index == 0:
                        q, k, _ = layer_inputs(qkv, positions)
                        offsets.append({size: mass_offsets(q, k, positions, window.scale,
                                                         args.sink, args.recent, size)
                                        for size in args.sizes})
                    else:
                        measured = layer_errors(qkv, positions, window.scale, args,
                                                candidates, offsets[layer])
                        for c, values in measured.items():
                            rows[c].append(values)
                bar.update(1)
    dim = window.qkv[0][1].shape[-1]
    print(f"\n{args.model}: {args.windows} windows of {args.window_tokens} tokens (the "
          f"first fits the offsets), {args.queries} queries each, sink {args.sink} + recent "
          f"{args.recent}; log M: medians over layers, output error: mean and worst layer\n")
    print("| summary | tokens per summary | numbers per token per KV head | "
          "abs error of log M | bias of log M | output error (mean over layers) | worst layer |")
    print("|---|---|---|---|---|---|---|")
    def numbers(size, kind):
        return (1 if kind in ("mean", "offset") else 2) * dim / size

    for size, kind in sorted(candidates, key=lambda c: (numbers(*c), KINDS.index(c[1]))):
        values = rows[(size, kind)]
        per_layer = [v[2] for v in values]
        print(f"| {kind} | {size} | {numbers(size, kind):.2f} | "
              f"{statistics.median(v[0] for v in values):.3f} | "
              f"{statistics.median(v[1] for v in values):+.3f} | "
              f"{statistics.fmean(per_layer):.4f} | {max(per_layer):.4f} |")


if __name__ == "__main__":
    main()
