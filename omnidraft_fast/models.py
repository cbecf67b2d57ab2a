"""Hugging Face causal LMs behind one contract: "run these tokens at these cache slots".

The engine never lets transformers decide where keys and values go. Each model
gets a :class:`SlotKVCache`, a static cache of ``max_slots`` positions per row
that writes new keys/values at explicit per-row *slots* (``scatter_`` along the
sequence axis). A row's sequence lives in slots ``start[b] .. len[b]-1``; left
padding sits below ``start[b]``. Rolling back a rejected draft is therefore
free for every batch size: the engine just writes the next tokens at lower
slots, and the attention mask built here hides every slot above the query.

Slot layout of one row (``.`` = left padding, ``d`` = the dummy slot 0 that
every row has so that "the two tokens before the pending one" always exist)::

    slot:   0   1   2   3   4   5   6   7 ...
           d   .   .   t0  t1  t2  t3  ...       start[b] = 3, positions 0,1,2,3,...

Position ids are ``slot - start[b]`` (so padding and the dummy never shift
positions), clamped to the model's position limit: a clamped position can only
belong to a drafted token that is never committed (see ``SpeculativeEngine``).

The mask is a ready 4-D additive float mask ``[batch, 1, n, max_slots]``, which
transformers' mask builders return unchanged (``_preprocess_mask_arguments``'s
early exit, present in 5.17 through 5.2x). A query always sees its own slot, so
no row of the mask is fully masked (padding queries produce finite garbage that
is never read).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers.cache_utils import Cache

from . import lean as _lean

__all__ = ["LOAD_OPTIONS", "CausalLM", "SlotKVCache", "head_inputs"]

# What the project's own loads (the zoo, the CLI) pass to `from_pretrained`: transformers' own layers. From
# 5.25 its loader swaps some for kernels fetched from the Hub by default, which needs a network (and the
# `kernels` package) and is not what the engine was checked against.
LOAD_OPTIONS = {"use_kernels": False}


@contextmanager
def head_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what ``model``'s language-modelling head is fed (its last hidden states, ``[batch, n, H]``)
    during the forwards this thread runs inside (another thread's, e.g. the caller's own
    ``drafter.generate()``, are not the engine's)."""
    captured: list[torch.Tensor] = []
    thread = threading.get_ident()

    def collect(_module, args, _out):
        if threading.get_ident() == thread:
            captured.append(args[0])

    handle = model.get_output_embeddings().register_forward_hook(collect)
    try:
        yield captured
    finally:
        handle.remove()


