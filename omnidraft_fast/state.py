"""Saving and restoring what an engine learned, as one safetensors file written atomically.

It holds the n-gram table (with the vocabulary bridge it belongs to, so a state is never loaded into an
engine for another tokenizer pair), the drafter's LoRA adapter (``adapter.`` + peft's own key names), the
acceptance head (``head.``) and their optimisers' step counts and moments (``optimizer.adapter.``,
``optimizer.head.``), each when the engine has one: a restored engine goes on learning as the saved one
would have. (A state saved without optimiser moments restores with fresh ones.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .optim import AdamW

if TYPE_CHECKING:
    from .engine import SpeculativeEngine

__all__ = ["load_state", "save_state"]

FORMAT = "omnidraft_fast.state/1"


def save_state(engine: SpeculativeEngine, path: str | Path) -> None:
    """Write the engine's learned state to ``path`` (a ``.safetensors`` file), atomically."""
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
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": FORMAT})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_state(engine: SpeculativeEngine, path: str | Path) -> None:
    """Restore a state written by :func:`save_state` into an engine built for the same model pair."""
    tensors = load_file(str(path), device=str(engine.device))
    bridge = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith("bridge.")}
    if (engine.bridge is None) != (not bridge) or (
        engine.bridge is not None
        and not all(torch.equal(getattr(engine.bridge, name), tensor) for name, tensor in bridge.items())
    ):
        raise ValueError(
            f"{path} was saved by an engine for another tokenizer pair; build the matching engine first"
        )
    ngram = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith("ngram.")}
    if ngram:
        if engine.ngram is None:
            raise ValueError(f"{path} holds an n-gram table but this engine has none (translation='tli'?)")
        engine.ngram.load_state_dict(ngram)
    learner = engine.learner
    for prefix, part, what in (
        (
            "adapter.",
            learner.adapter if learner is not None else None,
            "a LoRA adapter (EngineConfig.distill)",
        ),
        (
            "head.",
            learner.head if learner is not None else None,
            "an acceptance head (EngineConfig.adaptive)",
        ),
    ):
        saved = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        if saved and part is None:
            raise ValueError(f"{path} holds {what} but this engine has none; build it with that config")
        if saved:
            _load(part, saved, path, what)
    # The optimisers' moments follow their parameters (absent from states that were saved without them).
    for prefix, optimizer in _optimizers(learner):
        saved = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        if saved:
            _load(optimizer, saved, path, f"optimiser state ({prefix.removesuffix('.')})")


def _load(part, saved: dict[str, torch.Tensor], path, what: str) -> None:
    """``part.load_state_dict(saved)`` once the saved tensors are checked to fit it, key for key."""
    ours = part.state_dict()
    if set(saved) != set(ours) or any(saved[name].shape != ours[name].shape for name in ours):
        raise ValueError(
            f"{path}: its {what} does not fit this engine's (another rank, target modules or head size); "
            "build the engine with the configuration it was saved with"
        )
    part.load_state_dict(saved)


def _optimizers(learner) -> list[tuple[str, AdamW]]:
    """(key prefix, optimiser) of the learner's adapter and head, those it has."""
    if learner is None:
        return []
    parts = [("optimizer.adapter.", learner.optimizer if learner.adapter is not None else None)]
    parts.append(("optimizer.head.", learner.head_optimizer if learner.head is not None else None))
    return [(prefix, optimizer) for prefix, optimizer in parts if optimizer is not None]
