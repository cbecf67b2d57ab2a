"""Saving and restoring what an engine learned, as one safetensors file written atomically.

It holds the n-gram table (with the vocabulary bridge it belongs to, so a state is never loaded into an
engine for another tokenizer pair), the drafter's LoRA adapter (``adapter.`` + peft's own key names), the
acceptance head (``head.``) and their optimisers' step counts and moments (``optimizer.adapter.``,
``optimizer.head.``), each when the engine has one: a restored engine serves and goes on learning from
the saved weights, table and moments. (A state saved without optimiser moments restores with fresh ones.)
A state loads into an engine built with the configuration it was saved with: one that holds a part the engine
lacks, lacks a part it has, does not fit it, or is damaged (non-finite values, n-gram entries outside the
vocabularies) is refused whole, the engine unchanged; so is a load cut short (Ctrl-C): what it wrote is put
back. With ``strict=False`` (as ``torch.nn.Module.load_state_dict`` takes it) the parts the two have in
common load, the engine's others stay as they are and the file's others are not read; which ones, the
returned :class:`StateParts` says (a state saved without learning gives a learning engine its n-gram
table). A part both have must still fit, and the tokenizer pair must be the same.
The file is created with the permissions ``open()`` would give it.
The file's metadata records the adapter's scale (``lora_alpha / rank``), without which its tensors do not
say what the drafter served: an engine with another scale refuses the state.
Not saved: the rows waiting for the learners' next step (fewer than ``interval``) and the acceptance
head's replay of recent rows (``AdaptiveConfig.replay``; the target's logits at every token of up to that
many rows, which would make the file as large as the learner's memory): the restored learners fill both
afresh from the requests they serve, so their next steps differ from those the saved engine would have
taken.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .optim import AdamW

if TYPE_CHECKING:
    from .engine import SpeculativeEngine

__all__ = ["StateParts", "load_state", "save_state"]

FORMAT = "omnidraft_fast.state/1"


class StateParts(NamedTuple):
    """What :func:`load_state` left out, by part (``"ngram"``, ``"adapter"``, ``"head"``): both empty
    unless ``strict=False``."""

    missing: list[str]  # the engine's parts the file does not hold: they stay as they were
    unexpected: list[str]  # the file's parts the engine does not have: not read


def _check_path(path) -> None:
    """``path`` names a file (a str or an ``os.PathLike``), or a TypeError names it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`path` must be a file name (a str or a pathlib.Path), got {type(path).__name__}: "
            "e.g. engine.save_state('state.safetensors')"
        )


