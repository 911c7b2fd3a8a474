"""The Triton kernels' launch shapes on a GPU: the user's, a file tuned for that GPU, or
the defaults.

As vLLM does for its fused-MoE kernels: `benchmarks/kernels.py --sweep FILE` times
launch shapes on a GPU and writes the fastest as TritonConfig fields in JSON, for
example `{"programs_per_sm": 16, "fused_merge": true}`. Fields a file leaves out keep
TritonConfig's defaults (the fastest on an H200). In order:

1. VLLM_LAYERSHARE_TRITON_CONFIG: such a JSON object, or a file of it, for every GPU;
2. `tuned/<device name>.json` beside this module (`tuned_file_name`), for that GPU;
3. the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path

import torch

from vllm_layershare.attention.triton_config import DEFAULT_CONFIG, TritonConfig

ENV = "VLLM_LAYERSHARE_TRITON_CONFIG"  # settings.TRITON_CONFIG_ENV (no vLLM imported here)
TUNED_DIR = Path(__file__).with_name("tuned")


def tuned_file_name(device_name: str) -> str:
    """A GPU's tuned file: its CUDA name with underscores for spaces, as vLLM names its
    fused-MoE configs (`NVIDIA H200` -> `NVIDIA_H200.json`)."""
    return device_name.replace(" ", "_") + ".json"


def _allowed_types(annotation) -> tuple[type, ...]:
    """`int | None` -> (int, NoneType)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def parse(text: str, source: str) -> TritonConfig:
    """TritonConfig fields in JSON as a config; every mistake names `source` and the
    field (a typo must not fall back to a default unseen)."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: expected a JSON object of TritonConfig fields, not "
                         f"{type(fields).__name__}")
    hints = typing.get_type_hints(TritonConfig)
    unknown = sorted(set(fields) - set(hints))
    if unknown:
        raise ValueError(f"{source}: unknown TritonConfig field(s) {', '.join(unknown)}; "
                         f"the fields are {', '.join(sorted(hints))}")
    for name, value in fields.items():
        allowed = _allowed_types(hints[name])
        # exact types: JSON's true is not a count, nor 16 a switch
        if type(value) not in allowed:
            names = " or ".join("null" if t is types.NoneType else t.__name__ for t in allowed)
            raise ValueError(f"{source}: TritonConfig.{name} must be {names}, not {value!r}")
    try:
        return TritonConfig(**fields)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def from_setting(text: str, source: str = ENV) -> TritonConfig:
    """A setting's config: a JSON object, or the path of a file holding one."""
    if text.lstrip().startswith(("{", "[")):  # JSON, not a path
        return parse(text, source)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{source}={text!r}: neither a JSON object of TritonConfig fields "
                         "nor a file of one")
    return parse(path.read_text(), f"{source} ({path})")


def launch_config(device_name: str | None) -> tuple[TritonConfig, str]:
    """The launch shapes for a GPU of this name (None: no GPU, the interpreter), and where
    they come from, for the start-up log."""
    setting = os.environ.get(ENV)
    if setting:
        return from_setting(setting), ENV
    if device_name is not None:
        tuned = TUNED_DIR / tuned_file_name(device_name)
        if tuned.is_file():
            return parse(tuned.read_text(), str(tuned)), f"tuned for the {device_name}"
    return DEFAULT_CONFIG, "defaults"


def device_launch_config(device: torch.device) -> tuple[TritonConfig, str]:
    """launch_config for a torch device: its CUDA name, or none on CPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return launch_config(name)


def describe(config: TritonConfig, source: str) -> str:
    """Where the shapes come from and how they differ from the defaults."""
    changed = [f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(DEFAULT_CONFIG, f.name)]
    return f"Triton launch shapes: {source}" + (f" ({', '.join(changed)})" if changed else "")
