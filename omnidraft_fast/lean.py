"""A lean forward for the common decoder families, run on the model's own modules.

transformers' forward wraps every call in Python the engine does not use: output recording, mask
preprocessing, cache bookkeeping, attention-backend dispatch. For a drafter's one-token steps, and for
small models generally, that Python costs as much as the arithmetic (on the zoo's models, on a CPU: the
draft stage 1.5-1.6x, the target's 1.25-1.3x faster this way, ``benchmarks/results/e2e-cpu.md``'s stage
times with and without it). This forward calls the same modules in the same
order (embeddings, norms, projections with any LoRA layers peft injected into them, rotary embedding,
MLP, dropouts, head), writes keys and values through the same cache (``SlotKVCache.update``), and attends
with SDPA under the engine's additive mask.

What a call costs on a CPU is mostly per op and per Python call, so the forward spends few of either
(:func:`_call`): it runs each module's ``forward`` without ``nn.Module.__call__`` (no hook can be set:
:func:`hooked`), and a module of exactly torch's ``Linear``, ``LayerNorm`` or ``Dropout``, or of the
family's RMS norm, MLP or ``Conv1D``, as that forward's aten ops written out (anything else, a peft LoRA
layer, a quantised linear, a subclass, a module whose class or instance ``forward`` was replaced, runs its
own forward). The hidden states stay 2-D (``[batch * n, H]``: a 2-D linear is ``t`` + ``mm``, a 3-D one
adds two views) and are viewed per head for attention only (one token's queries without a transpose), and
the rotation is ``x * cos + roll(x) * sin`` with ``sin``'s first half negated (transformers'
``rotate_half`` bit for bit, in 3 ops fewer). Where the rotary type's frequencies are fixed (all but dynamic
and long RoPE), cos and the folded sin are looked up by position in a table of the rotary module's own
values, made once per request's cache (2 ops a forward instead of the module's ~11 and the fold). The same
ops as
transformers' on the same operands: its hidden states and logits bit for bit wherever SDPA is called alike
(no query heads folded; transformers' head on the last of several positions reads a strided slice, another
gemm path), up to float rounding where grouped query heads are folded (``tests/test_lean.py``).

Families: Llama, Mistral, Qwen2 and Qwen3 (pre-norm, rotary embedding over the whole head, grouped-query
attention, no soft-capping; Qwen3 adds per-head query/key RMS norms) and GPT-2 (learned positions, fused
QKV projection). Every other model runs transformers' forward (``models.py``), and so does one with a
module hook anywhere in it, forward or backward, or with a global module hook set (:func:`hooked`: this
forward would skip them), or with accelerate's hooks on any module (a model dispatched over devices: its
attention inputs would not follow its layers).
"""

from __future__ import annotations

import operator
import sys

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
        ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "num_key_value_groups", "scaling",
         "attention_dropout"),
    ),
    "gpt2": ("transformer", ("wte", "wpe", "drop", "ln_f"), "h", ("ln_1", "ln_2", "mlp"), "attn",
             ("c_attn", "c_proj", "split_size", "head_dim", "scaling", "attn_dropout", "resid_dropout")),
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
    like). :func:`forward` calls every module's ``forward`` (or writes its ops out), not through
    ``nn.Module.__call__``, so their hooks would not run. Looked for at every
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
    inline = _inline(model)
    run = _gpt2 if model.config.model_type == "gpt2" else _llama
    batch = input_ids.shape[0]
    hidden = run(model, inline, input_ids, positions, mask, cache, last_only)  # [batch * (n or 1), H]
    logits = _call(inline, model._modules["lm_head"], hidden)
    return logits.view(batch, -1, logits.shape[-1]), hidden.view(batch, -1, hidden.shape[-1])


