"""The embedded model zoo: small models trained by ``python -m omnidraft_fast.zoo.train``, shipped in the package.

``load("code-pair")`` returns a trained Llama-architecture target, a drafter sharing its byte-level BPE
vocabulary, a drafter with a SentencePiece-style vocabulary of another size, and both tokenizers. No
network is used. See ``code-pair/MODEL_CARD.md`` for sizes, data, steps and losses. ``load(Path(folder))``
loads a pair folder of the benchmark zoo (``python -m omnidraft_fast.zoo.train_bench``), which has no shared
drafter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["NAMES", "ZooPair", "load"]

ROOT = Path(__file__).resolve().parent
NAMES = ("code-pair",)


@dataclass
class ZooPair:
    target: torch.nn.Module
    drafter_shared: torch.nn.Module | None  # the target's vocabulary (None: the folder has none)
    drafter_cross: torch.nn.Module  # another vocabulary
    target_tokenizer: object
    drafter_tokenizer: object  # the cross drafter's tokenizer
    card: str


def load(
    name: str | Path = "code-pair", *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> ZooPair:
    """Load a zoo entry by name, or a pair folder (``target/``, ``drafter-cross/``, optionally
    ``drafter-shared/``, ``MODEL_CARD.md``) by path. ``dtype`` defaults to float32 on the CPU (fast there)
    and float16 elsewhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import LOAD_OPTIONS

    if isinstance(name, Path):
        folder = name
    elif name in NAMES:
        folder = ROOT / name
    else:
        raise ValueError(
            f"unknown zoo entry {name!r}; available: {', '.join(NAMES)}, or a pair folder's Path"
        )
    if not (folder / "target" / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{folder} holds no trained weights; train them with `python -m omnidraft_fast.zoo.train`"
        )
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)

    def model(part: str) -> torch.nn.Module:
        return (
            AutoModelForCausalLM.from_pretrained(folder / part, dtype=dtype, **LOAD_OPTIONS).to(device).eval()
        )

    return ZooPair(
        target=model("target"),
        drafter_shared=model("drafter-shared") if (folder / "drafter-shared").is_dir() else None,
        drafter_cross=model("drafter-cross"),
        target_tokenizer=AutoTokenizer.from_pretrained(folder / "target"),
        drafter_tokenizer=AutoTokenizer.from_pretrained(folder / "drafter-cross"),
        card=(folder / "MODEL_CARD.md").read_text(),
    )
