"""The Triton kernels' launch shapes: the user's setting, a GPU's tuned file, the defaults
(vllm_layershare/attention/tuning.py)."""

from __future__ import annotations

import json

import pytest

from vllm_layershare import settings
from vllm_layershare.attention import tuning
from vllm_layershare.attention.triton_config import DEFAULT_CONFIG, TritonConfig


@pytest.mark.parametrize("text, message", [
    ('{"programs_per_sm": 16, "fused_merge": true, "split_len": null}', None),
    ('{"program_per_sm": 16}', "unknown TritonConfig field(s) program_per_sm; the fields "
                               "are decode_block_n, "),
    ('{"programs_per_sm": "16"}', "TritonConfig.programs_per_sm must be int, not '16'"),
    ('{"programs_per_sm": true}', "TritonConfig.programs_per_sm must be int, not True"),
    ('{"fused_merge": 1}', "TritonConfig.fused_merge must be bool, not 1"),
    ('{"decode_stages": null}', "TritonConfig.decode_stages must be int, not None"),
    ('{"scores_write_registers": 96.5}',
     "TritonConfig.scores_write_registers must be int or null, not 96.5"),
    ('{"decode_block_n": 48}', "TritonConfig.decode_block_n must be a power of two >= 16"),
    ('[{"programs_per_sm": 16}]', "expected a JSON object of TritonConfig fields, not list"),
    ('{"programs_per_sm": 16,}', "not valid JSON"),
])
def test_a_launch_setting_is_taken_whole_or_refused_by_field(text, message):
    """A typo must not fall back to a default unseen: every mistake is refused with the
    setting's name and the field."""
    if message is None:
        assert tuning.from_setting(text, "SOURCE") == TritonConfig(
            programs_per_sm=16, fused_merge=True, split_len=None)
        return
    with pytest.raises(ValueError) as refused:
        tuning.from_setting(text, "SOURCE")
    assert str(refused.value).startswith("SOURCE: "), refused.value
    assert message in str(refused.value), refused.value


def test_launch_shapes_come_from_the_setting_then_the_gpus_tuned_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path / "tuned")
    monkeypatch.delenv(tuning.ENV, raising=False)
    assert tuning.launch_config("NVIDIA H200") == (DEFAULT_CONFIG, "defaults")
    (tmp_path / "tuned").mkdir()
    tuned = tmp_path / "tuned" / "NVIDIA_H200.json"
    assert tuning.tuned_file_name("NVIDIA H200") == tuned.name
    tuned.write_text(json.dumps({"programs_per_sm": 16, "whole_waves": True}))
    config, source = tuning.launch_config("NVIDIA H200")
    assert config == TritonConfig(programs_per_sm=16, whole_waves=True)
    assert source == "tuned for the NVIDIA H200"
    assert tuning.describe(config, source) == ("Triton launch shapes: tuned for the NVIDIA "
                                               "H200 (programs_per_sm=16, whole_waves=True)")
    # another GPU, and the interpreter (no device name), keep the defaults
    assert tuning.launch_config("NVIDIA H100 80GB HBM3")[0] == DEFAULT_CONFIG
    assert tuning.launch_config(None)[0] == DEFAULT_CONFIG
    tuned.write_text('{"programs_per_sm": 0}')  # a bad tuned file names itself
    with pytest.raises(ValueError, match=f"{tuned}: TritonConfig.programs_per_sm must be >= 1"):
        tuning.launch_config("NVIDIA H200")

    # the setting wins over the tuned file, as JSON or as a file of it
    monkeypatch.setenv(tuning.ENV, '{"fused_merge": true}')
    assert tuning.launch_config("NVIDIA H200") == (TritonConfig(fused_merge=True), tuning.ENV)
    setting = tmp_path / "mine.json"
    setting.write_text('{"decode_block_n": 64}')
    monkeypatch.setenv(tuning.ENV, str(setting))
    assert tuning.launch_config(None)[0] == TritonConfig(decode_block_n=64)
    monkeypatch.setenv(tuning.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="neither a JSON object of TritonConfig fields nor a "
                                         "file of one"):
        tuning.launch_config(None)
    assert settings.TRITON_CONFIG_ENV == tuning.ENV  # the start-up check reads this one
