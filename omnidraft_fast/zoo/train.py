"""Train the embedded model zoo: ``python -m omnidraft_fast.zoo.train [--out DIR] [--steps N]``.

With fixed seeds, on ``zoo/data.py``'s corpus, it trains:

1. two tokenizers: a byte-level BPE for the target and a SentencePiece-style one (metaspace, byte
   fallback) of another size for the cross-vocabulary drafter;
2. a Llama-architecture target and two drafters several times smaller: ``drafter-shared`` (the target's
   vocabulary) and ``drafter-cross`` (the other one);
3. distils both drafters towards the target (sequence-level knowledge distillation, Kim & Rush 2016):
   the target continues random windows of the corpus, half greedily and half sampled at T=1, and each
   drafter is fine-tuned on those texts (in its own tokenization) mixed with the corpus. A drafter that
   predicts what *this* target says is accepted more often than one that predicts the corpus. The
   cross-vocabulary drafter also gets the texts as the engine feeds them to it: the target's tokens
   spelled through the vocabulary bridge (``spelled_stream``).

``--resume`` loads the models already in ``--out`` and runs only step 3 (the card keeps the earlier
figures and adds the distillation's); ``--retrain NAME`` with it first builds that drafter anew (its
tokenizer too, steps 1-2, ``--drafter-steps``) and keeps the other models.

It uses a GPU when one is available (then larger models and more steps are worth it: pass them), else the
CPU. Weights are written as fp16 safetensors with their tokenizers and a model card (``MODEL_CARD.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ..bridge import VocabBridge
from ..cli import non_negative_int, positive_int
from ..models import LOAD_OPTIONS
from .data import HELDOUT_MODULES, HELDOUT_SEED, stdlib_sources, training_texts
from .tokenizers import byte_level, sentencepiece_style

__all__ = [
    "ModelSpec", "card_tables", "continuations", "distil", "heldout_loss", "llama_model", "main", "pretrain",
    "spelled_stream", "target_texts", "token_stream", "train_lm",
]  # fmt: skip

OUT = Path(__file__).resolve().parent / "code-pair"


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool


TARGET = ModelSpec(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=768, tied=False)
DRAFTER = ModelSpec(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384, tied=True)
TARGET_VOCAB, DRAFTER_VOCAB = 3072, 2048
DRAFTERS = ("drafter-shared", "drafter-cross")
MODELS = ("target", *DRAFTERS)


def llama_model(
    spec: ModelSpec,
    vocab_size: int,
    eos: int | None,
    bos: int | None,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of ``spec``'s shape, built on torch's default device (``with
    torch.device(...)`` builds it in place, e.g. on the GPU)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=spec.tied,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All training texts as one id stream, EOS between texts."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False).input_ids:
        ids += encoded
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def spelled_stream(tokenizer, target_tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts as the engine feeds a drafter with ``tokenizer`` serving a target with ``target_tokenizer``:
    the target's tokenization, each token spelled in drafter ids through the vocabulary bridge
    (``VocabBridge.spell_for_drafter``); one stream, the drafter's EOS between texts."""
    bridge = VocabBridge.from_tokenizers(tokenizer, target_tokenizer)
    eos = torch.tensor([tokenizer.eos_token_id])
    parts = [
        torch.cat([bridge.spell_for_drafter(torch.tensor(encoded, dtype=torch.int64)), eos])
        for encoded in target_tokenizer(texts, add_special_tokens=False).input_ids
    ]
    return torch.cat(parts)


# Steps timed before a time budget (train_lm's `seconds`) sets the step count.
_PROBE = 5


