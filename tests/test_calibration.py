"""Calibration: the similarity measure, the grouping rules, and the tool end to end."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
import yaml
from conftest import NUM_LAYERS, close_llm, make_llm

from vllm_layershare import calibrate
from vllm_layershare.attention.reference import dense_attention, dense_pod_attention
from vllm_layershare.config import load_config, parse_config
from vllm_layershare.tools.capture import CapturingModel
from vllm_layershare.tools.damage import (
    Follower,
    NextTokenMeter,
    estimated_lse,
    kl_divergence,
    mass_offsets,
    pod_output,
)
from vllm_layershare.tools.grouping import (
    damage_groups_for_saving,
    greedy_groups,
    grouping_yaml,
    groups_for_saving,
    kv_saving,
    min_damage_groups,
)
from vllm_layershare.tools.similarity import (
    SimilarityMeter,
    distant_distribution,
    js_similarity,
)


def js_reference(p: list[float], q: list[float]) -> float:
    """1 - JSD in bits, from the definition, in plain Python."""
    def kl(a, b):
        return sum(x * math.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)
    m = [(x + y) / 2 for x, y in zip(p, q, strict=True)]
    return 1.0 - (kl(p, m) + kl(q, m)) / 2


def random_distribution(rng: random.Random, n: int, zeros: int = 0) -> list[float]:
    weights = [rng.random() for _ in range(n)]
    for i in rng.sample(range(n), zeros):
        weights[i] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def test_js_similarity_matches_definition():
    rng = random.Random(0)
    pairs = [(random_distribution(rng, 12, zeros=3), random_distribution(rng, 12, zeros=2))
             for _ in range(20)]
    got = js_similarity(torch.tensor([p for p, _ in pairs], dtype=torch.float64),
                        torch.tensor([q for _, q in pairs], dtype=torch.float64))
    expected = torch.tensor([js_reference(p, q) for p, q in pairs], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_js_similarity_bounds():
    p = torch.tensor([0.2, 0.3, 0.5, 0.0])
    assert js_similarity(p, p).item() == pytest.approx(1.0)
    assert js_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == (
        pytest.approx(0.0, abs=1e-7))
    # [1, 0] vs [1/2, 1/2] by hand: 1 - (log2(4/3) + (log2(2/3) + log2(2)) / 2) / 2
    by_hand = 1 - (math.log2(4 / 3) + 0.5 * (math.log2(2 / 3) + 1)) / 2
    got = js_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item()
    assert got == pytest.approx(by_hand, abs=1e-6)


def test_distant_distribution_is_softmax_over_distant_tokens():
    torch.manual_seed(0)
    heads, kv_heads, tokens, dim, sink, recent = 4, 2, 40, 8, 3, 10
    query, key = torch.randn(heads, tokens, dim), torch.randn(kv_heads, tokens, dim)
    positions = torch.tensor([13, 25, 39])
    got = distant_distribution(query, key, positions, 0.5, sink, recent)
    for h in range(heads):
        for row, i in enumerate(positions.tolist()):
            distant = list(range(sink, i - recent + 1))
            logits = [0.5 * float(query[h, i] @ key[h // 2, j]) for j in distant]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            expected = torch.zeros(tokens)
            expected[distant] = torch.tensor(weights) / sum(weights)
            torch.testing.assert_close(got[h, row], expected, atol=1e-6, rtol=1e-5)


def test_meter_is_symmetric_and_averages_windows():
    torch.manual_seed(1)
    layers = [torch.rand(2, 5, 7).softmax(-1) for _ in range(3)]
    other = [torch.rand(2, 3, 7).softmax(-1) for _ in range(3)]
    meter = SimilarityMeter(3, 2)
    meter.add_window(layers)
    meter.add_window(other)
    per_head = meter.per_head()
    torch.testing.assert_close(per_head, per_head.transpose(0, 1))
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(torch.diagonal(meter.per_layer()), ones)
    both = js_similarity(torch.cat([layers[0], other[0]], 1), torch.cat([layers[2], other[2]], 1))
    torch.testing.assert_close(per_head[0, 2], both.mean(-1).double(), atol=1e-6, rtol=0)


def banded(values: list[float]) -> torch.Tensor:
    """A similarity matrix where S(a, b) is the product of neighbour similarities."""
    n = len(values) + 1
    sim = torch.eye(n, dtype=torch.float64)
    for a in range(n):
        for b in range(a + 1, n):
            sim[a, b] = sim[b, a] = math.prod(values[a:b])
    return sim


def test_greedy_groups_follow_the_leader():
    sim = banded([0.9, 0.9, 0.3, 0.95, 0.8])
    # S(0,1)=.9, S(0,2)=.81, S(0,3)=.243; S(3,4)=.95, S(3,5)=.76
    assert greedy_groups(sim, 0.8) == [[0, 1, 2], [3, 4], [5]]
    assert greedy_groups(sim, 0.75) == [[0, 1, 2], [3, 4, 5]]
    assert greedy_groups(sim, 0.99) == [[i] for i in range(6)]
    assert greedy_groups(sim, 0.0) == [list(range(6))]
    assert greedy_groups(sim, 0.0, max_group_size=4) == [[0, 1, 2, 3], [4, 5]]


def test_kv_saving_formula():
    groups = [list(range(i, i + 3)) for i in range(0, 30, 3)]
    # 10 leaders + 20 followers that keep (1 + 1024/8192) / 2 of a layer
    assert kv_saving(groups, 16, 1008, 8192) == pytest.approx(1 - (10 + 20 * 0.5625) / 30)
    assert kv_saving(groups, 16, 1008, 1024) == pytest.approx(0.0)


def test_target_saving_picks_the_highest_threshold_that_reaches_it():
    sim = banded([0.9, 0.9, 0.3, 0.95, 0.8])
    savings = {t: kv_saving(greedy_groups(sim, t), 1, 3, 64) for t in (0.9, 0.76, 0.2)}
    groups, threshold = groups_for_saving(sim, savings[0.76], 1, 3, 64)
    assert groups == [[0, 1, 2], [3, 4, 5]]
    assert threshold == pytest.approx(0.76)
    assert kv_saving(groups, 1, 3, 64) >= savings[0.76]
    with pytest.raises(ValueError, match="the most possible is"):
        groups_for_saving(sim, 0.99, 1, 3, 64)


def test_grouping_yaml_is_a_valid_file():
    sim = banded([0.9, 0.9, 0.3, 0.95, 0.8])
    text = grouping_yaml([[0, 1, 2], [3, 4], [5]], sim, 4, 60, "scores", ["made here", ""])
    assert text.startswith("# made here\n#\n")
    assert "# similarity to leader 0: 1:0.9 2:0.81" in text
    config = parse_config(yaml.safe_load(text))
    assert config.groups == ((0, 1, 2), (3, 4), (5,))
    assert (config.sink_tokens, config.recent_tokens, config.share) == (4, 60, "scores")


TINY_ARGS = ["--windows", "2", "--window-tokens", "160", "--queries", "8", "--sink", "4",
             "--recent", "16", "--context", "1024"]


def test_calibrate_tiny_model_end_to_end(tiny_model, tmp_path, capsys):
    """Default text, target saving, plot: a file the backend serves with, and the
    same file again for the same seed and text."""
    out = tmp_path / "grouping.yaml"
    calibrate.main(["--model", str(tiny_model), "--out", str(out), "--target-saving", "0.3",
                    "--plot", str(tmp_path / "heat.png"), *TINY_ARGS])
    config = load_config(out)
    assert config.num_layers == NUM_LAYERS
    assert 1.0 - config.kv_fraction(1024) >= 0.3
    assert "layershare:" in capsys.readouterr().out
    measured = json.loads((tmp_path / "grouping.similarity.json").read_text())
    assert torch.tensor(measured["per_head"]).shape == (NUM_LAYERS, NUM_LAYERS, 4)
    assert (tmp_path / "heat.png").stat().st_size > 1000

    again = tmp_path / "again.yaml"
    calibrate.main(["--model", str(tiny_model), "--out", str(again), "--target-saving", "0.3",
                    *TINY_ARGS])
    assert body(again) == body(out)
    assert json.loads((tmp_path / "again.similarity.json").read_text())["per_head"] == (
        measured["per_head"])

    llm = make_llm(tiny_model, out)
    try:
        from vllm import SamplingParams

        result = llm.generate([{"prompt_token_ids": list(range(3, 200))}],
                              SamplingParams(max_tokens=4, temperature=0.0))
        assert len(result[0].outputs[0].token_ids) == 4
    finally:
        close_llm(llm)


def body(path) -> list[str]:
    """The file without its header comments (they name the command and the paths)."""
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def test_regroup_from_saved_similarity(tiny_model, tmp_path):
    first = tmp_path / "first.yaml"
    calibrate.main(["--model", str(tiny_model), "--out", str(first), "--threshold", "0.99",
                    "--distant-mass", "leader", *TINY_ARGS])  # no offsets measured
    regrouped = tmp_path / "regrouped.yaml"
    estimated = ["--similarity", str(tmp_path / "first.similarity.json"),
                 "--distant-mass", "estimated", "--summary-tokens", "16", *TINY_ARGS]
    with pytest.raises(SystemExit, match="holds no summary offsets"):
        calibrate.main(["--model", "unused", "--out", str(regrouped), "--threshold", "-1",
                        "--offsets", "fit", *estimated])
    calibrate.main(["--model", "unused", "--out", str(regrouped), "--threshold", "-1",
                    *estimated])
    config = load_config(regrouped)
    assert config.groups == (tuple(range(NUM_LAYERS)),)
    assert config.estimates_mass and config.summary_tokens == 16
    assert config.summary_offsets == ()
    assert not (tmp_path / "regrouped.similarity.json").exists()
    with pytest.raises(SystemExit, match="measured with --sink 4 --recent 16"):
        calibrate.main(["--model", "unused", "--out", str(regrouped), "--similarity",
                        str(tmp_path / "first.similarity.json"), "--recent", "20",
                        *TINY_ARGS[:-4]])
    with pytest.raises(SystemExit, match="the most possible is"):
        calibrate.main(["--model", "unused", "--out", str(regrouped), "--target-saving", "0.9",
                        "--distant-mass", "leader",
                        "--similarity", str(tmp_path / "first.similarity.json"), *TINY_ARGS])


@pytest.mark.parametrize("extra, message", [
    (["--window-tokens", "20"], "must exceed --sink"),
    (["--target-saving", "1.5"], "fraction in \\(0, 1\\)"),
    (["--method", "damage"], "--method damage needs --target-saving"),
])
def test_calibrate_refuses_bad_arguments(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["--model", "m", "--out", str(tmp_path / "x.yaml"), *TINY_ARGS, *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


# --- damage-aware grouping -------------------------------------------------------------


def all_groupings(n: int):
    """Every split of layers 0..n-1 into consecutive groups."""
    for cuts in range(1 << (n - 1)):
        groups, start = [], 0
        for layer in range(1, n):
            if cuts >> (layer - 1) & 1:
                groups.append(list(range(start, layer)))
                start = layer
        yield groups + [list(range(start, n))]


def test_min_damage_groups_equals_brute_force():
    gen = torch.Generator().manual_seed(4)
    damage = torch.rand(7, 7, generator=gen, dtype=torch.float64)
    for followers in range(7):
        for largest in (None, 3):
            found = min_damage_groups(damage, followers, largest)
            options = [
                (sum(float(damage[g[0], i]) for g in groups for i in g[1:]), groups)
                for groups in all_groupings(7)
                if sum(len(g) - 1 for g in groups) == followers
                and (largest is None or max(map(len, groups)) <= largest)
            ]
            if not options:
                assert found is None
                continue
            best = min(cost for cost, _ in options)
            assert found is not None and found[1] == pytest.approx(best)
            assert sum(float(damage[g[0], i]) for g in found[0] for i in g[1:]) == (
                pytest.approx(best))


def test_damage_groups_take_the_fewest_followers_for_the_target():
    damage = torch.full((6, 6), 0.5, dtype=torch.float64)
    damage[3, 4] = damage[3, 5] = 0.01  # 4 and 5 follow 3 almost for free
    saving_of = {f: kv_saving([list(range(f + 1))] + [[i] for i in range(f + 1, 6)],
                              1, 3, 64) for f in range(6)}
    groups, total = damage_groups_for_saving(damage, saving_of[2], 1, 3, 64)
    assert groups == [[0], [1], [2], [3, 4, 5]] and total == pytest.approx(0.02)
    with pytest.raises(ValueError, match="no grouping saves"):
        damage_groups_for_saving(damage, 0.99, 1, 3, 64)


def sequence_layers(gen, length):
    def r(*shape):
        return torch.randn(*shape, generator=gen)
    return (r(4, length, 8), r(2, length, 8), r(2, length, 8))  # q [H,T,D], k, v [Hkv,T,D]


@pytest.mark.parametrize("share, size", [("scores", None), ("keys", None), ("scores", 4)])
def test_follower_damage_matches_the_dense_reference(share, size):
    gen = torch.Generator().manual_seed(8)
    lead, own = sequence_layers(gen, 40), sequence_layers(gen, 40)
    positions = torch.tensor([12, 25, 39])
    got = Follower(own, positions, 0.3, sink=2, recent=6, share=share,
                   summary_tokens=size).damage(lead[:2])
    q, k, v = (x.transpose(0, 1) for x in own)  # the reference takes [T, H, D]
    qa, ka = (x.transpose(0, 1) for x in lead[:2])
    pod = dense_pod_attention(q, k, v, qa, ka, 0.3,
                              sink=2, recent=6, share=share,
                              distant_mass="leader" if size is None else "estimated",
                              summary_tokens=size or 1)
    plain = dense_attention(q, k, v, 0.3)
    error = (pod[positions] - plain[positions]).norm(dim=-1) / plain[positions].norm(dim=-1)
    torch.testing.assert_close(got.double(), error.mean(0), atol=1e-5, rtol=1e-5)


def test_following_an_identical_leader_costs_nothing():
    gen = torch.Generator().manual_seed(9)
    own = sequence_layers(gen, 30)
    damage = Follower(own, torch.tensor([20, 29]), 0.3, sink=1, recent=5, share="scores",
                      summary_tokens=None).damage(own[:2])
    assert float(damage.max()) < 1e-6


def test_calibrate_by_damage_on_the_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "damage.yaml"
    calibrate.main(["--model", str(tiny_model), "--out", str(out), "--method", "damage",
                    "--target-saving", "0.2", "--distant-mass", "estimated", "--offsets", "fit",
                    "--summary-tokens", "8", "--plot", str(tmp_path / "d.png"), *TINY_ARGS])
    config = load_config(out)
    assert 1.0 - config.kv_fraction(1024) >= 0.2 and config.estimates_mass
    assert "# damage to leader" in out.read_text()
    measured = json.loads((tmp_path / "damage.similarity.json").read_text())
    assert measured["damage_method"] == {"share": "scores", "distant_mass": "estimated",
                                         "summary_tokens": 8, "measure": "output",
                                         "offsets": True}
    # the followers' fitted offsets are in the file, one per query head
    assert [i for i, _ in config.summary_offsets] == config.followers
    assert all(len(o) == 4 for _, o in config.summary_offsets)
    torch.testing.assert_close(
        torch.tensor([o for _, o in config.summary_offsets]),
        torch.tensor(measured["summary_offsets"])[config.followers], atol=1e-3, rtol=0)
    with pytest.raises(SystemExit, match="holds no damage measured"):
        calibrate.main(["--model", "unused", "--out", str(tmp_path / "x.yaml"), "--method",
                        "damage", "--target-saving", "0.2", "--similarity",
                        str(tmp_path / "damage.similarity.json"), "--distant-mass", "leader",
                        *TINY_ARGS])


# --- next-token damage -----------------------------------------------------------------


def test_kl_divergence_matches_definition():
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    for row in range(3):
        p = [math.exp(x) for x in a[row].tolist()]
        q = [math.exp(x) for x in b[row].tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        expected = sum(x * math.log(x / y) for x, y in zip(p, q, strict=True))
        assert float(kl_divergence(a, b)[row]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("share, size", [("scores", None), ("keys", 4)])
def test_pod_output_of_every_query_matches_the_dense_reference(share, size):
    gen = torch.Generator().manual_seed(12)
    lead, own = sequence_layers(gen, 37), sequence_layers(gen, 37)
    got = pod_output(own, lead[:2], 0.3, chunk=5, sink=2, recent=6, share=share,
                     summary_tokens=size)
    q, k, v = (x.transpose(0, 1) for x in own)
    qa, ka = (x.transpose(0, 1) for x in lead[:2])
    expected = dense_pod_attention(q, k, v, qa, ka, 0.3, sink=2, recent=6, share=share,
                                   distant_mass="leader" if size is None else "estimated",
                                   summary_tokens=size or 1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_resumed_runs_reproduce_the_model_and_see_a_changed_layer(tiny_model):
    """Resuming at a layer with its own attention as the override gives the dense
    logits; following itself with its own mass too; another leader changes them."""
    model = CapturingModel(str(tiny_model))
    positions = torch.tensor([40, 77, 99])
    window = model.run(list(range(3, 103)), positions, keep_inputs=True)
    full = model.model(torch.tensor([list(range(3, 103))])).logits[0, positions]
    torch.testing.assert_close(window.logits, full)

    def plain(q, k, v, scale):
        return torch.nn.functional.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)[0]\
            .transpose(0, 1)

    method = dict(sink=2, recent=10, share="scores", summary_tokens=None)
    for layer in (1, NUM_LAYERS - 1):
        torch.testing.assert_close(model.resume(window, layer, plain), window.logits)
        itself = model.resume(window, layer, lambda q, k, v, s, layer=layer: pod_output(
            (q, k, v), window.qkv[layer][:2], s, **method))
        assert float(kl_divergence(window.logits, itself).max()) < 1e-6
    other = model.resume(window, 3, lambda q, k, v, s: pod_output(
        (q, k, v), window.qkv[0][:2], s, **method))
    assert float(kl_divergence(window.logits, other).mean()) > 1e-5


def test_next_token_meter_measures_only_near_leaders():
    meter = NextTokenMeter(6, span=2)
    assert meter.pairs() == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4),
                             (3, 5), (4, 5)]
    damage = meter.per_layer()
    assert torch.isnan(damage[0, 3]) and float(damage[2, 4]) == 0.0
    groups = min_damage_groups(damage, 3)  # NaN pairs are never chosen
    assert groups is not None and max(map(len, groups[0])) <= 3


def test_calibrate_by_next_token_damage_on_the_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "kl.yaml"
    calibrate.main(["--model", str(tiny_model), "--out", str(out), "--method", "damage",
                    "--damage-measure", "next-token", "--target-saving", "0.2", *TINY_ARGS])
    config = load_config(out)
    assert 1.0 - config.kv_fraction(1024) >= 0.2
    assert max(map(len, config.groups)) <= calibrate.NEXT_TOKEN_GROUP_SIZE
    assert "KL change of the next-token distribution" in out.read_text()
    measured = json.loads((tmp_path / "kl.similarity.json").read_text())
    assert measured["damage_method"]["measure"] == "next-token"
    damage = torch.tensor(measured["damage"])
    assert torch.isnan(damage[0, 5]) and float(damage[4, 5]) > 0.0
    assert torch.tensor(measured["damage_output"]).shape == damage.shape
    with pytest.raises(SystemExit, match="holds no damage measured"):
        calibrate.main(["--model", "unused", "--out", str(tmp_path / "x.yaml"), "--method",
                        "damage", "--target-saving", "0.2", "--similarity",
                        str(tmp_path / "kl.similarity.json"), *TINY_ARGS])


def test_mass_offsets_match_their_definition():
    """delta_h = mean over queries of log(true mass of the whole distant blocks) -
    log(sum over those blocks of S exp(c q.kbar)), from loops."""
    gen = torch.Generator().manual_seed(14)
    q, k = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 40, 5, generator=gen) * 1.5
    positions, size, sink, recent, scale = torch.tensor([20, 31, 39]), 4, 3, 6, 0.7
    got = mass_offsets(q, k, positions, scale, sink, recent, size)
    for h in range(2):
        gaps = []
        for i, p in enumerate(positions.tolist()):
            blocks = [b for b in range(40 // size)
                      if b * size >= sink and (b + 1) * size - 1 <= p - recent]
            true = sum(math.exp(scale * float(q[h, i] @ k[h, j])) for b in blocks
                       for j in range(b * size, (b + 1) * size))
            est = sum(size * math.exp(scale * float(q[h, i] @ k[h, b * size:(b + 1) * size]
                                                   .mean(0))) for b in blocks)
            gaps.append(math.log(true) - math.log(est))
        assert float(got[h]) == pytest.approx(sum(gaps) / len(gaps), rel=1e-4)
        assert float(got[h]) > 0  # Jensen: mean keys underestimate


def test_offsets_move_the_estimate_by_their_weight():
    gen = torch.Generator().manual_seed(15)
    q, k = torch.randn(2, 2, 5, generator=gen), torch.randn(2, 30, 5, generator=gen)
    positions = torch.tensor([28, 29])
    plain = estimated_lse(q, k, positions, 0.5, 2, 5, 4)
    shifted = estimated_lse(q, k, positions, 0.5, 2, 5, 4, torch.tensor([0.0, 30.0]))
    torch.testing.assert_close(shifted[0], plain[0])
    # a huge offset makes the summary blocks the whole mass: log M moves by ~30
    assert float((shifted[1] - plain[1]).min()) > 25.0
