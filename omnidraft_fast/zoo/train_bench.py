"""Train the benchmark zoo of EVALUATION.md: ``python -m omnidraft_fast.zoo.train_bench --out DIR [--tiny]``.

The paper's setting in miniature, on real tokenizers (``../shared/tokenizers``, or ``--tokenizers``) and
the embedded zoo's corpus (``zoo/data.py``), with ``zoo/train.py``'s training loop:

1. a drafter of Llama-68M's shape (hidden 768, 2 layers, 12 heads) with Mistral's 32k SentencePiece
   vocabulary, trained on the corpus;
2. one target per vocabulary, Llama-3 (128k) and Qwen (152k), a few hundred million parameters each;
3. per target, a copy of the drafter distilled towards it (``zoo/train.py``'s step 3).

It writes one pair folder per target, ``DIR/<llama3|qwen3>/{target,drafter-cross}`` with tokenizers, fp16
weights and a model card, which ``omnidraft_fast.zoo.load(Path(...))`` and ``benchmarks/e2e.py --pair``
load. Meant for a GPU (minutes); ``--tiny`` shrinks models, corpus and steps to a CPU check in seconds.
``--seconds S`` fits the training into a time budget (a device lease): of S, the drafter's pretraining takes
a fifth, the targets' pretraining a half and the distillations the rest, shared evenly between the targets;
each run is cut to the steps that fit its share (``zoo/train.py``'s ``train_lm``), and the card records
the steps it ran. The target's continuations for distillation are not counted (``--distill-texts``).
Exits with a message, and status 0, when the tokenizers are absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..cli import non_negative_int, positive_int
from .data import training_texts
from .train import ModelSpec, card_tables, distil, llama_model, pretrain, target_texts

__all__ = ["DRAFTER_68M", "TARGET", "TOKENIZERS", "main"]

MODULE = "omnidraft_fast.zoo.train_bench"
SHARED = Path(os.environ.get("OMNIDRAFT_SHARED", Path(__file__).resolve().parents[3] / "shared"))
TOKENIZERS = SHARED / "tokenizers"  # the project's ../shared, as in tests/conftest.py
DRAFTER_68M = ModelSpec(hidden=768, layers=2, heads=12, kv_heads=12, intermediate=3072, tied=False)
TARGET = ModelSpec(hidden=1024, layers=8, heads=16, kv_heads=8, intermediate=2816, tied=True)
TINY = ModelSpec(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, tied=True)
# tokenizer folder -> the model's vocabulary (rows of its head; Qwen's is padded past the tokenizer's ids)
VOCABS = {"mistral": 32_000, "llama3": 128_256, "qwen3": 151_936}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizers", type=Path, default=TOKENIZERS)
    parser.add_argument("--targets", nargs="+", choices=("llama3", "qwen3"), default=["llama3", "qwen3"])
    parser.add_argument("--steps", type=positive_int, default=1000, help="target training steps")
    parser.add_argument("--drafter-steps", type=positive_int, default=1500)
    parser.add_argument(
        "--distill-texts", type=positive_int, default=1024, help="target continuations to distil on"
    )
    parser.add_argument(
        "--distill-steps", type=non_negative_int, default=600, help="drafter fine-tuning steps per target"
    )
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seconds", type=float, default=None, help="time budget for the training (see above)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and corpus, few steps by default: a CPU check"
    )
    args = parser.parse_args(argv)
    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if args.tiny:  # tiny defaults; values given on the command line stay
        tiny = {
            "steps": 4,
            "drafter_steps": 4,
            "distill_texts": 4,
            "distill_steps": 2,
            "batch": 2,
            "length": 32,
        }
        for key, value in tiny.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    missing = [name for name in ("mistral", *args.targets) if not (args.tokenizers / name).is_dir()]
    if missing:
        print(f"benchmark zoo skipped: no tokenizer folder {', '.join(missing)} under {args.tokenizers} "
              "(the project's ../shared/tokenizers; pass --tokenizers)")  # fmt: skip
        return
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    texts = training_texts(problems=200)[::20] if args.tiny else training_texts()
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts)) / 1e6:.1f} M characters; device {device}")
    tokenizers = {name: AutoTokenizer.from_pretrained(args.tokenizers / name) for name in VOCABS}

    def model(name: str, spec: ModelSpec, seed: int):
        tokenizer = tokenizers[name]
        return llama_model(
            TINY if args.tiny else spec, VOCABS[name], tokenizer.eos_token_id, tokenizer.bos_token_id, seed
        )

    budget = _budget(args.seconds, len(args.targets))
    drafter = model("mistral", DRAFTER_68M, args.seed + 1)
    drafter_row = pretrain("drafter-cross", drafter, tokenizers["mistral"], texts, args, steps=args.drafter_steps,
                           lr=5e-3, seed=args.seed + 10, device=device, module=MODULE, budget=budget["drafter"])  # fmt: skip
    for index, name in enumerate(args.targets):
        target = model(name, TARGET, args.seed + 2 + index)
        card = [
            pretrain("target", target, tokenizers[name], texts, args, steps=args.steps, lr=3e-3,
                     seed=args.seed + 20 + index, device=device, module=MODULE, budget=budget["target"]),
            copy.deepcopy(drafter_row),
        ]  # fmt: skip
        began = time.perf_counter()
        kd_texts = target_texts(target, tokenizers[name], texts, args, device)
        distilled = copy.deepcopy(drafter)
        distil(card[1], distilled, tokenizers["mistral"], kd_texts, texts, args, seed=args.seed + 200 + index,
               device=device, data_seconds=time.perf_counter() - began, target_tokenizer=tokenizers[name],
               module=MODULE, budget=budget["distil"])  # fmt: skip
        folder = args.out / name
        for part, part_model, tokenizer in (
            ("target", target, tokenizers[name]),
            ("drafter-cross", distilled, tokenizers["mistral"]),
        ):
            part_model.to(torch.float16).save_pretrained(folder / part, safe_serialization=True)
            tokenizer.save_pretrained(folder / part)
        _write_card(folder, name, args, device, card)
        del target, distilled
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _budget(seconds: float | None, targets: int) -> dict[str, float | None]:
    """Each training run's share of the time budget ``--seconds`` (module docstring); None: no budget."""
    if seconds is None:
        return dict.fromkeys(("drafter", "target", "distil"))
    return {"drafter": seconds / 5, "target": seconds / 2 / targets, "distil": seconds * 3 / 10 / targets}


