"""The layer-grouping file: which layers lead, which follow, and the window sizes.

A grouping file is YAML with exactly these keys::

    num_layers: 30            # must equal the model's layer count
    sink_tokens: 16           # n_s >= 0
    recent_tokens: 1008       # n_r >= 1
    share: scores             # scores | keys
    gate_skip_threshold: null # optional; 0 < tau <= 1 turns the gate skip on
    distant_mass: estimated   # optional; estimated (default: own mass, from mean keys) | leader
    summary_tokens: 32        # optional; tokens per mean key (estimated); divides 2 x block size
    summary_offsets:          # optional (estimated); per follower, per query head: added to
      4: [1.2, 0.9, ...]      #   each summary block's log mass (calibrate --offsets fit)
    groups:                   # consecutive layer indices; the first is the leader
      - [0, 1, 2]
      - [3, 4, 5]

Every problem is reported as one :class:`LayershareConfigError` naming the file,
the key and the fix, before vLLM allocates anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ENV_VAR = "VLLM_LAYERSHARE_CONFIG"
SHARE_MODES = ("scores", "keys")
REQUIRED_KEYS = ("num_layers", "sink_tokens", "recent_tokens", "share", "groups")
OPTIONAL_KEYS = ("gate_skip_threshold", "distant_mass", "summary_tokens", "summary_offsets")
MASS_MODES = ("leader", "estimated")
# Measured training-free (docs/quality.md): the leader's mass swamps followers; their own
# estimated mass keeps perplexity. 32 divides 2 x block size for every block size >= 16.
DEFAULT_MASS = "estimated"
DEFAULT_SUMMARY_TOKENS = 32


class LayershareConfigError(ValueError):
    """A grouping file (or the way it was given), or a layershare setting, cannot be used."""


@dataclass(frozen=True)
class LayershareConfig:
    """A validated grouping: roles of layers and the proximal window."""

    num_layers: int
    sink_tokens: int
    recent_tokens: int
    share: str
    groups: tuple[tuple[int, ...], ...]
    gate_skip_threshold: float | None = None
    distant_mass: str = DEFAULT_MASS
    summary_tokens: int = DEFAULT_SUMMARY_TOKENS
    # (follower, per-query-head offsets of its summary blocks' log mass); others: 0
    summary_offsets: tuple[tuple[int, tuple[float, ...]], ...] = ()
    source: str = "<inline>"

    def offsets_of(self, layer: int) -> tuple[float, ...] | None:
        """The calibrated log-mass offsets of a follower's summary blocks, if any."""
        return dict(self.summary_offsets).get(layer)

    def leader_of(self, layer: int) -> int:
        """The leader of the group that holds `layer` (itself for a leader)."""
        return self._leaders[layer]

    def is_follower(self, layer: int) -> bool:
        return self.leader_of(layer) != layer

    def has_followers(self, layer: int) -> bool:
        """Whether `layer` leads a group of two or more layers."""
        return any(group[0] == layer and len(group) > 1 for group in self.groups)

    @property
    def followers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_follower(i)]

    @property
    def proximal_tokens(self) -> int:
        """n_s + n_r: tokens whose keys every layer keeps."""
        return self.sink_tokens + self.recent_tokens

    @property
    def _leaders(self) -> dict[int, int]:
        return {layer: group[0] for group in self.groups for layer in group}

    @property
    def estimates_mass(self) -> bool:
        return self.distant_mass == "estimated"

    def kv_fraction(self, context_len: int, score_fraction: float = 0.0) -> float:
        """Bytes of the whole cache at `context_len`, as a fraction of full attention.

        A follower keeps V of every token and K of min(L, n_s + n_r) tokens, so it
        costs (1 + min(L, n_s + n_r) / L) / 2 of a full layer (method.md); with an
        estimated mass, one mean key per `summary_tokens` adds 1 / (2 S). On the GPU
        kernels with share `scores`, each leader with followers keeps its decode logits
        too: `score_fraction` of a full layer (settings.score_fraction).
        """
        kept = min(context_len, self.proximal_tokens) / context_len
        follower_cost = (1.0 + kept) / 2.0 + self.summary_fraction
        num_followers = len(self.followers)
        sharing = sum(len(group) > 1 for group in self.groups) if score_fraction else 0
        return (self.num_layers - num_followers + num_followers * follower_cost
                + sharing * score_fraction) / self.num_layers

    @property
    def summary_fraction(self) -> float:
        """Summary bytes per token of a follower, as a fraction of a full layer's."""
        return 1.0 / (2.0 * self.summary_tokens) if self.estimates_mass else 0.0

    def describe(self, context_len: int, score_fraction: float = 0.0) -> str:
        """One line for the start-up log."""
        groups = " ".join(
            "[" + ",".join(str(i) for i in g) + "]" for g in self.groups
        )
        saved = 1.0 - self.kv_fraction(context_len, score_fraction)
        tau = self.gate_skip_threshold
        mass = self.distant_mass
        if self.estimates_mass:
            mass += (f" (one mean key per {self.summary_tokens} tokens: "
                     f"{self.summary_fraction:.2%} of a layer"
                     + (f"; calibrated offsets for {len(self.summary_offsets)} followers"
                        if self.summary_offsets else "") + ")")
        return (
            f"layershare: {len(self.groups)} groups {groups}; "
            f"{len(self.groups)} leaders, {len(self.followers)} followers; "
            f"sink {self.sink_tokens} + recent {self.recent_tokens} tokens; "
            f"share={self.share}"
            + (f" (leaders keep decode logits: {score_fraction:.2%} of a layer)"
               if score_fraction else "")
            + f"; gate_skip={'off' if tau is None else tau}; "
            f"distant_mass={mass}; "
            f"KV bytes saved at {context_len} tokens: {saved:.1%} "
            f"({1.0 / (1.0 - saved):.2f}x tokens in the same memory)"
        )

    def check_model(self, num_layers: int, unsupported: list[str],
                    num_heads: int | None = None) -> None:
        """Refuse a model whose layer count, head count or attention features do not fit."""
        if num_layers != self.num_layers:
            raise _error(
                self.source,
                "num_layers",
                f"is {self.num_layers} but the model has {num_layers} layers",
                f"set num_layers: {num_layers} and group all {num_layers} layers",
            )
        for layer, offsets in self.summary_offsets:
            if num_heads is not None and len(offsets) != num_heads:
                raise _error(self.source, "summary_offsets",
                             f"has {len(offsets)} offsets for layer {layer} but the model has "
                             f"{num_heads} query heads",
                             "calibrate this model again (layershare-calibrate)")
        if unsupported:
            raise LayershareConfigError(
                f"layershare ({self.source}): the model uses "
                f"{', '.join(unsupported)}, which the layershare method does not "
                "support. Fix: serve this model with the stock attention backend."
            )