def _call(inline: dict, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` without ``nn.Module.__call__`` (no hook can be set: :func:`hooked`): the module's
    ``forward``, or for a module of exactly a type in ``inline`` (one whose forward was not replaced on the
    instance), that forward's aten ops written out (``_linear``, ...), without its Python attribute reads."""
    run = inline.get(type(module))
    if run is None or "forward" in module.__dict__:
        return module.forward(x)
    return run(inline, module, x)


def _parameter(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>``, read from ``_parameters`` where nn.Module keeps a parameter (without
    nn.Module.__getattr__'s Python fallback), else as an attribute (a weight held as a buffer, say)."""
    parameters = module._parameters
    return parameters[name] if name in parameters else getattr(module, name)


def _linear(inline, module, x):  # torch.nn.Linear.forward
    return F.linear(x, _parameter(module, "weight"), _parameter(module, "bias"))


def _layer_norm(inline, module, x):  # torch.nn.LayerNorm.forward
    weight, bias = _parameter(module, "weight"), _parameter(module, "bias")
    return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)


def _dropout(inline, module, x):  # torch.nn.Dropout.forward: the input itself outside training
    return F.dropout(x, module.p, True, module.inplace) if module.training else x


def _rms_norm(inline, module, x):  # LlamaRMSNorm.forward (Mistral's, Qwen2's and Qwen3's are the same)
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + module.variance_epsilon)
    return _parameter(module, "weight") * h.to(dtype)


def _gated_mlp(inline, module, x):  # LlamaMLP.forward (Mistral's, Qwen2's and Qwen3's are the same)
    parts = module._modules
    gate = _call(inline, parts["act_fn"], _call(inline, parts["gate_proj"], x))
    return _call(inline, parts["down_proj"], gate * _call(inline, parts["up_proj"], x))


def _conv1d(inline, module, x):  # transformers' Conv1D.forward on a 2-D input: [rows, nf]
    return torch.addmm(_parameter(module, "bias"), x, _parameter(module, "weight"))


def _gpt2_mlp(inline, module, x):  # GPT2MLP.forward
    parts = module._modules
    h = _call(inline, parts["act"], _call(inline, parts["c_fc"], x))
    return _call(inline, parts["dropout"], _call(inline, parts["c_proj"], h))


_TORCH = {torch.nn.Linear: _linear, torch.nn.LayerNorm: _layer_norm, torch.nn.Dropout: _dropout}
# the family modules written out, by the name of their class in the model's modelling module
_WRITTEN_OUT = {
    "llama": {"LlamaRMSNorm": _rms_norm, "LlamaMLP": _gated_mlp},
    "mistral": {"MistralRMSNorm": _rms_norm, "MistralMLP": _gated_mlp},
    "qwen2": {"Qwen2RMSNorm": _rms_norm, "Qwen2MLP": _gated_mlp},
    "qwen3": {"Qwen3RMSNorm": _rms_norm, "Qwen3MLP": _gated_mlp},
    "gpt2": {"Conv1D": _conv1d, "GPT2MLP": _gpt2_mlp},
}
# a model's class -> (the torch and family classes its forward may write out, their `forward`s when looked at,
# the classes written out: {class: writer})
_FAMILIES: dict[type, tuple[tuple[type, ...], tuple, dict]] = {}
_FORWARD = operator.attrgetter("forward")


def _inline(model: torch.nn.Module) -> dict:
    """The module types :func:`_call` writes out in ``model``'s forward: torch's and the family classes of
    ``model``'s modelling module whose ``forward`` is their own (not replaced on the class, as a kernel hub's
    layer replacement may do). Looked up once per model class and again whenever one of those classes'
    ``forward`` is another function than when looked at (patched, or put back, between forwards)."""
    held = _FAMILIES.get(type(model))
    if held is not None and tuple(map(_FORWARD, held[0])) == held[1]:
        return held[2]
    source = sys.modules.get(type(model).__module__)
    writers = dict(_TORCH)
    for name, run in _WRITTEN_OUT[model.config.model_type].items():
        cls = getattr(source, name, None)
        if isinstance(cls, type):
            writers[cls] = run
    classes = tuple(writers)
    inline = {
        cls: run for cls, run in writers.items() if cls.forward.__qualname__ == f"{cls.__name__}.forward"
    }
    _FAMILIES[type(model)] = (classes, tuple(map(_FORWARD, classes)), inline)
    return inline


def _attend(attention, q, k, v, mask, cache, index: int, scale: float, dropout: float) -> torch.Tensor:
    """Write k, v [batch, kv_heads, n, head_dim] at the forward's slots and attend with q [batch, n, heads,
    head_dim] (by token, as projected): [batch * n, heads * head_dim].

    Grouped-query attention folds each key/value head's query heads into the query axis
    (``[batch, kv_heads, groups * n, head_dim]``, ``mask`` folded alike by :func:`_fold`) instead of
    repeating the cached keys and values per query head: no copy of the cache per layer and forward. One
    token's queries are already heads-major: a view, without the transpose."""
    keys, values = cache.update(k, v, index)
    batch, n, heads, _ = q.shape
    kv_heads = keys.shape[1]
    if n == 1:
        q = q.view(batch, kv_heads, heads // kv_heads, q.shape[-1])
    else:
        q = q.transpose(1, 2).reshape(batch, kv_heads, heads // kv_heads * n, q.shape[-1])
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, dropout_p=dropout if attention.training else 0.0, scale=scale
    )
    if n == 1:  # [batch, kv_heads, groups, head_dim] is already heads-major: one view
        return out.reshape(batch, -1)
    # A reshape, not a view: CUDA's attention kernels may return [.., groups * n, ..] laid out so that no
    # view splits it (the CPU's are contiguous), and a view then fails.
    return out.reshape(batch, heads, n, out.shape[-1]).transpose(1, 2).reshape(batch * n, -1)


def _fold(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """``mask`` [batch, 1, n, slots] for queries folded ``groups`` to a key/value head: [batch, 1, groups * n,
    slots], query head ``g``'s rows at ``g * n .. g * n + n - 1`` (a view when ``n`` is 1)."""
    if groups == 1:
        return mask
    batch, _, n, slots = mask.shape
    if n == 1:
        return mask.expand(batch, 1, groups, slots)
    return mask[:, :, None].expand(batch, 1, groups, n, slots).reshape(batch, 1, groups * n, slots)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` with ``sin`` given sign-folded (:func:`_llama`):
    ``rotate_half(x) * sin`` is ``cat(-x2, x1) * sin``, which is ``roll(x, half) * cat(-sin1, sin2)`` bit for
    bit (a sign flip is exact and commutes with rounding), in 2 ops instead of 5."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def _rotation(rotary, x, positions, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin (:func:`_rotate`) at ``positions`` [batch, n]: [batch, n, 1, head_dim] each, over
    heads. Two ops, looked up in the request's table (:func:`_table`) where the rotary embedding has one;
    else the module's forward, the fold and the views (16 ops on a half-precision model)."""
    table = _table(rotary, x, cache)
    if table is None:
        cos, sin = _folded(*rotary.forward(x, positions))
        return cos.unsqueeze(2), sin.unsqueeze(2)
    return table[positions].unbind(2)


def _folded(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary module's cos and sin [..., head_dim], with ``sin``'s first half negated (:func:`_rotate`)."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)


# Rotary types whose frequencies change with the positions of a forward (transformers' `dynamic_rope_update`):
# their module runs at every forward
_ADAPTIVE = ("dynamic", "longrope")


def _table(rotary: torch.nn.Module, x: torch.Tensor, cache) -> torch.Tensor | None:
    """The rotary module's cos and sign-folded sin at every slot's position: [max_slots, 2, 1, head_dim], the
    module's own forward over positions 0 .. max_slots - 1 in ``x``'s dtype and on its device, so that a
    lookup is bit for bit what the forward gives for those positions (every value is computed per position,
    elementwise); kept on the request's ``cache`` (positions are below its ``max_slots``: ``slot - start``).

    None (the module runs at every forward) for a rotary type whose frequencies change with the positions
    of a forward (dynamic, long RoPE), a type this forward does not know, or a ``forward`` not the class's
    own. The table is made again when what its values come from changed: the module, its class's
    ``forward``, its ``inv_freq`` buffer (another tensor after a cast or a move, or written in place), its
    ``attention_scaling``, or ``x``'s dtype or device (a model cast or moved between requests)."""
    kind = rotary.__dict__.get("rope_type")
    run = type(rotary).forward
    if (
        not isinstance(kind, str)
        or any(adaptive in kind for adaptive in _ADAPTIVE)
        or "forward" in rotary.__dict__
        or run.__qualname__ != f"{type(rotary).__name__}.forward"
    ):
        return None
    inv_freq = rotary._buffers.get("inv_freq")
    key = (id(rotary), id(run), id(inv_freq), getattr(inv_freq, "_version", None))
    key += (rotary.__dict__.get("attention_scaling"), x.dtype, x.device)
    held = cache.rotation
    if held is not None and held[0] == key:
        return held[2]
    # Outside inference mode (a table kept for later requests, or read by a pass that learns, must be a
    # normal tensor) and autograd (a constant)
    with torch.inference_mode(False), torch.no_grad():
        positions = torch.arange(cache.max_slots, device=x.device)[None]  # [1, max_slots]
        cos, sin = _folded(*rotary.forward(x, positions))  # [1, max_slots, head_dim] each
        table = torch.stack((cos[0], sin[0]), 1).unsqueeze(2)  # [max_slots, 2, 1, head_dim]
    cache.rotation = (key, (rotary, run, inv_freq), table)  # the objects whose ids the key holds, kept alive
    return table


def _llama(model, inline, input_ids, positions, mask, cache, last_only) -> torch.Tensor:
    # Hidden states stay 2-D ([batch * n, H]: a 2-D linear is t + mm, a 3-D one adds two views), viewed 4-D
    # for attention only. Submodules are read from each module's `_modules` (what `module.name` returns for
    # them, without nn.Module.__getattr__'s Python fallback: ~1 us an access, ~15 a layer)
    decoder = model._modules["model"]
    parts = decoder._modules
    batch, n = input_ids.shape
    x = _call(inline, parts["embed_tokens"], input_ids).view(batch * n, -1)
    cos, sin = _rotation(parts["rotary_emb"], x, positions, cache)  # [batch, n, 1, head_dim]: over heads
    head_norms = model.config.model_type == "qwen3"  # queries and keys RMS-normed per head before rotation
    folded: dict[tuple[int, int], torch.Tensor] = {}  # (id(mask), groups) -> the mask folded once
    for index, layer in enumerate(parts["layers"]):
        modules = layer._modules
        attention = modules["self_attn"]
        projections = attention._modules
        h = _call(inline, modules["input_layernorm"], x)
        shape = (batch, n, -1, attention.head_dim)
        q = _call(inline, projections["q_proj"], h).view(shape)
        k = _call(inline, projections["k_proj"], h).view(shape)
        if head_norms:
            q, k = _call(inline, projections["q_norm"], q), _call(inline, projections["k_norm"], k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin).transpose(1, 2)  # q: _attend lays it out
        v = _call(inline, projections["v_proj"], h).view(shape).transpose(1, 2)
        layer_mask = mask[index] if isinstance(mask, list) else mask
        groups = attention.num_key_value_groups
        key = (id(layer_mask), groups)
        if key not in folded:
            folded[key] = _fold(layer_mask, groups)
        out = _attend(
            attention, q, k, v, folded[key], cache, index, attention.scaling, attention.attention_dropout
        )
        x = x + _call(inline, projections["o_proj"], out)
        x = x + _call(inline, modules["mlp"], _call(inline, modules["post_attention_layernorm"], x))
    return _call(inline, parts["norm"], x[n - 1 :: n] if last_only and n > 1 else x)


def _gpt2(model, inline, input_ids, positions, mask, cache, last_only) -> torch.Tensor:
    decoder = model._modules["transformer"]
    parts = decoder._modules
    batch, n = input_ids.shape
    x = _call(inline, parts["wte"], input_ids) + _call(inline, parts["wpe"], positions)
    x = _call(inline, parts["drop"], x.view(batch * n, -1))
    for index, block in enumerate(parts["h"]):
        modules = block._modules
        attention = modules["attn"]
        projections = attention._modules
        shape = (batch, n, -1, attention.head_dim)
        qkv = _call(inline, projections["c_attn"], _call(inline, modules["ln_1"], x))
        q, k, v = (t.view(shape) for t in qkv.split(attention.split_size, dim=1))
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # q: _attend lays it out
        out = _attend(
            attention, q, k, v, mask, cache, index, attention.scaling, projections["attn_dropout"].p
        )
        x = x + _call(inline, projections["resid_dropout"], _call(inline, projections["c_proj"], out))
        x = x + _call(inline, modules["mlp"], _call(inline, modules["ln_2"], x))
    return _call(inline, parts["ln_f"], x[n - 1 :: n] if last_only and n > 1 else x)
