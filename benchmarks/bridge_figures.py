"""Vocabulary-bridge figures for the real tokenizer pairs in ../shared/tokenizers.

For each (drafter, target) pair: the size of the byte-exact intersection, the bridge build time, the
longest drafter spelling of a target token and how many target tokens are spelled in more drafter tokens
than ``EngineConfig.max_spelling`` (a round feeds the drafter's context the end of those only), and on a
code sample (a standard-library module) the share of the drafter's tokens, and of the text's bytes, that
map directly onto one target token, and how many of the sample's target tokens are spelled past
``max_spelling``.

    python benchmarks/bridge_figures.py [--tokenizers ../shared/tokenizers] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
import transformers

from omnidraft_fast import EngineConfig
from omnidraft_fast.bridge import VocabBridge, token_bytes
from omnidraft_fast.report import environment, provenance, write_results

PAIRS = [("mistral", "llama3"), ("mistral", "qwen3"), ("gpt2", "llama3"), ("llama3", "qwen3")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--tokenizers", type=Path, default=root.parent / "shared" / "tokenizers")
    parser.add_argument("--out", type=Path, default=root / "benchmarks" / "results")
    args = parser.parse_args()
    missing = sorted({name for pair in PAIRS for name in pair if not (args.tokenizers / name).is_dir()})
    if missing:
        raise SystemExit(f"--tokenizers {args.tokenizers}: no folder for {', '.join(missing)}; pass the folder "
                         "that holds gpt2, llama3, mistral and qwen3 (../shared/tokenizers)")  # fmt: skip
    sample_path = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    sample = sample_path.read_text(encoding="utf-8")
    tokenizers = {}
    rows = []
    for drafter, target in PAIRS:
        for name in (drafter, target):
            if name not in tokenizers:
                tokenizers[name] = transformers.AutoTokenizer.from_pretrained(args.tokenizers / name)
        began = time.perf_counter()
        bridge = VocabBridge.from_tokenizers(tokenizers[drafter], tokenizers[target])
        seconds = time.perf_counter() - began
        ids = torch.tensor(tokenizers[drafter].encode(sample, add_special_tokens=False))
        pieces = token_bytes(tokenizers[drafter]).pieces
        direct = bridge.d2t[ids] >= 0
        direct_bytes = sum(len(pieces[i]) for i in ids[direct].tolist())
        total_bytes = sum(len(pieces[i]) for i in ids.tolist())
        spellable = bridge.t2ds_len[: len(tokenizers[target])] > 0
        long = bridge.t2ds_len > EngineConfig.max_spelling
        target_ids = torch.tensor(tokenizers[target].encode(sample, add_special_tokens=False))
        rows.append(
            {
                "drafter": drafter,
                "target": target,
                "drafter_vocab": len(tokenizers[drafter]),
                "target_vocab": len(tokenizers[target]),
                "intersection": bridge.num_direct,
                "build_seconds": round(seconds, 2),
                "max_spelling": bridge.max_spelling,
                "target_tokens_past_max_spelling": int(long.sum()),
                "sample_target_tokens": len(target_ids),
                "sample_target_tokens_past_max_spelling": int(long[target_ids].sum()),
                "target_tokens_spellable": round(spellable.float().mean().item(), 4),
                "sample_tokens_direct": round(direct.float().mean().item(), 4),
                "sample_bytes_direct": round(direct_bytes / total_bytes, 4),
            }
        )
        print(rows[-1])
    result = {
        **environment(torch.device("cpu")),
        "sample": f"{sample_path.name} ({len(sample.encode())} bytes)",
        "pairs": rows,
    }
    lines = [
        f"# Vocabulary bridge figures ({provenance(result)})",
        "",
        f"Code sample: `{result['sample']}`. Intersection = target ids reachable by the byte-exact direct map "
        "(EOS mapped by role included). Past max_spelling: target tokens whose drafter spelling is longer than "
        f"`EngineConfig.max_spelling` ({EngineConfig.max_spelling}), in the vocabulary and in the sample's "
        "target tokenization.",
        "",
        "| drafter | target | intersection | build (s) | longest spelling | past max_spelling (vocabulary) | "
        "past max_spelling (sample) | sample tokens direct | sample bytes direct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['drafter']} ({row['drafter_vocab']}) | {row['target']} ({row['target_vocab']}) | "
            f"{row['intersection']:,} | {row['build_seconds']} | {row['max_spelling']} | "
            f"{row['target_tokens_past_max_spelling']} | {row['sample_target_tokens_past_max_spelling']} of "
            f"{row['sample_target_tokens']:,} | {row['sample_tokens_direct']:.1%} | {row['sample_bytes_direct']:.1%} |"
        )
    write_results(args.out / "bridge", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
