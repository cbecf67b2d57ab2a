"""A lean forward for the common decoder families, run on the model's own modules.

transformers' forward wraps every call in Python the engine does not use: output recording, mask
preprocessing, cache bookkeeping, attention-backend dispatch. For a drafter's one-token steps, and for
small models generally, that Python costs as much as the arithmetic (on the zoo's models, on a CPU: the
drafter's step 1.5x, the target's 1.2x faster this way). This forward calls the same modules in the same
order (embeddings, norms, projections with any LoRA layers peft injected into them, rotary embedding,
MLP, dropouts, head), writes keys and values through the same cache (``SlotKVCache.update``), and attends
with SDPA under the engine's additive mask, so its logits are transformers' up to float rounding.

Families: Llama, Mistral, Qwen2 and Qwen3 (pre-norm, rotary embedding over the whole head, grouped-query
attention, no soft-capping; Qwen3 adds per-head query/key RMS norms) and GPT-2 (learned positions, fused
QKV projection). Every other model runs transformers' forward (``models.py``), and so does one with forward hooks on it or on
its decoder (which this forward would skip) or with accelerate's hooks on any module (a model dispatched
over devices: its attention inputs would not follow its layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module

__all__ = ["forward", "hooked", "supports"]

# model_type -> the causal-LM class whose forward this one replaces
_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# model_type -> the decoder's attribute, its modules, its list of layers, each layer's modules, the
# attention module's attribute in a layer, and that module's parts
_PARTS = {
    "llama": (
        "model",
        ("embed_tokens", "norm", "rotary_emb"),
        "layers",
        ("input_layernorm", "post_attention_layernorm", "mlp"),
        "self_attn",
        ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups"),
    ),
    "gpt2": ("transformer", ("wte", "wpe", "drop", "ln_f"), "h", ("ln_1", "ln_2", "mlp"), "attn",
             ("c_attn", "c_proj", "split_size", "head_dim", "attn_dropout", "resid_dropout")),
}  # fmt: skip
_PARTS["mistral"] = _PARTS["qwen2"] = _PARTS["llama"]
_PARTS["qwen3"] = (*_PARTS["llama"][:-1], (*_PARTS["llama"][-1], "q_norm", "k_norm"))  # RMSNorm per head


def supports(model: torch.nn.Module) -> bool:
    """Whether :func:`forward` can stand in for ``model``'s forward (checked once per model)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if _CLASSES.get(kind) != type(model).__name__ or getattr(config, "add_cross_attention", False):
        return False
    name, modules, layers, layer_modules, attention, attention_parts = _PARTS[kind]
    decoder = model._modules.get(name)
    if decoder is None or "lm_head" not in model._modules or not _holds(decoder, (*modules, layers)):
        return False
    if any(hasattr(module, "_hf_hook") for module in model.modules()):  # accelerate's dispatch hooks
        return False
    return all(
        _holds(layer, (*layer_modules, attention)) and _holds(layer._modules[attention], attention_parts)
        for layer in decoder._modules[layers]
    )


def _holds(module: torch.nn.Module, parts: tuple[str, ...]) -> bool:
    """Whether ``module`` has each of ``parts``: a submodule in its ``_modules``, where :func:`forward` reads
    it (without nn.Module.__getattr__'s Python fallback), or a plain attribute (``head_dim``)."""
    return all(
        part in module._modules
        or (hasattr(module, part) and not isinstance(getattr(module, part), torch.nn.Module))
        for part in parts
    )


