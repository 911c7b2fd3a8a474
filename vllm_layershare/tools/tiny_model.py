"""Build a tiny random Llama with a byte-level tokenizer and a chat template, offline.

Used by the tests and the demo: no model hub is needed. `python -m
vllm_layershare.tools.tiny_model DIR` writes a normal Hugging Face directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = byte_level
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


SMOLLM2_135M_GEOMETRY = dict(hidden_size=576, intermediate_size=1536, num_heads=9,
                             num_kv_heads=3, head_dim=64)


def build_tiny_llama(out: str | Path, num_layers: int = 6, seed: int = 0,
                     max_positions: int = 4096, hidden_size: int = 128,
                     intermediate_size: int = 256, num_heads: int = 4, num_kv_heads: int = 2,
                     head_dim: int = 32, dtype: str = "float32") -> Path:
    """Write a random Llama (default: GQA with 4 query heads, 2 KV heads, head dim 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0, torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper attention than the default init, so layers differ
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(4.0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="directory to write")
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    print(build_tiny_llama(args.out, args.layers))


if __name__ == "__main__":
    main()
