"""The saving shows in vLLM's own plan: its logged token capacity and concurrency."""

from __future__ import annotations

import pytest
from conftest import close_llm, make_llm, write_grouping

from vllm_layershare.config import load_config
from vllm_layershare.layout import kv_cache_group_layers

CONTEXT = 4096


def planned_concurrency(llm) -> tuple[int, float]:
    cache_config = llm.llm_engine.vllm_config.cache_config
    return cache_config.kv_cache_size_tokens, cache_config.kv_cache_max_concurrency


def plans(model, grouping) -> list[tuple[int, float]]:
    """vLLM's plan for the stock backend, then for layershare with `grouping`."""
    result = []
    for chosen in (None, grouping):
        llm = make_llm(model, chosen, max_model_len=CONTEXT, max_num_batched_tokens=32)
        result.append(planned_concurrency(llm))
        close_llm(llm)
    return result


@pytest.mark.parametrize("groups, mass", [
    ([[0, 1, 2], [3, 4, 5]], {}),
    ([[0, 1, 2, 3, 4, 5]], {}),
    ([[0, 1, 2, 3, 4, 5]], {"distant_mass": "estimated", "summary_tokens": 16}),
])
def test_capacity_ratio_matches_formula(tiny_model, tmp_path, groups, mass):
    """Planned capacity follows the formula; mean-key summaries are in the plan too."""
    grouping = write_grouping(tmp_path / "g.yaml", recent_tokens=252, groups=groups, **mass)
    (stock_tokens, stock_conc), (tokens, conc) = plans(tiny_model, grouping)

    expected = 1.0 / load_config(grouping).kv_fraction(CONTEXT)
    ratio = conc / stock_conc
    print(f"groups {groups}: planned {ratio:.3f}x, formula {expected:.3f}x")
    assert expected > 1.3  # the case really saves memory
    assert ratio == pytest.approx(expected, rel=0.05)
    assert tokens / stock_tokens == pytest.approx(ratio, rel=1e-3)


def test_group_sizes_avoid_padding():
    """Uneven role counts get a group size that divides them, not vLLM's n:1 choice."""
    specs = {f"lead.{i}": "full" for i in range(12)}
    specs.update({f"v.{i}": "values" for i in range(18)})
    specs.update({f"k.{i}": "keys" for i in range(18)})
    groups = kv_cache_group_layers(specs)
    assert {len(g) for g in groups} == {6}
    assert sorted(name for g in groups for name in g) == sorted(specs)
    even = {f"lead.{i}": "full" for i in range(10)} | {f"v.{i}": "values" for i in range(20)}
    assert {len(g) for g in kv_cache_group_layers(even)} == {10}


def test_uneven_grouping_keeps_its_saving(tmp_path):
    """4 leaders and 6 followers: vLLM alone would pad the follower caches to 8 layers."""
    from vllm_layershare.tools.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "ten", num_layers=10)
    groups = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    grouping = write_grouping(tmp_path / "g.yaml", num_layers=10, recent_tokens=252,
                              groups=groups)
    (stock_tokens, _), (tokens, _) = plans(model, grouping)
    expected = 1.0 / load_config(grouping).kv_fraction(CONTEXT)
    assert tokens / stock_tokens == pytest.approx(expected, rel=0.05)