def hooked(model: torch.nn.Module) -> bool:
    """Whether a module hook would run in transformers' forward: a forward or backward hook on any of
    ``model``'s modules, or a global one (``torch.nn.modules.module.register_module_forward_hook`` and the
    like). :func:`forward` calls the model, its decoder, the decoder layers and their attention modules as
    plain code, not through ``nn.Module.__call__``, so their hooks would not run. Looked for at every
    request (``CausalLM.begin``): a walk over the modules' hook dicts, without ``named_modules``' names."""
    if any(getattr(_nn_module, f"_global{name}", None) for name in _HOOKS):
        return True
    seen, stack = set(), [model]
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:  # None: a submodule slot left empty
            continue
        seen.add(id(module))
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
        ):
            return True
        stack.extend(module._modules.values())
    return False


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # [batch, n]
    positions: torch.Tensor,  # [batch, n]
    mask: torch.Tensor
    | list[torch.Tensor],  # [batch, 1, n, slots] additive, the model's dtype; or one per layer
    cache,  # models.SlotKVCache
    last_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [batch, n or 1, V] and the last hidden states they came from [batch, n or 1, H]."""
    run = _gpt2 if model.config.model_type == "gpt2" else _llama
    hidden = run(model, input_ids, positions, mask, cache, last_only)
    return model._modules["lm_head"](hidden), hidden


def _attend(attention, q, k, v, mask, cache, index: int, scale: float, dropout: float) -> torch.Tensor:
    """Write k, v at the forward's slots and attend: [batch, n, heads * head_dim].

    Grouped-query attention folds each key/value head's query heads into the query axis
    (``[batch, kv_heads, groups * n, head_dim]``, ``mask`` folded alike by :func:`_fold`) instead of
    repeating the cached keys and values per query head: no copy of the cache per layer and forward."""
    keys, values = cache.update(k, v, index)
    batch, heads, n, _ = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads * n, q.shape[-1])
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, dropout_p=dropout if attention.training else 0.0, scale=scale
    )
    return out.view(batch, heads, n, out.shape[-1]).transpose(1, 2).flatten(2)


def _fold(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``mask`` [batch, 1, n, slots] for queries folded ``groups`` to a key/value head: [batch, 1, groups * n,
    slots], query head ``g``'s rows at ``g * n .. g * n + n - 1`` (a view when ``n`` is 1)."""
    if groups == 1:
        return mask
    batch, _, n, slots = mask.shape
    return mask[:, :, None].expand(batch, 1, groups, n, slots).reshape(batch, 1, groups * n, slots)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _llama(model, input_ids, positions, mask, cache, last_only) -> torch.Tensor:
    # Submodules are read from each module's `_modules` (what `module.name` returns for them, without
    # nn.Module.__getattr__'s Python fallback: ~1 us an access, ~15 a layer)
    decoder = model._modules["model"]
    parts = decoder._modules
    batch, n = input_ids.shape
    x = parts["embed_tokens"](input_ids)
    cos, sin = parts["rotary_emb"](x, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [batch, 1, n, head_dim]
    head_norms = model.config.model_type == "qwen3"  # queries and keys RMS-normed per head before rotation
    folded: dict[tuple[int, int], torch.Tensor] = {}  # (id(mask), groups) -> the mask folded once
    for index, layer in enumerate(parts["layers"]):
        modules = layer._modules
        attention = modules["self_attn"]
        projections = attention._modules
        h = modules["input_layernorm"](x)
        shape = (batch, n, -1, attention.head_dim)
        q, k = projections["q_proj"](h).view(shape), projections["k_proj"](h).view(shape)
        if head_norms:
            q, k = projections["q_norm"](q), projections["k_norm"](k)
        q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
        v = projections["v_proj"](h).view(shape).transpose(1, 2)
        scale = getattr(attention, "scaling", attention.head_dim**-0.5)
        dropout = getattr(attention, "attention_dropout", 0.0)
        layer_mask = mask[index] if isinstance(mask, list) else mask
        groups = attention.num_key_value_groups
        key = (id(layer_mask), groups)
        if key not in folded:
            folded[key] = _fold(layer_mask, groups)
        layer_mask = folded[key]
        x = x + projections["o_proj"](_attend(attention, q, k, v, layer_mask, cache, index, scale, dropout))
        x = x + modules["mlp"](modules["post_attention_layernorm"](x))
    return parts["norm"](x[:, -1:] if last_only else x)


def _gpt2(model, input_ids, positions, mask, cache, last_only) -> torch.Tensor:
    decoder = model.transformer
    batch, n = input_ids.shape
    x = decoder.drop(decoder.wte(input_ids) + decoder.wpe(positions))
    for index, block in enumerate(decoder.h):
        attention = block.attn
        shape = (batch, n, -1, attention.head_dim)
        q, k, v = (
            t.view(shape).transpose(1, 2)
            for t in attention.c_attn(block.ln_1(x)).split(attention.split_size, dim=2)
        )
        scale = getattr(attention, "scaling", None)
        if scale is None:  # transformers before the attribute: the same two settings
            scale = attention.head_dim**-0.5 if model.config.scale_attn_weights else 1.0
            if model.config.scale_attn_by_inverse_layer_idx:
                scale /= float(index + 1)
        out = _attend(attention, q, k, v, mask, cache, index, scale, attention.attn_dropout.p)
        x = x + attention.resid_dropout(attention.c_proj(out))
        x = x + block.mlp(block.ln_2(x))
    return decoder.ln_f(x[:, -1:] if last_only else x)