def _error(source: str, key: str, problem: str, fix: str) -> LayershareConfigError:
    return LayershareConfigError(
        f"layershare config {source}: key '{key}' {problem}. Fix: {fix}."
    )


def _int_field(raw: dict[str, Any], source: str, key: str, minimum: int) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(source, key, f"must be an integer, got {value!r}",
                     f"write a whole number >= {minimum}")
    if value < minimum:
        raise _error(source, key, f"must be >= {minimum}, got {value}",
                     f"use a value >= {minimum}")
    return value


def _tau_field(raw: dict[str, Any], source: str) -> float | None:
    tau = raw.get("gate_skip_threshold")
    if tau is None:
        return None
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise _error(source, "gate_skip_threshold", f"must be a number or null, got {tau!r}",
                     "use null (off) or a number in (0, 1]")
    if not 0.0 < float(tau) <= 1.0:
        raise _error(source, "gate_skip_threshold", f"must be in (0, 1], got {tau}",
                     "use null (off) or a number in (0, 1]")
    return float(tau)


def _mass_field(raw: dict[str, Any], source: str) -> str:
    mass = raw.get("distant_mass", DEFAULT_MASS)
    if mass not in MASS_MODES:
        raise _error(source, "distant_mass", f"must be one of {', '.join(MASS_MODES)}, "
                     f"got {mass!r}", "write 'distant_mass: estimated' (the default) or "
                     "'distant_mass: leader' (the paper's gate)")
    return mass


def _summary_field(raw: dict[str, Any], source: str) -> int:
    if raw.get("summary_tokens") is None:
        return DEFAULT_SUMMARY_TOKENS
    tokens = _int_field(raw, source, "summary_tokens", 1)
    if raw.get("distant_mass", DEFAULT_MASS) != "estimated":
        raise _error(source, "summary_tokens", "only applies with 'distant_mass: estimated'",
                     "remove it, or set 'distant_mass: estimated'")
    return tokens


def _offsets_field(raw: dict[str, Any], source: str,
                   groups: tuple[tuple[int, ...], ...]) -> tuple:
    offsets = raw.get("summary_offsets")
    if offsets is None:
        return ()
    fix = ("write one list of numbers per follower layer, one number per query head, "
           "e.g. '4: [1.2, 0.9]' (layershare-calibrate writes them)")
    if raw.get("distant_mass", DEFAULT_MASS) != "estimated":
        raise _error(source, "summary_offsets", "only applies with 'distant_mass: estimated'",
                     "remove it, or set 'distant_mass: estimated'")
    if not isinstance(offsets, dict):
        raise _error(source, "summary_offsets", f"must be a mapping, got {offsets!r}", fix)
    followers = {layer for group in groups for layer in group[1:]}
    widths = set()
    result = []
    for layer, values in sorted(offsets.items(), key=lambda item: str(item[0])):
        if layer not in followers:
            raise _error(source, "summary_offsets", f"names layer {layer!r}, which is not a "
                         "follower", "keep entries for followers only")
        if (not isinstance(values, list) or not values or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                for x in values)):
            raise _error(source, "summary_offsets",
                         f"for layer {layer} must be a list of finite numbers, got {values!r}",
                         fix)
        widths.add(len(values))
        result.append((layer, tuple(float(x) for x in values)))
    if len(widths) > 1:
        raise _error(source, "summary_offsets", "lists differ in length (one number per query "
                     "head of the model)", fix)
    return tuple(sorted(result))