def _write_card(folder: Path, name: str, args, device: torch.device, card: list[dict]) -> None:
    spec = TINY if args.tiny else None
    lines = [
        f"# Benchmark zoo: {name} target, Mistral-vocabulary drafter",
        "",
        "Trained at benchmark time by this repository (EVALUATION.md, the benchmark zoo); not committed.",
        "",
        f"- Command: `python -m {MODULE} {' '.join(sys.argv[1:])}` (seed {args.seed}); device: {device}, "
        f"torch {torch.__version__}.",
        f"- Tokenizers: target `{name}` ({VOCABS[name]} ids), drafter `mistral` ({VOCABS['mistral']} ids), "
        "from ../shared/tokenizers.",
        "- Data: the embedded zoo's corpus (`omnidraft_fast/zoo/data.py`); the drafter is distilled on "
        f"{args.distill_texts} continuations by this target.",
        f"- Training: windows of {args.length} tokens, batch {args.batch}, AdamW, fp32 weights (bf16 autocast "
        "on CUDA), stored in fp16"
        + (
            f"; within a budget of {args.seconds:.0f} s (the steps below are those run)."
            if args.seconds
            else "."
        ),
        f"- Shapes: target {json.dumps(asdict(spec or TARGET))}; drafter {json.dumps(asdict(spec or DRAFTER_68M))}"
        + (" (--tiny)." if args.tiny else "."),
        *card_tables(card),
    ]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
