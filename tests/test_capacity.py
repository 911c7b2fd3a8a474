"""The saving shows in vLLM's own plan: its logged token capacity and concurrency."""

from __future__ import annotations

import pytest
from conftest import close_llm, make_llm, write_grouping

from vllm_layershare.config import load_config

CONTEXT = 4096


def planned_concurrency(llm) -> tuple[int, float]:
    cache_config = llm.llm_engine.vllm_config.cache_config
    return cache_config.kv_cache_size_tokens, cache_config.kv_cache_max_concurrency


@pytest.mark.parametrize("groups, mass", [
    ([[0, 1, 2], [3, 4, 5]], {}),
    ([[0, 1, 2, 3, 4, 5]], {}),
    ([[0, 1, 2, 3, 4, 5]], {"distant_mass": "estimated", "summary_tokens": 16}),
])
def test_capacity_ratio_matches_formula(tiny_model, tmp_path, groups, mass):
    """Planned capacity follows the formula; mean-key summaries are in the plan too."""
    grouping = write_grouping(tmp_path / "g.yaml", recent_tokens=252, groups=groups, **mass)
    settings = dict(max_model_len=CONTEXT, max_num_batched_tokens=32)
    stock = make_llm(tiny_model, None, **settings)
    stock_tokens, stock_conc = planned_concurrency(stock)
    close_llm(stock)
    llm = make_llm(tiny_model, grouping, **settings)
    tokens, conc = planned_concurrency(llm)
    close_llm(llm)

    expected = 1.0 / load_config(grouping).kv_fraction(CONTEXT)
    ratio = conc / stock_conc
    print(f"groups {groups}: planned {ratio:.3f}x, formula {expected:.3f}x")
    assert expected > 1.3  # the case really saves memory
    assert ratio == pytest.approx(expected, rel=0.05)
    assert tokens / stock_tokens == pytest.approx(ratio, rel=1e-3)