def save_state(engine: SpeculativeEngine, path: str | Path) -> None:
    """Write the engine's learned state to ``path`` (a ``.safetensors`` file), atomically."""
    _check_path(path)
    if Path(path).is_dir():
        raise IsADirectoryError(
            f"`path` {str(path)!r} is a folder: give a file name, e.g. {str(Path(path) / 'state.safetensors')!r}"
        )
    tensors: dict[str, torch.Tensor] = {}
    if engine.bridge is not None:
        tensors.update({f"bridge.{name}": getattr(engine.bridge, name) for name in engine.bridge._TENSORS})
    if engine.ngram is not None:
        tensors.update({f"ngram.{name}": tensor for name, tensor in engine.ngram.state_dict().items()})
    learner = engine.learner
    if learner is not None and learner.adapter is not None:
        tensors.update({f"adapter.{name}": tensor for name, tensor in learner.adapter.state_dict().items()})
    if learner is not None and learner.head is not None:
        tensors.update({f"head.{name}": tensor for name, tensor in learner.head.state_dict().items()})
    for prefix, optimizer in _optimizers(learner):
        tensors.update({f"{prefix}{name}": tensor for name, tensor in optimizer.state_dict().items()})
    metadata = {"format": FORMAT}
    if learner is not None and learner.adapter is not None:  # its tensors mean what they did at this scale
        metadata["adapter.scaling"] = repr(learner.adapter.scaling)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, with the permissions open() gives a new file (0o666 less the umask, which
    # can only be read by setting it: a race with other threads' files); safetensors writes 0o600.
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(temporary).st_mode
        save_file(tensors, str(temporary), metadata=metadata)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_state(engine: SpeculativeEngine, path: str | Path, strict: bool = True) -> StateParts:
    """Restore a state written by :func:`save_state` into an engine built for the same model pair. Every
    part is checked to fit before any is written: a state that does not fit leaves the engine as it was.
    ``strict=False``: load the parts the file and the engine have in common (module docstring)."""
    _check_path(path)
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be True or False, got {strict!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"`path` {str(path)!r} is not a file: give the file save_state wrote")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except SafetensorError as error:
        raise ValueError(
            f"`path` {str(path)!r} is not a safetensors file ({error}): give the file save_state wrote"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"`path` {str(path)!r} holds no engine state (format {metadata.get('format')!r}, expected {FORMAT!r}): "
            "give the file save_state wrote"
        )
    tensors = load_file(str(path), device=str(engine.device))

    def saved(prefix: str) -> dict[str, torch.Tensor]:
        return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}

    bridge = saved("bridge.")
    if (engine.bridge is None) != (not bridge) or (
        engine.bridge is not None
        and not all(torch.equal(getattr(engine.bridge, name), tensor) for name, tensor in bridge.items())
    ):
        raise ValueError(
            f"{path} was saved by an engine for another tokenizer pair; build the matching engine first"
        )
    learner = engine.learner
    adapter = learner.adapter if learner is not None else None
    scale = metadata.get("adapter.scaling")  # absent from states saved before it was recorded
    if scale is not None:
        try:
            scale = float(scale)
        except ValueError:
            raise ValueError(
                f"{path}: its metadata `adapter.scaling` is {scale!r}, not a number: the file is damaged; give the "
                "file save_state wrote"
            ) from None
    if scale is not None and adapter is not None and scale != adapter.scaling:
        raise ValueError(
            f"{path}: its LoRA adapter was trained at scale lora_alpha / rank = {scale}, this engine's is "
            f"{adapter.scaling!r}; build the engine with the DistillConfig it was saved with"
        )
    # (key prefix, the engine's part or None, what it is, what a part that does not fit differs in)
    parts = [
        ("ngram.", engine.ngram, "n-gram table (translation='omnidraft' or 'exact')", "ngram_capacity, ngram_max_len"),
        ("adapter.", adapter, "LoRA adapter (EngineConfig.distill)", "rank or target modules"),
        ("head.", learner.head if learner is not None else None, "acceptance head (EngineConfig.adaptive)",
         "head size"),
    ]  # fmt: skip
    # The optimisers' moments follow their parameters (absent from states that were saved without them).
    parts += [
        (prefix, optimizer, f"{prefix.removesuffix('.')} state", "rank, target modules or head size")
        for prefix, optimizer in _optimizers(learner)
    ]
    loads = []
    missing, unexpected = [], []
    for prefix, part, what, _ in parts[:3]:  # the table, the adapter, the head
        name = prefix.removesuffix(".")
        if part is not None and not saved(prefix):
            if not strict:
                missing.append(name)
                continue
            raise ValueError(
                f"{path} holds no {what} but this engine has one (the state was saved by an engine built with "
                "another configuration); build the engine with the configuration it was saved with, or load "
                "the parts the two have with strict=False"
            )
        if part is None and saved(prefix):
            if not strict:
                unexpected.append(name)
                continue
            raise ValueError(
                f"{path} holds a {what} but this engine has none; build it with one, or load the parts the two "
                "have with strict=False"
            )
    fresh = []  # optimisers whose parameters are loaded without their moments: they restart (module docstring)
    for prefix, part, what, differs in parts:
        state = saved(prefix)
        owner = prefix.removeprefix("optimizer.").removesuffix(".")  # the part an optimiser's moments follow
        if owner in missing or owner in unexpected:
            continue  # an optimiser whose parameters are not loaded keeps its moments
        if not state:
            if part is not None and prefix.startswith("optimizer."):
                fresh.append(part)
            continue
        if part is None:  # moments whose part neither the file nor the engine holds: a damaged file
            raise ValueError(f"{path} holds a {what} but this engine has none; build it with one")
        ours = part.state_dict()
        if set(state) != set(ours) or any(state[name].shape != ours[name].shape for name in ours):
            raise ValueError(
                f"{path}: its {what} does not fit this engine's (another {differs}); build the engine with "
                "the configuration it was saved with"
            )
        bad = [
            name
            for name, tensor in state.items()
            if tensor.is_floating_point() and not tensor.isfinite().all()
        ]
        if bad:
            raise ValueError(f"{path}: its {what} holds NaN or inf values (in {bad[0]}): the file is damaged")
        loads.append((part, state))
    if engine.ngram is not None and saved("ngram."):
        _check_table(saved("ngram."), engine, path)
    # Written part by part: an exception in the middle (a Ctrl-C) puts back what was written, so that the
    # engine never serves an adapter with another state's moments, or a table without its hashes.
    writes = loads + [(optimizer, {name: torch.zeros_like(t) for name, t in optimizer.state_dict().items()})
                      for optimizer in fresh]  # fmt: skip
    backup = [
        (part, {name: t.detach().clone() for name, t in part.state_dict().items()}) for part, _ in writes
    ]
    try:
        for part, state in writes:
            part.load_state_dict(state)
    except BaseException:
        for part, state in backup:
            part.load_state_dict(state)
        raise
    return StateParts(missing, unexpected)


def _check_table(table: dict[str, torch.Tensor], engine: SpeculativeEngine, path) -> None:
    """Refuse an n-gram table whose entries are no ids of the two vocabularies (a damaged file): the rounds
    would index the bridge with them."""
    keys, values, counts = table["key_ids"], table["values"], table["counts"]
    used = keys[:, 0] >= 0
    drafter_vocab, target_vocab = engine.bridge.drafter_vocab_size, engine.bridge.target_vocab_size
    if (
        bool((keys < -1).any())
        or bool((keys >= drafter_vocab).any())
        or bool((values[used] < 0).any())
        or bool((values >= target_vocab).any())
        or bool((counts < 0).any())
    ):
        raise ValueError(
            f"{path}: its n-gram table holds ids outside the vocabularies (drafter [0, {drafter_vocab}), target "
            f"[0, {target_vocab})) or negative counts: the file is damaged; give the file save_state wrote"
        )


def _optimizers(learner) -> list[tuple[str, AdamW]]:
    """(key prefix, optimiser) of the learner's adapter and head, those it has."""
    if learner is None:
        return []
    parts = [("optimizer.adapter.", learner.optimizer if learner.adapter is not None else None)]
    parts.append(("optimizer.head.", learner.head_optimizer if learner.head is not None else None))
    return [(prefix, optimizer) for prefix, optimizer in parts if optimizer is not None]
