"""Train the embedded model zoo: ``python -m omnidraft_fast.zoo.train [--out DIR] [--steps N]``.

With fixed seeds, on ``zoo/data.py``'s corpus, it trains:

1. two tokenizers: a byte-level BPE for the target and a SentencePiece-style one (metaspace, byte
   fallback) of another size for the cross-vocabulary drafter;
2. a Llama-architecture target and two drafters several times smaller: ``drafter-shared`` (the target's
   vocabulary) and ``drafter-cross`` (the other one).

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
from transformers import LlamaConfig, LlamaForCausalLM

from .data import HELDOUT_MODULES, HELDOUT_SEED, stdlib_sources, training_texts
from .tokenizers import byte_level, sentencepiece_style

__all__ = ["ModelSpec", "main"]

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


def _model(spec: ModelSpec, vocab_size: int, eos: int, bos: int | None, seed: int) -> LlamaForCausalLM:
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
    return LlamaForCausalLM(config)


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All training texts as one id stream, EOS between texts."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _train(
    model, stream: torch.Tensor, *, steps: int, batch: int, length: int, lr: float, seed: int, device, label
):
    """AdamW with warm-up and cosine decay on random windows of the stream; returns the final mean loss."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    losses: list[float] = []
    began = time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator)
        windows = torch.stack([stream[s : s + length] for s in starts.tolist()]).to(device)
        loss = model(input_ids=windows, labels=windows).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(
                f"[{label}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)"
            )
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail), time.perf_counter() - began


@torch.no_grad()
def _heldout_loss(model, tokenizer, device, length: int) -> float:
    ids = _stream(tokenizer, [source for _, source in stdlib_sources(heldout=True)])
    windows = ids[: (ids.numel() // length) * length].view(-1, length)[:32].to(device)
    return model(input_ids=windows, labels=windows).loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--steps", type=int, default=None, help="target steps (default 600 on CPU, 3000 on GPU)"
    )
    parser.add_argument("--drafter-steps", type=int, default=None, help="default: as --steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (3000 if device.type == "cuda" else 600)
    drafter_steps = args.drafter_steps or steps
    torch.manual_seed(args.seed)

    texts = training_texts()
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts)) / 1e6:.1f} M characters; device {device}")
    target_tokenizer = byte_level(texts, TARGET_VOCAB)
    drafter_tokenizer = sentencepiece_style(texts, DRAFTER_VOCAB)
    eos_t = target_tokenizer.eos_token_id
    eos_d, bos_d = drafter_tokenizer.eos_token_id, drafter_tokenizer.bos_token_id
    runs = {
        "target": (_model(TARGET, TARGET_VOCAB, eos_t, None, args.seed), target_tokenizer, steps, 3e-3),
        "drafter-shared": (
            _model(DRAFTER, TARGET_VOCAB, eos_t, None, args.seed + 1),
            target_tokenizer,
            drafter_steps,
            5e-3,
        ),
        "drafter-cross": (
            _model(DRAFTER, DRAFTER_VOCAB, eos_d, bos_d, args.seed + 2),
            drafter_tokenizer,
            drafter_steps,
            5e-3,
        ),
    }
    streams = {id(tok): _stream(tok, texts) for tok in (target_tokenizer, drafter_tokenizer)}
    card = []
    for index, (name, (model, tokenizer, n, lr)) in enumerate(runs.items()):
        loss, seconds = _train(
            model, streams[id(tokenizer)], steps=n, batch=args.batch, length=args.length, lr=lr,
            seed=args.seed + 10 * index, device=device, label=name,
        )  # fmt: skip
        heldout = _heldout_loss(model, tokenizer, device, args.length)
        folder = args.out / name
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        params = sum(p.numel() for p in model.parameters())
        card.append(
            {"model": name, "params": params, "vocab": model.config.vocab_size, "steps": n, "lr": lr,
             "final_train_loss": round(loss, 3), "heldout_code_loss": round(heldout, 3),
             "train_seconds": round(seconds)}
        )  # fmt: skip
        print(card[-1])
    _write_card(args, device, card)


def _write_card(args, device, card: list[dict]) -> None:
    command = "python -m omnidraft_fast.zoo.train " + " ".join(sys.argv[1:])
    lines = [
        "# Embedded model zoo: code-pair",
        "",
        "Tiny Llama-architecture models trained by this repository, shipped so that the demo and the tests",
        "have a real (trained) target and drafters without any download. They are small and undertrained:",
        "useful for measuring speculative decoding, not for writing code.",
        "",
        f"- Command: `{command.strip()}` (seed {args.seed}); device: {device} "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, Python {platform.python_version()}.",
        f"- Data: the top-level modules of Python {platform.python_version()}'s standard library except "
        f"{', '.join(HELDOUT_MODULES)} (held out), plus generated arithmetic word problems (seeds < {HELDOUT_SEED};",
        "  higher seeds are held out). See `omnidraft_fast/zoo/data.py`.",
        f"- Tokenizers: target and drafter-shared: byte-level BPE, {TARGET_VOCAB} ids; drafter-cross: "
        f"SentencePiece-style (metaspace, byte fallback), {DRAFTER_VOCAB} ids.",
        f"- Training: windows of {args.length} tokens, batch {args.batch}, AdamW (0.9, 0.95), weight decay 0.1,",
        "  warm-up then cosine decay; fp32 training, weights stored in fp16.",
        f"- Shapes: target {json.dumps(asdict(TARGET))}; drafters {json.dumps(asdict(DRAFTER))}.",
        "",
        "| model | params | vocab | steps | lr | final train loss | held-out code loss | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in card:
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.2f} M | {row['vocab']} | {row['steps']} | {row['lr']} | "
            f"{row['final_train_loss']} | {row['heldout_code_loss']} | {row['train_seconds']} |"
        )
    (args.out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
