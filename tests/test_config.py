"""Every bad grouping file gives one clear message naming the file, the key and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llm, write_grouping

from vllm_layershare.config import LayershareConfigError, load_config

BAD_FILES = {
    "missing key": ({"share": ...}, "key 'share' is missing"),
    "unknown key": ({"window": 5}, "key 'window' is not a known key"),
    "wrong type": ({"sink_tokens": "16"}, "key 'sink_tokens' must be an integer"),
    "negative sink": ({"sink_tokens": -1}, "key 'sink_tokens' must be >= 0"),
    "zero recent": ({"recent_tokens": 0}, "key 'recent_tokens' must be >= 1"),
    "bad share": ({"share": "values"}, "key 'share' must be one of scores, keys"),
    "tau too big": ({"gate_skip_threshold": 1.5}, "key 'gate_skip_threshold' must be in (0, 1]"),
    "tau zero": ({"gate_skip_threshold": 0}, "key 'gate_skip_threshold' must be in (0, 1]"),
    "layer missing": ({"groups": [[0, 1, 2], [4, 5]]}, "layer 3 is missing"),
    "layer twice": ({"groups": [[0, 1, 2], [2, 3, 4, 5]]}, "layer 2 appears twice"),
    "not consecutive": ({"groups": [[0, 2, 1], [3, 4, 5]]}, "is not consecutive"),
    "short cover": ({"groups": [[0, 1, 2], [3, 4]]}, "covers layers up to 4"),
    "not a list": ({"groups": "all"}, "key 'groups' must be a non-empty list"),
    "bad mass": ({"distant_mass": "own"}, "key 'distant_mass' must be one of leader, estimated"),
    "summary without estimate": ({"distant_mass": "leader", "summary_tokens": 16},
                                 "key 'summary_tokens' only applies with 'distant_mass: "),
    "zero summary": ({"distant_mass": "estimated", "summary_tokens": 0},
                     "key 'summary_tokens' must be >= 1"),
    "offsets without estimate": ({"distant_mass": "leader", "summary_offsets": {1: [0.0]}},
                                 "key 'summary_offsets' only applies with 'distant_mass: "),
    "offsets of a leader": ({"summary_offsets": {3: [0.0, 1.0]}},
                            "names layer 3, which is not a follower"),
    "offsets not numbers": ({"summary_offsets": {1: ["a"]}},
                            "for layer 1 must be a list of finite numbers"),
    "offsets not finite": ({"summary_offsets": {1: [float("nan")]}},
                           "for layer 1 must be a list of finite numbers"),
    "offsets of two widths": ({"summary_offsets": {1: [0.0, 1.0], 2: [1.0]}},
                              "lists differ in length"),
    "offsets not a mapping": ({"summary_offsets": [1.0]}, "key 'summary_offsets' must be a "
                              "mapping"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_message(tmp_path, case):
    overrides, expected = BAD_FILES[case]
    path = write_grouping(tmp_path / "bad.yaml", **overrides)
    with pytest.raises(LayershareConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message and "Fix:" in message


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(LayershareConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("groups: [[0, 1\n")
    with pytest.raises(LayershareConfigError, match="not valid YAML"):
        load_config(broken)


def test_good_file_roles_and_saving(tmp_path):
    config = load_config(write_grouping(tmp_path / "g.yaml", distant_mass="leader"))
    assert config.followers == [1, 2, 4, 5]
    assert config.leader_of(5) == 3 and not config.is_follower(3)
    # 4 of 6 layers follow; at 1000 tokens each keeps 20/1000 of its keys.
    assert config.kv_fraction(1000) == pytest.approx((2 + 4 * (1 + 0.02) / 2) / 6)


def test_estimated_mass_costs_its_summaries(tmp_path):
    config = load_config(write_grouping(tmp_path / "g.yaml", distant_mass="estimated",
                                        summary_tokens=16))
    assert config.estimates_mass and config.summary_tokens == 16
    # each follower adds one mean key per 16 tokens: 1/32 of a full layer's K+V
    assert config.kv_fraction(1000) == pytest.approx((2 + 4 * ((1 + 0.02) / 2 + 1 / 32)) / 6)
    assert "distant_mass=estimated (one mean key per 16 tokens" in config.describe(1000)
    default = load_config(write_grouping(tmp_path / "d.yaml"))
    assert (default.distant_mass, default.summary_tokens) == ("estimated", 32)


def test_summary_must_tile_the_key_block_at_startup(tiny_model, tmp_path):
    """summary_tokens must divide 2 x block size: refused once vLLM picked the block size."""
    path = write_grouping(tmp_path / "g.yaml", distant_mass="estimated", summary_tokens=48)
    with pytest.raises(Exception, match="key 'summary_tokens' is 48 but must divide the "
                                        "follower key block of 64 tokens"):
        make_llm(tiny_model, path)


def test_layer_count_mismatch_fails_at_startup(tiny_model, tmp_path):
    """num_layers not the model's: refused while vLLM builds its config."""
    path = write_grouping(tmp_path / "g.yaml", num_layers=4, groups=[[0, 1], [2, 3]])
    with pytest.raises(Exception, match="key 'num_layers' is 4 but the model has 6 layers"):
        make_llm(tiny_model, path)


def test_backend_without_file_fails_at_startup(tiny_model, monkeypatch):
    monkeypatch.delenv("VLLM_LAYERSHARE_CONFIG", raising=False)
    from vllm import LLM

    with pytest.raises(Exception, match="needs a layer-grouping file"):
        LLM(model=str(tiny_model), attention_backend="LayerShare", dtype="float32",
            kv_cache_memory_bytes=32 << 20, distributed_executor_backend="uni",
            max_model_len=256, block_size=32, enforce_eager=True)


def test_unsupported_model_feature_is_refused(tmp_path):
    """A sliding-window model is refused with the model feature named."""
    import json

    from vllm_layershare.tools.tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "sw", 6)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64)
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="sliding-window attention, which the layershare"):
        make_llm(model, write_grouping(tmp_path / "g.yaml"))


def test_backend_answers_vllm_selector_honestly():
    """What vLLM's CUDA selector asks (validate_configuration, with keywords)."""
    from vllm.platforms.interface import DeviceCapability

    from vllm_layershare.backend import LayershareBackend

    def reasons(**changes):
        config = dict(head_size=96, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16,
                      use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                      use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
                      attn_type="decoder")
        return LayershareBackend.validate_configuration(**{**config, **changes})

    assert reasons() == []
    assert reasons(dtype=torch.float16, block_size=5) == []
    assert "compute capability not supported" in reasons(device_capability=DeviceCapability(7, 5))
    assert "kv_cache_dtype not supported" in reasons(kv_cache_dtype="fp8")
    assert "MLA not supported" in reasons(use_mla=True)
    assert "sliding window not supported" in reasons(has_sliding_window=True)


def test_summary_offsets_are_per_follower_and_head(tmp_path):
    config = load_config(write_grouping(tmp_path / "g.yaml", summary_offsets={
        4: [0.5, 1.0, 1.5, 2.0], 1: [0.0, 0.1, 0.2, 0.3]}))
    assert config.offsets_of(4) == (0.5, 1.0, 1.5, 2.0) and config.offsets_of(2) is None
    assert "calibrated offsets for 2 followers" in config.describe(1024)
    config.check_model(6, [], num_heads=4)
    with pytest.raises(LayershareConfigError, match="has 4 offsets for layer 1 but the model "
                       "has 8 query heads"):
        config.check_model(6, [], num_heads=8)