def _groups_field(raw: dict[str, Any], source: str, num_layers: int) -> tuple[tuple[int, ...], ...]:
    groups = raw["groups"]
    fix = f"list groups of consecutive layers covering 0..{num_layers - 1} in order"
    if not isinstance(groups, list) or not groups:
        raise _error(source, "groups", f"must be a non-empty list, got {groups!r}", fix)
    expected = 0
    result = []
    for group in groups:
        if (
            not isinstance(group, list)
            or not group
            or any(isinstance(i, bool) or not isinstance(i, int) for i in group)
        ):
            raise _error(source, "groups", f"entry {group!r} is not a list of layer indices", fix)
        if group != list(range(group[0], group[0] + len(group))):
            raise _error(source, "groups", f"group {group} is not consecutive", fix)
        if group[0] != expected:
            problem = (
                f"layer {expected} is missing" if group[0] > expected
                else f"layer {group[0]} appears twice"
            )
            raise _error(source, "groups", f"{problem} (group {group})", fix)
        expected = group[-1] + 1
        result.append(tuple(group))
    if expected != num_layers:
        problem = (
            f"covers layers up to {expected - 1} but num_layers is {num_layers}"
        )
        raise _error(source, "groups", problem, fix)
    return tuple(result)


def parse_config(raw: Any, source: str = "<inline>") -> LayershareConfig:
    """Validate a parsed YAML mapping into a :class:`LayershareConfig`."""
    if not isinstance(raw, dict):
        raise LayershareConfigError(
            f"layershare config {source}: expected a YAML mapping with keys "
            f"{', '.join(REQUIRED_KEYS)}, got {type(raw).__name__}. "
            "Fix: see configs/ for an example."
        )
    unknown = sorted(set(raw) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise _error(source, unknown[0], "is not a known key",
                     f"remove it; known keys are {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise _error(source, key, "is missing", f"add '{key}:' (see configs/ for an example)")
    num_layers = _int_field(raw, source, "num_layers", 1)
    sink = _int_field(raw, source, "sink_tokens", 0)
    recent = _int_field(raw, source, "recent_tokens", 1)
    share = raw["share"]
    if share not in SHARE_MODES:
        raise _error(source, "share", f"must be one of {', '.join(SHARE_MODES)}, got {share!r}",
                     "write 'share: scores' (the paper) or 'share: keys'")
    groups = _groups_field(raw, source, num_layers)
    return LayershareConfig(
        num_layers=num_layers,
        sink_tokens=sink,
        recent_tokens=recent,
        share=share,
        groups=groups,
        gate_skip_threshold=_tau_field(raw, source),
        distant_mass=_mass_field(raw, source),
        summary_tokens=_summary_field(raw, source),
        summary_offsets=_offsets_field(raw, source, groups),
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> LayershareConfig:
    """Read and validate a grouping file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LayershareConfigError(
            f"layershare config {source}: cannot be read ({exc.strerror}). "
            "Fix: pass an existing file."
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LayershareConfigError(
            f"layershare config {source}: is not valid YAML ({exc}). Fix: correct the syntax."
        ) from None
    return parse_config(raw, source)


def config_path_from(additional_config: dict[str, Any] | None) -> str:
    """Where the grouping file was given: additional_config first, then the env var."""
    section = (additional_config or {}).get("layershare")
    if section is not None:
        if not isinstance(section, dict) or not isinstance(section.get("config"), str):
            raise LayershareConfigError(
                "layershare: additional_config['layershare'] must be "
                "{'config': 'PATH/TO/grouping.yaml'}, got "
                f"{section!r}. Fix: --additional-config "
                "'{\"layershare\": {\"config\": \"PATH\"}}'."
            )
        return section["config"]
    path = os.environ.get(ENV_VAR)
    if path:
        return path
    raise LayershareConfigError(
        "layershare: the layershare attention backend needs a layer-grouping file. "
        "Fix: pass --additional-config '{\"layershare\": {\"config\": \"PATH\"}}' "
        f"or set {ENV_VAR}=PATH (examples in configs/)."
    )
