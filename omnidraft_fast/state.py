"""Saving and restoring what an engine learned, as one safetensors file written atomically.

Today that is the n-gram table (with the vocabulary bridge it belongs to, so a state is never loaded
into an engine for another tokenizer pair); the LoRA adapter and the acceptance head join it as they land.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

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