class SlotKVCache(Cache):
    """Static KV cache written at explicit per-row slots.

    Implements the part of transformers' ``Cache`` interface that decoder-only
    models call during ``forward`` (``update``, ``get_seq_length``). Buffers are
    allocated on the first ``update`` from the shapes the model hands in, so
    the cache needs no knowledge of the architecture (GQA, head_dim, MQA).
    """

    is_compileable = True

    def __init__(self, max_slots: int):
        super().__init__(layers=[])
        self.max_slots = max_slots
        self.keys: list[torch.Tensor] = []  # per layer: [batch, kv_heads, max_slots, head_dim]
        self.values: list[torch.Tensor] = []
        self.write_slots: torch.Tensor | None = None  # [batch, n]: where this forward writes
        self.read_only = False  # True: a forward sees its keys/values at write_slots but writes nothing
        self._indexed: torch.Tensor | None = None  # the write_slots that _indices expand
        self._indices: dict[tuple[int, int], torch.Tensor] = {}
        # Per request (CausalLM.begin), in place: what every forward's mask starts from, read by captured stages
        self.slot_ids: torch.Tensor | None = None  # [max_slots] 0 .. max_slots - 1
        self.from_start: torch.Tensor | None = None  # [batch, 1, 1, max_slots] slot >= the row's start
        # ([], []) the additive mask's values where a slot is visible (0) and where not (the lowest), in the
        # model's dtype
        self.mask_values: tuple[torch.Tensor, torch.Tensor] | None = None
        # The lean forward's rotary cos/sin by position, made at its first forward (lean._table): (what it
        # was made from, those objects, [max_slots, 2, 1, head_dim])
        self.rotation: tuple[tuple, tuple, torch.Tensor] | None = None

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):
        # transformers <= 5.23 passes `cache_kwargs`, 5.24 `kwargs=`; neither carries anything needed here.
        # key_states, value_states: [batch, kv_heads, n, head_dim]
        if layer_idx == len(self.keys):
            shape = (*key_states.shape[:2], self.max_slots, key_states.shape[-1])
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros((*shape[:3], value_states.shape[-1])))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        key_slots, value_slots = self._index(keys), self._index(values)
        if self.read_only:  # the cache as it is, plus this forward's keys/values, in copies
            return keys.scatter(2, key_slots, key_states), values.scatter(2, value_slots, value_states)
        keys.scatter_(2, key_slots, key_states)
        values.scatter_(2, value_slots, value_states)
        return keys, values

    def _index(self, buffer: torch.Tensor) -> torch.Tensor:
        """``write_slots`` expanded over ``buffer``'s heads and head dim (the scatter index), made once per
        forward and shape (every layer's keys and values of one shape share it)."""
        if self._indexed is not self.write_slots:
            self._indexed, self._indices = self.write_slots, {}
        shape = (buffer.shape[1], buffer.shape[3])
        index = self._indices.get(shape)
        if index is None:
            index = self._indices[shape] = self.write_slots[:, None, :, None].expand(
                -1, shape[0], -1, shape[1]
            )
        return index

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only consulted by models when position_ids are not passed; the runner always passes them.
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_slots

    def __len__(self) -> int:
        return len(self.keys)


def _first_parameter(module: torch.nn.Module) -> torch.nn.Parameter:
    """``next(module.parameters())``, read where the model holds it now (after ``.to()``, a cast or a
    parameter rebound, as ``parameters()`` would): the first parameter of the first module, in
    ``named_modules``' order, that has one, without ``parameters()``' generators (5 us a call, read a few
    times per request)."""
    stack = [module]
    while stack:
        current = stack.pop()
        for parameter in current._parameters.values():
            if parameter is not None:
                return parameter
        stack.extend(child for child in reversed(current._modules.values()) if child is not None)
    raise StopIteration  # as next() over no parameters


def _position_limit(config) -> int | None:
    for name in (
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
        "max_seq_len",
    ):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# Layer kinds whose state is keys and values, written by cache slot (anything else: a recurrent or convolution
# state that a rollback cannot rewind).
_ATTENTION_KINDS = {"full_attention", "sliding_attention", "chunked_attention"}


def _unsupported(model, config) -> str | None:
    """Why ``model`` cannot run at explicit cache slots, or None."""
    kinds = set(getattr(config, "layer_types", None) or ()) - _ATTENTION_KINDS
    if getattr(model, "_is_stateful", False) or kinds:
        what = f"layers of type {sorted(kinds)}" if kinds else "a recurrent (state-space) state"
        return (
            f"it keeps {what} besides keys and values, which a rejected draft cannot be rolled back out of "
            "(only attention models are supported)"
        )
    if config.model_type == "bloom" or (config.model_type == "falcon" and getattr(config, "alibi", False)):
        return "its ALiBi bias is built from a 2-D attention mask, and the engine passes a 4-D slot mask"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if any(_bidirectional(module) for module in decoder.modules()):
        return (
            "its self-attention is bidirectional (a BERT-style model whose config has is_decoder=False), "
            "so a token would attend to the drafted tokens after it; load it with is_decoder=True"
        )
    arguments = inspect.signature(model.forward).parameters
    if not {"cache", "past_key_values"} & set(arguments):
        state = " (it keeps a recurrent `state` instead)" if "state" in arguments else ""
        return (
            f"its forward takes no key/value cache (no `past_key_values` argument){state}, which the engine "
            "writes at cache slots"
        )
    if "position_ids" not in arguments and config.model_type != "mpt":  # MPT's ALiBi reads no positions
        return (
            "its forward takes no `position_ids` (it numbers positions from its cache's length), and the "
            "engine's rows run at positions of their own"
        )
    return None