def train_lm(
    model,
    streams: list[torch.Tensor],
    *,
    steps: int,
    batch: int,
    length: int,
    lr: float,
    seed: int,
    device,
    label,
    weights: list[float] | None = None,
    seconds: float | None = None,
):
    """AdamW with warm-up and cosine decay on random windows of the streams (each window's stream drawn
    with ``weights``); returns the final mean loss, the seconds taken and the steps run. fp32 weights; on
    CUDA the forward runs under bf16 autocast.

    With ``seconds``, a time budget: the first ``_PROBE`` steps are timed (the first one, which pays for
    allocations and kernel choices, left out), and the run is cut to the steps that fit the budget, at
    least ``_PROBE``; the schedule follows the new count from there."""
    device = torch.device(device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    losses: list[float] = []
    began = time.perf_counter()
    first_done = began
    step = 0
    while step < steps:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        which = torch.multinomial(
            torch.tensor(weights or [1.0] * len(streams)), batch, True, generator=generator
        )
        windows = []
        for index in which.tolist():
            stream = streams[index]
            start = int(torch.randint(0, stream.numel() - length - 1, (1,), generator=generator))
            windows.append(stream[start : start + length])
        windows = torch.stack(windows).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=windows, labels=windows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())  # a host read: each step's time below is its own
        if step % 50 == 0 or step == steps - 1:
            print(
                f"[{label}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)"
            )
        step += 1
        if seconds is not None and step == 1:
            first_done = time.perf_counter()
        elif seconds is not None and step == _PROBE:
            now = time.perf_counter()
            per_step = (now - first_done) / (_PROBE - 1)
            fits = _PROBE + int(max(0.0, seconds - (now - began)) / per_step)
            if fits < steps:
                print(
                    f"[{label}] {per_step * 1e3:.0f} ms per step: {fits} of {steps} steps fit {seconds:.0f} s"
                )
                steps, warmup = fits, max(1, fits // 20)
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail), time.perf_counter() - began, steps


@torch.no_grad()
def continuations(
    target, tokenizer, stream: torch.Tensor, *, count: int, prompt: int, new: int, seed: int, device
) -> list[str]:
    """The target's continuations of ``count`` random ``prompt``-token windows of ``stream`` (its own
    tokenization), ``new`` tokens each: even batches greedy, odd batches sampled at T=1; decoded text."""
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    texts: list[str] = []
    batch = 64
    began = time.perf_counter()
    for first in range(0, count, batch):
        n = min(batch, count - first)
        starts = torch.randint(0, stream.numel() - prompt, (n,), generator=generator)
        ids = torch.stack([stream[s : s + prompt] for s in starts.tolist()]).to(device)
        torch.manual_seed(seed + first)
        sampled = (first // batch) % 2 == 1
        out = target.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=sampled, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=eos,
        )  # fmt: skip
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
        print(f"[distill data] {first + n}/{count} continuations ({time.perf_counter() - began:.0f} s)")
    return texts


@torch.no_grad()
def heldout_loss(model, tokenizer, device, length: int) -> float:
    ids = token_stream(tokenizer, [source for _, source in stdlib_sources(heldout=True)])
    windows = ids[: (ids.numel() // length) * length].view(-1, length)[:32].to(device)
    return model(input_ids=windows, labels=windows).loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="target steps (default 600 on CPU, 3000 on GPU)"
    )
    parser.add_argument("--drafter-steps", type=positive_int, default=None, help="default: as --steps")
    parser.add_argument(
        "--distill-texts", type=positive_int, default=1024, help="target continuations to distil on"
    )
    parser.add_argument(
        "--distill-steps", type=non_negative_int, default=600, help="drafter fine-tuning steps (0: none)"
    )
    parser.add_argument("--resume", action="store_true", help="load the models in --out; distil only")
    parser.add_argument(
        "--retrain", action="append", choices=DRAFTERS, default=[],
        help="with --resume: train this drafter and its tokenizer anew first (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--distill-only", action="append", choices=DRAFTERS,
        help="distil only this drafter (repeatable; default: both)",
    )  # fmt: skip
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.retrain and not args.resume:
        parser.error("--retrain needs --resume (without it every model is trained anew)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (3000 if device.type == "cuda" else 600)
    drafter_steps = args.drafter_steps or steps
    torch.manual_seed(args.seed)

    texts = training_texts()
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts)) / 1e6:.1f} M characters; device {device}")
    if args.resume:
        models, tokenizers, card = _load(args.out, device)
        fresh = list(dict.fromkeys(args.retrain))
    else:
        tokenizers, models, card = {"target": byte_level(texts, TARGET_VOCAB)}, {}, []
        fresh = MODELS
    for index, name in enumerate(MODELS):
        if name not in fresh:
            continue
        cross = name == "drafter-cross"
        tokenizer = tokenizers[name] = (
            sentencepiece_style(texts, DRAFTER_VOCAB) if cross else tokenizers["target"]
        )
        models[name] = llama_model(
            TARGET if name == "target" else DRAFTER, DRAFTER_VOCAB if cross else TARGET_VOCAB,
            tokenizer.eos_token_id, tokenizer.bos_token_id if cross else None, args.seed + index,
        )  # fmt: skip
        n, lr = (steps, 3e-3) if name == "target" else (drafter_steps, 5e-3)
        row = pretrain(name, models[name], tokenizer, texts, args, steps=n, lr=lr, seed=args.seed + 10 * index,
                       device=device)  # fmt: skip
        card = sorted([r for r in card if r["model"] != name] + [row], key=lambda r: MODELS.index(r["model"]))
    models = {name: models[name] for name in MODELS}
    if args.distill_steps:
        _distill(args, models, tokenizers, card, texts, device)
    for name, model in models.items():
        folder = args.out / name
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        tokenizers[name].save_pretrained(folder)
    _write_card(args, device, card)


