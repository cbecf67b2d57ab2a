"""A lean forward for Llama-family decoders (Llama, Mistral, Qwen2), run on the model's own modules.

transformers' forward wraps every call in Python the engine does not use: output recording, mask
preprocessing, cache bookkeeping, attention-backend dispatch. For a drafter's one-token steps, and for
small models generally, that Python costs as much as the arithmetic (on the zoo's models, on a CPU: the
drafter's step 1.5x, the target's 1.2x faster this way). This forward calls the same modules in the same
order (embedding, norms, projections with any LoRA layers peft injected into them, rotary embedding, MLP,
head), writes keys and values through the same cache (``SlotKVCache.update``), and attends with SDPA under
the engine's additive mask, so its logits are transformers' up to float rounding. Every other model, and
one with forward hooks on it or on its decoder (which this forward would skip), runs transformers'
forward (``models.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["forward", "hooked", "supports"]

# model_type -> the causal-LM class whose forward this one replaces (attention without soft-capping or
# query/key norms, rotary embedding over the whole head, unscaled embeddings).
_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")


def supports(model: torch.nn.Module) -> bool:
    """Whether :func:`forward` can stand in for ``model``'s forward (checked once per model)."""
    config = getattr(model, "config", None)
    if _CLASSES.get(getattr(config, "model_type", None)) != type(model).__name__:
        return False
    decoder = getattr(model, "model", None)
    if decoder is None or not all(
        hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")
    ):
        return False
    return all(
        all(hasattr(layer, name) for name in _LAYER)
        and all(hasattr(layer.self_attn, name) for name in _ATTENTION)
        for layer in decoder.layers
    )


def hooked(model: torch.nn.Module) -> bool:
    """Whether ``model`` or its decoder has forward hooks, which only transformers' forward runs."""
    return any(module._forward_hooks or module._forward_pre_hooks for module in (model, model.model))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [batch, n]
    positions: torch.Tensor,  # [batch, n]
    mask: torch.Tensor,  # [batch, 1, n, slots] additive, the model's dtype
    cache,  # models.SlotKVCache
    last_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [batch, n or 1, V] and the last hidden states they came from [batch, n or 1, H]."""
    decoder = model.model
    batch, n = input_ids.shape
    x = decoder.embed_tokens(input_ids)
    cos, sin = decoder.rotary_emb(x, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [batch, 1, n, head_dim]
    for index, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (batch, n, -1, attention.head_dim)
        q = _rotate(attention.q_proj(h).view(shape).transpose(1, 2), cos, sin)
        k = _rotate(attention.k_proj(h).view(shape).transpose(1, 2), cos, sin)
        v = attention.v_proj(h).view(shape).transpose(1, 2)
        keys, values = cache.update(k, v, index)
        groups = q.shape[1] // keys.shape[1]
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scale = getattr(attention, "scaling", attention.head_dim**-0.5)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        x = x + attention.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    hidden = decoder.norm(x[:, -1:] if last_only else x)
    return model.lm_head(hidden), hidden
