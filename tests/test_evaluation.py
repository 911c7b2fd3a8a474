"""Evaluation: the retrieval probes, and the tool end to end through vLLM."""

from __future__ import annotations

import json

import pytest
from conftest import write_grouping

from vllm_layershare import evaluate
from vllm_layershare.tools import texts
from vllm_layershare.tools.tasks import is_correct, kv_probes, needle_probes
from vllm_layershare.tools.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return tokenizer(texts.evaluation_text()[:200_000], add_special_tokens=False).input_ids


def test_needles_have_the_asked_length_and_depth(tokenizer, haystack):
    probes = needle_probes(tokenizer, haystack, [600, 900], [0, 50, 100], trials=2, seed=3,
                           reserve=10)
    assert len(probes) == 12
    for probe in probes:
        assert len(probe.prompt_ids) == probe.length - 10
        text = tokenizer.decode(probe.prompt_ids)
        needle = f"is {probe.answer}."
        assert text.count(needle) == 1
        document = text[:text.index("What is the special magic number")]
        where = document.index(needle) / len(document)
        assert abs(where - probe.depth / 100) < 0.2, (probe.depth, where)
    again = needle_probes(tokenizer, haystack, [600, 900], [0, 50, 100], trials=2, seed=3,
                          reserve=10)
    assert [p.prompt_ids for p in again] == [p.prompt_ids for p in probes]


def test_kv_probes_hide_several_keys_and_ask_one(tokenizer):
    probes = kv_probes(tokenizer, [700, 1000], per_length=3, seed=1, reserve=12, keys=3)
    assert len(probes) == 6
    for probe in probes:
        assert len(probe.prompt_ids) == probe.length - 12
        text = tokenizer.decode(probe.prompt_ids)
        assert text.count("One of the special magic numbers for ") == 3
        asked = text.rsplit("What is the special magic number for ", 1)[1].split("?")[0]
        assert f"for {asked} is: {probe.answer}." in text
        assert 0 <= probe.depth <= 100
    with pytest.raises(ValueError, match="too few to hide 4 keys"):
        kv_probes(tokenizer, [300], per_length=1, keys=4)
    assert is_correct(probes[0], f"The number is {probes[0].answer}.")
    assert not is_correct(probes[0], "I do not know.")
    other_seed = kv_probes(tokenizer, [700, 1000], per_length=3, seed=2, reserve=12, keys=3)
    assert [p.answer for p in other_seed] != [p.answer for p in probes]


def test_evaluate_tiny_model_end_to_end(tiny_model, tmp_path, capsys):
    """Stock and one grouping through vLLM: capacity, perplexity, needles, key-value
    retrieval, the table, the JSON and the plots."""
    grouping = write_grouping(tmp_path / "shared.yaml")
    out = tmp_path / "results.json"
    common = [
        "--model", str(tiny_model), "--lengths", "768", "1024",
        "--depths", "0", "100", "--kv-probes", "1", "--ppl-windows", "1",
        "--kv-memory-mib", "32", "--dtype", "float32", "--max-num-batched-tokens", "128",
    ]
    evaluate.main([*common, "--config", str(grouping), "--out", str(out),
                   "--plot-dir", str(tmp_path / "plots")])
    stock, shared = json.loads(out.read_text())["results"]
    assert (stock["name"], shared["name"]) == ("stock", "shared")
    assert stock["capacity_ratio"] == 1.0
    assert shared["kv_tokens"] > stock["kv_tokens"]  # followers keep fewer keys
    assert shared["kv_saving"] == pytest.approx(1 - stock["kv_tokens"] / shared["kv_tokens"])
    for result in (stock, shared):
        assert set(result["perplexity"]) == {"768", "1024"}
        assert all(1.0 < p < 1e4 for p in result["perplexity"].values())
        assert len(result["answers"]) == 2 * 2 + 2
        assert set(result["needle_cells"]) == {"768@0", "768@100", "1024@0", "1024@100"}
    # sink 4 + recent 16 in a 1024-token window: sharing changes the model's predictions
    assert shared["perplexity"]["1024"] != pytest.approx(stock["perplexity"]["1024"], rel=1e-4)
    printed = capsys.readouterr().out
    assert "| stock |" in printed and "| shared |" in printed
    assert (tmp_path / "plots" / "needle.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "frontier.png").stat().st_size > 1000

    evaluate.main(["--report", str(out), "--plot-dir", str(tmp_path / "again")])
    assert table_lines(capsys.readouterr().out) == table_lines(printed)
    assert (tmp_path / "again" / "needle.png").exists()


def test_evaluate_refuses_a_bad_grouping_before_starting(tiny_model, tmp_path):
    bad = write_grouping(tmp_path / "bad.yaml", share="values")
    with pytest.raises(SystemExit, match="layershare-eval: layershare config .*key 'share'"):
        evaluate.main(["--model", str(tiny_model), "--config", str(bad)])


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_evaluate_reuses_an_earlier_stock_run(tiny_model, tmp_path, capsys):
    common = ["--model", str(tiny_model), "--lengths", "768", "--depths", "50",
              "--kv-probes", "1", "--ppl-windows", "1", "--kv-memory-mib", "32",
              "--dtype", "float32", "--max-num-batched-tokens", "128"]
    first = tmp_path / "first.json"
    evaluate.main([*common, "--out", str(first)])
    estimated = write_grouping(tmp_path / "estimated.yaml", distant_mass="estimated",
                               summary_tokens=16)
    second = tmp_path / "second.json"
    evaluate.main([*common, "--config", str(estimated), "--stock-from", str(first),
                   "--out", str(second)])
    stock, shared = json.loads(second.read_text())["results"]
    assert stock["answers"] == json.loads(first.read_text())["results"][0]["answers"]
    assert shared["name"] == "estimated" and shared["capacity_ratio"] > 1.0
    with pytest.raises(SystemExit, match="measured with other --lengths"):
        evaluate.main([*common[:3], "1024", *common[4:], "--config", str(estimated),
                       "--stock-from", str(first), "--out", str(second)])
    # --report over both runs: one table, stock once, the later run's row added
    capsys.readouterr()
    evaluate.main(["--report", str(first), str(second)])
    rows = table_lines(capsys.readouterr().out)
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["stock", "estimated"]
    other = tmp_path / "other.json"
    saved = json.loads(second.read_text())
    saved["args"]["lengths"] = "[1024]"
    other.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="other --lengths than"):
        evaluate.main(["--report", str(first), str(other)])