def _load(out: Path, device) -> tuple[dict, dict, list[dict]]:
    from transformers import AutoTokenizer

    models = {
        n: LlamaForCausalLM.from_pretrained(out / n, dtype=torch.float32, **LOAD_OPTIONS).to(device)
        for n in MODELS
    }
    tokenizers = {n: AutoTokenizer.from_pretrained(out / n) for n in ("target", "drafter-cross")}
    tokenizers["drafter-shared"] = tokenizers["target"]  # one object: _distill tells a cross drafter by it
    card = json.loads((out / "card.json").read_text())
    return models, tokenizers, card


def _distill(args, models: dict, tokenizers: dict, card: list[dict], texts: list[str], device) -> None:
    """Step 3 of the module docstring: fine-tune each drafter on the target's continuations."""
    began = time.perf_counter()
    kd_texts = target_texts(models["target"], tokenizers["target"], texts, args, device)
    names = args.distill_only or [row["model"] for row in card if row["model"] != "target"]
    share = (time.perf_counter() - began) / len(names)
    for index, row in enumerate(card):
        if row["model"] in names:
            model, tokenizer = models[row["model"]], tokenizers[row["model"]]
            cross = tokenizer is not tokenizers["target"]
            distil(row, model, tokenizer, kd_texts, texts, args, seed=args.seed + 200 + index, device=device,
                   data_seconds=share, target_tokenizer=tokenizers["target"] if cross else None)  # fmt: skip


def pretrain(
    name: str, model, tokenizer, texts: list[str], args, *, steps: int, lr: float, seed: int, device,
    module: str = "omnidraft_fast.zoo.train", budget: float | None = None,
) -> dict:  # fmt: skip
    """Train ``model`` on ``texts`` (windows of ``args.length`` tokens, batch ``args.batch``; at most
    ``budget`` seconds, ``train_lm``); its card row."""
    loss, seconds, steps = train_lm(
        model, [token_stream(tokenizer, texts)], steps=steps, batch=args.batch, length=args.length, lr=lr,
        seed=seed, device=device, label=name, seconds=budget,
    )  # fmt: skip
    row = {
        "model": name, "params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size,
        "steps": steps, "lr": lr, "final_train_loss": round(loss, 3),
        "heldout_code_loss": round(heldout_loss(model, tokenizer, device, args.length), 3),
        "train_seconds": round(seconds), "command": _command(module),
    }  # fmt: skip
    print(row)
    return row


def target_texts(target, tokenizer, texts: list[str], args, device) -> list[str]:
    """The distillation data: ``args.distill_texts`` continuations by ``target`` of windows of ``texts``."""
    stream = token_stream(tokenizer, texts)
    return continuations(
        target.eval(), tokenizer, stream, count=args.distill_texts, prompt=32, new=96, seed=args.seed + 100,
        device=device,
    )  # fmt: skip


