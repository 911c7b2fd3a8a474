"""A Hugging Face model run (float32, CPU) that keeps every layer's q, K and V.

Calibration needs each layer's queries and keys after the rotary embedding, which
the model never returns. A custom attention function, registered with
transformers' `AttentionInterface`, records them while computing ordinary causal
attention. For the next-token damage measure, a run can also resume at one layer
from that layer's recorded input, with the layer's attention output replaced, so
one (leader, follower) pair costs the layers from the follower on, not a whole pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ATTENTION_NAME = "layershare_calibration"
# (q [H, T, D], k [Hkv, T, D], v [Hkv, T, D], scale) -> attention output [T, H, D]
Override = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class Window:
    """What one run of the dense model left behind."""

    qkv: list[tuple]  # per layer: q [H, T, D], k [Hkv, T, D], v [Hkv, T, D]
    scale: float
    logits: torch.Tensor  # [len(positions), vocab] at the kept positions
    positions: torch.Tensor  # the kept positions
    layer_inputs: list[torch.Tensor] | None  # per layer: its input hidden states [1, T, E]


class CapturingModel:
    """Runs a causal LM on windows of token ids and keeps each layer's q, K, V."""

    def __init__(self, path: str) -> None:
        from transformers import AttentionInterface, AutoModelForCausalLM

        self._captured: dict[int, tuple] = {}
        self._override: tuple[int, Override] | None = None
        AttentionInterface.register(ATTENTION_NAME, self._attention)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()
        self.num_layers = self.model.config.num_hidden_layers
        self.num_heads = self.model.config.num_attention_heads

    def _attention(self, module, query, key, value, attention_mask, scaling=None,
                   dropout=0.0, **kwargs):
        layer = module.layer_idx
        self._captured[layer] = (query[0], key[0], value[0], scaling)
        if self._override is not None and self._override[0] == layer:
            return self._override[1](query[0], key[0], value[0], scaling)[None], None
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None

    @torch.no_grad()
    def run(self, window: list[int], positions: torch.Tensor | None = None,
            keep_inputs: bool = False) -> Window:
        """One dense pass; logits only at `positions` (default: none kept)."""
        inputs: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
                 for layer in self._layers()] if keep_inputs else []
        keep = positions if positions is not None else torch.zeros(0, dtype=torch.long)
        self._captured.clear()
        try:
            logits = self.model(torch.tensor([window]), logits_to_keep=keep).logits[0]
        finally:
            for hook in hooks:
                hook.remove()
        qkv = [self._captured[i][:3] for i in range(self.num_layers)]
        return Window(qkv, self._captured[0][3], logits, keep,
                      inputs if keep_inputs else None)

    @torch.no_grad()
    def resume(self, window: Window, layer: int, override: Override) -> torch.Tensor:
        """Logits at the window's kept positions when `layer`'s attention output is
        `override`'s; layers before it are not run again (their outputs are kept)."""
        if window.layer_inputs is None:
            raise ValueError("resume needs a run with keep_inputs=True")
        body = self.model.model
        hidden = window.layer_inputs[layer]
        position_ids = torch.arange(hidden.shape[1])[None]
        rotary = body.rotary_emb(hidden, position_ids=position_ids)
        self._override = (layer, override)
        try:
            for block in self._layers()[layer:]:
                hidden = block(hidden, position_embeddings=rotary, position_ids=position_ids)
        finally:
            self._override = None
        return self.model.lm_head(body.norm(hidden[:, window.positions]))[0]

    def _layers(self):
        body = getattr(self.model, "model", None)
        if not all(hasattr(body, name) for name in ("layers", "rotary_emb", "norm")):
            raise SystemExit(
                f"layershare-calibrate: {type(self.model).__name__} is not laid out like "
                "Llama (model.layers, model.rotary_emb, model.norm); the next-token damage "
                "measure needs that layout. Use --damage-measure output.")
        return body.layers