def _bidirectional(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a BERT-style self-attention built to attend both ways (``is_causal``, or in
    older code ``is_decoder``, False: the model's config lacked ``is_decoder=True``)."""
    return type(module).__name__.endswith("SelfAttention") and (
        getattr(module, "is_causal", None) is False or getattr(module, "is_decoder", None) is False
    )


def _width_limit(config, unmasked_window: int | None) -> tuple[int | None, str]:
    """(most cache slots a request may use, why), for models whose attention is right only within a width:
    a sliding window on some layers only that gets no mask of its own (``unmasked_window``), chunked
    attention, and attention with buffers sized and indexed by the key length (GPT-Neo, MPT)."""
    limits = []
    if unmasked_window is not None:
        limits.append(
            (unmasked_window, f"mixes sliding-window (window {unmasked_window}) and full attention layers")
        )
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and "chunked_attention" in (getattr(config, "layer_types", None) or ()):
        limits.append((int(chunk), f"has chunked attention layers (chunks of {chunk})"))
    if config.model_type == "gpt_neo":
        if "local" in getattr(config, "attention_layers", ()):
            limits.append((config.window_size, f"has local attention layers (window {config.window_size})"))
        limits.append(
            (config.max_position_embeddings, "sizes its causal-mask buffer by max_position_embeddings")
        )
    if config.model_type == "mpt":
        limits.append((config.max_seq_len, "sizes its ALiBi buffer by max_seq_len"))
    if not limits:
        return None, ""
    return min(limits, key=lambda item: item[0])


def _takes_layer_masks(model) -> bool:
    """Whether the model's decoder takes transformers' per-layer-type mask mapping as its attention mask
    (``{"full_attention": ..., "sliding_attention": ...}``, as ``generate`` prepares it)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    try:
        source = inspect.getsource(type(decoder).forward)
    except (TypeError, OSError):
        return False
    return "isinstance(causal_mask_mapping := attention_mask, dict)" in source


def _sliding_window(config) -> tuple[int | None, bool]:
    """(window, every_layer): the sliding-attention window, and whether every layer uses it."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None, False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return int(window), True
    if "sliding_attention" not in layer_types:
        return None, False
    return int(window), all(kind == "sliding_attention" for kind in layer_types)


class CausalLM:
    """A Hugging Face causal LM run at explicit cache slots.

    Args:
        model: a decoder-only ``PreTrainedModel`` with a language-modelling head.
        name: how error messages call it (``"model"`` or ``"drafter"``).
        lean: run the model through ``lean.py``'s forward where it supports the model.
    """

    def __init__(self, model: torch.nn.Module, name: str, lean: bool = True):
        config = getattr(model, "config", None)
        if config is None or not callable(getattr(model, "forward", None)):
            raise TypeError(
                f"`{name}` must be a Hugging Face causal LM (a PreTrainedModel), got {type(model).__name__}"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"`{name}` is an encoder-decoder model ({type(model).__name__}); omnidraft_fast drafts and verifies "
                "decoder-only causal LMs only. Use a *ForCausalLM model."
            )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise TypeError(
                f"`{name}` ({type(model).__name__}) has no language-modelling head; load it with "
                "AutoModelForCausalLM."
            )
        # A multimodal model's language settings (layer types, windows, positions) are in its text config.
        config = config.get_text_config(decoder=True)
        reason = _unsupported(model, config)
        if reason is not None:
            raise ValueError(
                f"`{name}` ({type(model).__name__}) is not supported by omnidraft_fast: {reason}"
            )
        self.model = model
        self.name = name
        self.vocab_size = int(head.weight.shape[0])
        self.position_limit = _position_limit(config)
        window, every_layer = _sliding_window(config)
        # A window used by every layer goes into the mask. A window used by some layers only gets a mask of
        # its own, passed in transformers' mask mapping where the model takes one (else such a model serves
        # within its window only, where both masks agree).
        self.sliding_window = window if every_layer else None
        some_layers = window if window is not None and not every_layer else None
        mixed = some_layers is not None and _takes_layer_masks(model)
        self.layer_window = some_layers if mixed else None
        self.layer_types = tuple(config.layer_types) if mixed else ()
        # The most cache slots a request may use (None: any), and why.
        self.width_limit, self._width_reason = _width_limit(config, None if mixed else some_layers)
        # Long RoPE switches every position's frequencies once a forward reaches past this position: a forward
        # that straddles it rotates the positions below with the long factors, so the output depends on how
        # positions are split into forwards (and Phi3ForCausalLM.prepare_inputs_for_generation then recomputes
        # the whole cache).
        rope = getattr(config, "rope_parameters", None) or {}
        self.rope_switch = (
            rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None
        )
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns until 5.40)
        self._cache_argument = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        self.cache: SlotKVCache | None = None
        self.start: torch.Tensor | None = None  # [batch] first slot of each row's sequence
        self.lean = lean and _lean.supports(model)  # Llama family: the lean forward on its modules

    def current_vocab_size(self) -> int:
        """The vocabulary size of the model as it is now (``resize_token_embeddings`` changes it)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return _first_parameter(self.model).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_parameter(self.model).dtype

    @property
    def weights(self) -> tuple:
        """Where every parameter's and buffer's values are now (storage addresses, in module order) and in
        which dtype: another tuple after a cast, a move, a parameter or buffer rebound or its ``.data``
        swapped, a module replaced, or weights loaded with ``load_state_dict(..., assign=True)``; the same
        after in-place updates (captured stages read each tensor where it was at capture). A walk of the
        module tree, read once per request with ``cuda_graphs`` (0.3-0.4 ms thread time for a 32-layer Llama
        on a loaded 2-core CPU, in flat comprehensions: a generator per module took 2.5 times as long)."""
        modules, i = [self.model], 0
        while i < len(modules):  # breadth first; a child may be None
            if modules[i] is not None:
                modules.extend(modules[i]._modules.values())
            i += 1
        addresses = [
            tensor.data_ptr()
            for module in modules
            if module is not None
            for tensors in (module._parameters, module._buffers)
            for tensor in tensors.values()
            if tensor is not None
        ]
        return self.dtype, tuple(addresses)

    def mask_bytes(self, queries: int, slots: int) -> int:
        """Bytes of the additive attention mask one row of a forward of ``queries`` tokens over a cache of
        ``slots`` builds (``_additive``: the model's dtype)."""
        return queries * slots * self.dtype.itemsize

    def check_width(self, max_slots: int) -> None:
        if self.width_limit is not None and max_slots > self.width_limit:
            raise ValueError(
                f"`{self.name}` {self._width_reason}, and this request needs {max_slots} cache slots (prompt, "
                f"new tokens, one slot and the draft's overrun); such models are supported within "
                f"{self.width_limit} slots only. "
                "Shorten the prompt or max_new_tokens."
            )

    def check_rope_switch(self, longest_prompt: int, max_new_tokens: int) -> None:
        """Refuse a request whose positions cross the long-RoPE switch (:attr:`rope_switch`)."""
        switch = self.rope_switch
        if switch is not None and longest_prompt <= switch < longest_prompt + max_new_tokens:
            raise ValueError(
                f"`{self.name}`'s long RoPE switches to its long factors past position {switch} "
                "(original_max_position_embeddings), and a forward that reaches past it rotates every position "
                "it holds with them (Phi-3 then recomputes the whole cache), so the output depends on how a "
                "request is cut into forwards; this request "
                f"crosses it ({longest_prompt}-token prompt + {max_new_tokens} new tokens), which omnidraft_fast "
                "does not reproduce. Keep the request within the switch, or start past it."
            )

    def begin(self, start: torch.Tensor, max_slots: int, cache: SlotKVCache | None = None) -> None:
        """Start a request: an empty cache of ``max_slots`` slots, or ``cache`` (an earlier request's, whose
        buffers captured stages read) zeroed in place; ``start`` [batch] per-row first slot."""
        if cache is None:
            cache = SlotKVCache(max_slots)
        elif cache.max_slots != max_slots:
            raise ValueError(f"a kept cache of {cache.max_slots} slots cannot serve {max_slots}")
        else:
            for buffer in (*cache.keys, *cache.values):
                buffer.zero_()
        dtype = self.dtype  # the mask's: read once, a parameter lookup per forward costs
        from_start = cache.slot_ids is not None and cache.from_start.shape[0] == start.shape[0]
        if from_start and cache.slot_ids.device == start.device:  # a kept cache: its tensors, rewritten
            torch.ge(cache.slot_ids, start.view(-1, 1, 1, 1), out=cache.from_start)
        else:
            cache.slot_ids = torch.arange(max_slots, device=start.device)
            cache.from_start = cache.slot_ids >= start.view(-1, 1, 1, 1)
        values = cache.mask_values
        if values is None or values[0].dtype != dtype or values[0].device != start.device:
            options = {"dtype": dtype, "device": start.device}
            cache.mask_values = (
                torch.tensor(0.0, **options),
                torch.tensor(torch.finfo(dtype).min, **options),
            )
        self.cache = cache
        self.start = start
        # A module hook (lean.hooked) selects transformers' forward for the request: looked for once here,
        # a walk over every module being too slow for each forward
        self._lean_now = self.lean and not _lean.hooked(self.model)

    def end(self) -> None:
        """Release the request's cache."""
        self.cache = None
        self.start = None

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, slots: torch.Tensor, last_only: bool = False, hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run ``input_ids`` [batch, n] written at ``slots`` [batch, n]; returns logits [batch, n or 1, vocab],
        and with ``hidden`` also the last hidden states the logits came from [batch, n or 1, H].

        Every slot at or below a query's slot and at or above its row's ``start``
        is attended to; writing at a lower slot than before is a rollback.
        """
        return self._run(input_ids, slots, last_only, hidden)

    def score(self, input_ids: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward` with ``hidden``, but under the caller's grad mode and without writing the
        cache: the tokens attend to the cached slots below them as they are (constants to autograd) and
        to each other. Online learning's teacher-forced pass inside a request (``learner.py``): it costs
        ``n`` tokens, not the whole context."""
        self.cache.read_only = True
        try:
            return self._run(input_ids, slots, last_only=False, hidden=True)
        finally:
            self.cache.read_only = False

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """The additive attention mask (the model's dtype) of a boolean one, in one op."""
        return torch.where(visible, *self.cache.mask_values)

    def _run(self, input_ids, slots, last_only, hidden):
        cache, start = self.cache, self.start
        positions = slots - start[:, None]
        if self.position_limit is not None:
            positions = positions.clamp(0, self.position_limit - 1)
        else:
            positions = positions.clamp_min(0)
        keys = cache.slot_ids  # [max_slots]
        q = slots.reshape(slots.shape[0], 1, slots.shape[1], 1)  # [batch, 1, n, 1] (one view op, not two)
        visible = cache.from_start & (keys <= q)  # from_start: keys >= start[:, None, None, None]
        if self.sliding_window is not None:
            visible &= keys > q - self.sliding_window
        itself = keys == q  # a padding row's query sees at least its own slot (no all-masked row)
        mask = self._additive(visible | itself)  # [batch, 1, n, max_slots]
        if self.layer_window is not None:
            sliding = self._additive((visible & (keys > q - self.layer_window)) | itself)
            mask = {"full_attention": mask, "sliding_attention": sliding}
        cache.write_slots = slots
        if self._lean_now:
            per_layer = [mask[kind] for kind in self.layer_types] if self.layer_types else mask
            logits, states = _lean.forward(self.model, input_ids, positions, per_layer, cache, last_only)
            return (logits, states) if hidden else logits
        with head_inputs(self.model) if hidden else nullcontext() as captured:
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=mask,
                use_cache=True,
                **{self._cache_argument: cache},
                logits_to_keep=1 if last_only else 0,
            )
        return (out.logits, captured[-1]) if hidden else out.logits