def distil(
    row: dict, model, tokenizer, kd_texts: list[str], texts: list[str], args, *, seed: int, device,
    data_seconds: float, target_tokenizer=None, module: str = "omnidraft_fast.zoo.train",
    budget: float | None = None,
) -> None:  # fmt: skip
    """Fine-tune the drafter ``model`` on the target's ``kd_texts`` (3 parts) mixed with ``texts`` (1 part),
    ``args.distill_steps`` steps at lr 1e-3 (at most ``budget`` seconds, ``train_lm``); adds the figures to
    its card ``row``.

    A drafter with another vocabulary than the target's (``target_tokenizer``) takes half of the
    continuations' part in the form it serves them in: the target's tokenization spelled through the
    bridge (``spelled_stream``), which is not its own tokenization of the same text. So it learns to draft in
    the context the engine gives it, and keeps its own tokenization for the other half."""
    streams, weights = [token_stream(tokenizer, kd_texts), token_stream(tokenizer, texts)], [3.0, 1.0]
    if target_tokenizer is not None:
        streams.append(spelled_stream(tokenizer, target_tokenizer, kd_texts))
        weights = [1.5, 1.0, 1.5]
    loss, seconds, steps = train_lm(
        model, streams, weights=weights, steps=args.distill_steps, batch=args.batch, length=args.length,
        lr=1e-3, seed=seed, device=device, label=f"{row['model']} distil", seconds=budget,
    )  # fmt: skip
    row.update(
        distill_texts=args.distill_texts, distill_steps=steps, distill_train_loss=round(loss, 3),
        distill_heldout_code_loss=round(heldout_loss(model, tokenizer, device, args.length), 3),
        distill_seconds=round(seconds + data_seconds), distill_command=_command(module),
    )  # fmt: skip
    print(row)


def _command(module: str = "omnidraft_fast.zoo.train") -> str:
    return (f"python -m {module} " + " ".join(sys.argv[1:])).strip()


def _write_card(args, device, card: list[dict]) -> None:
    commands = dict.fromkeys(row[key] for row in card for key in ("command", "distill_command") if key in row)
    lines = [
        "# Embedded model zoo: code-pair",
        "",
        "Tiny Llama-architecture models trained by this repository, shipped so that the demo and the tests",
        "have a real (trained) target and drafters without any download. They are small and undertrained:",
        "useful for measuring speculative decoding, not for writing code.",
        "",
        f"- Commands: {' then '.join(f'`{c}`' for c in commands)} (seed {args.seed}); device: {device} "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, Python {platform.python_version()}.",
        f"- Data: the top-level modules of Python {platform.python_version()}'s standard library except "
        f"{', '.join(HELDOUT_MODULES)} (held out), plus generated arithmetic word problems (seeds < {HELDOUT_SEED};",
        "  higher seeds are held out). See `omnidraft_fast/zoo/data.py`.",
        f"- Tokenizers: target and drafter-shared: byte-level BPE, {TARGET_VOCAB} ids; drafter-cross: "
        f"SentencePiece-style (metaspace, byte fallback, runs of spaces as tokens), {DRAFTER_VOCAB} ids.",
        f"- Training: windows of {args.length} tokens, batch {args.batch}, AdamW (0.9, 0.95), weight decay 0.1,",
        "  warm-up then cosine decay; fp32 weights (bf16 autocast on CUDA), stored in fp16.",
        f"- Shapes: target {json.dumps(asdict(TARGET))}; drafters {json.dumps(asdict(DRAFTER))}.",
        *card_tables(card),
    ]
    (args.out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def card_tables(card: list[dict]) -> list[str]:
    """Markdown lines: the training table of every model of ``card``, then the distillation table."""
    lines = [
        "",
        "| model | params | vocab | steps | lr | final train loss | held-out code loss | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in card:
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.2f} M | {row['vocab']} | {row['steps']} | {row['lr']} | "
            f"{row['final_train_loss']} | {row['heldout_code_loss']} | {row['train_seconds']} |"
        )
    distilled = [row for row in card if "distill_steps" in row]
    if distilled:
        lines += [
            "",
            "Distillation towards the target (module docstring, step 3): fine-tuning on the target's",
            "continuations (3 parts) mixed with the corpus (1 part), lr 1e-3. A drafter with another vocabulary",
            "takes half of the continuations' part as the engine feeds them to it (the target's tokens spelled",
            "through the vocabulary bridge); the table shows each drafter's last distillation.",
            "",
            "| drafter | continuations | steps | final train loss | held-out code loss | time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for row in distilled:
            lines.append(
                f"| {row['model']} | {row['distill_texts']} | {row['distill_steps']} | "
                f"{row['distill_train_loss']} | {row['distill_heldout_code_loss']} | {row['distill_seconds']} |"
            )
    return lines


if __name__ == "__main__":
    main()
