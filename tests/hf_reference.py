"""A reference forward pass of the tiny model in Hugging Face transformers, with PoD
attention plugged in through transformers' attention interface.

Independent of the backend: it uses the dense reference of method.md on the whole
sequence and knows nothing of pages, vLLM or the portable path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from vllm_layershare.attention.reference import dense_pod_attention
from vllm_layershare.config import LayershareConfig


def reference_logprobs(model_dir, config: LayershareConfig, token_ids: list[int]) -> list[float]:
    """log p(token[t] | tokens[:t]) for t >= 1 under PoD attention, in float64."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pod(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
        seen[layer] = (q, k)
        lead = config.leader_of(layer)
        if lead == layer:  # ordinary attention: nothing is distant
            out = dense_pod_attention(q, k, v, q, k, scaling, sink=0, recent=q.shape[0] + 1)
        else:
            qa, ka = seen[lead]
            out = dense_pod_attention(
                q, k, v, qa, ka, scaling, sink=config.sink_tokens, recent=config.recent_tokens,
                share=config.share, gate_skip_threshold=config.gate_skip_threshold,
                distant_mass=config.distant_mass, summary_tokens=config.summary_tokens,
                summary_offsets=config.offsets_of(layer),
            )
        return out.to(query.dtype)[None], None

    AttentionInterface.register("layershare_reference", pod)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="layershare_reference"
    )
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[t - 1, token_ids[t]]) for t in range(1, len(token_ids))]
