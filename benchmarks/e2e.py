"""End-to-end decoding benchmark on the embedded zoo: transformers' generate() side by side with this engine.

In one process, on the same held-out prompts (code, math, prose; ``omnidraft_fast.zoo.data``), greedy:

- ``transformers``: plain ``model.generate()`` of the target;
- ``transformers assisted``: ``assistant_model=`` with the shared-vocabulary drafter;
- ``transformers UAG``: universal assisted generation, ``assistant_model=`` with the cross-vocabulary
  drafter and ``tokenizer=``/``assistant_tokenizer=``;
- ``omnidraft_fast shared``: this engine with the shared-vocabulary drafter;
- ``omnidraft_fast <mode>``: this engine with the cross-vocabulary drafter, translation omnidraft/tli/exact.

Every output is checked against the plain greedy output. Figures: tokens/s, speed-up over plain decoding,
acceptance, mean accepted length, target calls per token; written as JSON and Markdown with the device
and package versions. Ratios from one run are the figures to quote.

    python benchmarks/e2e.py [--prompts-per-task 2] [--max-new-tokens 64] [--k 4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from omnidraft_fast import EngineConfig, SpeculativeEngine
from omnidraft_fast.zoo import load
from omnidraft_fast.zoo.data import heldout_prompts


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts-per-task", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="draft length for every speculative method")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    zoo = load("code-pair", device=device)
    target, tokenizer = zoo.target, zoo.target_tokenizer
    new = args.max_new_tokens

    def engine(drafter, translation=None):
        kwargs = {}
        if drafter is zoo.drafter_cross:
            kwargs = {"target_tokenizer": tokenizer, "drafter_tokenizer": zoo.drafter_tokenizer}
        config = EngineConfig(
            num_draft_tokens=args.k, **({"translation": translation} if translation else {})
        )
        return SpeculativeEngine(target, drafter, config=config, **kwargs)

    engines = {
        "omnidraft_fast shared": engine(zoo.drafter_shared),
        "omnidraft_fast omnidraft": engine(zoo.drafter_cross, "omnidraft"),
        "omnidraft_fast tli": engine(zoo.drafter_cross, "tli"),
        "omnidraft_fast exact": engine(zoo.drafter_cross, "exact"),
    }
    zoo.drafter_shared.generation_config.num_assistant_tokens = args.k
    zoo.drafter_shared.generation_config.num_assistant_tokens_schedule = "constant"
    zoo.drafter_cross.generation_config.num_assistant_tokens = args.k
    zoo.drafter_cross.generation_config.num_assistant_tokens_schedule = "constant"
    methods = {
        "transformers": lambda ids: target.generate(ids, max_new_tokens=new, do_sample=False),
        "transformers assisted": lambda ids: target.generate(
            ids, max_new_tokens=new, do_sample=False, assistant_model=zoo.drafter_shared
        ),
        "transformers UAG": lambda ids: target.generate(
            ids,
            max_new_tokens=new,
            do_sample=False,
            assistant_model=zoo.drafter_cross,
            tokenizer=tokenizer,
            assistant_tokenizer=zoo.drafter_tokenizer,
        ),
        **{name: (lambda ids, e=e: e.generate(ids, max_new_tokens=new)) for name, e in engines.items()},
    }
    prompts = heldout_prompts(args.prompts_per_task)
    warm = tokenizer("def f(x):", return_tensors="pt").input_ids.to(device)
    for method in methods.values():
        method(warm)
    for e in engines.values():
        e.stats = type(e.stats)()

    seconds = {name: 0.0 for name in methods}
    tokens = {name: 0 for name in methods}
    identical = {name: True for name in methods}
    for task, prompt in tqdm(prompts, desc="prompts"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        expected = None
        for name, method in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = method(ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - began
            tokens[name] += out.shape[1] - ids.shape[1]
            expected = out if expected is None else expected
            identical[name] &= torch.equal(out, expected)
        del task

    plain = tokens["transformers"] / seconds["transformers"]
    rows = []
    for name in methods:
        speed = tokens[name] / seconds[name]
        row = {"method": name, "tokens_per_second": round(speed, 2), "speedup": round(speed / plain, 3),
               "greedy_identical": identical[name]}  # fmt: skip
        if name in engines:
            stats = engines[name].stats
            row.update(
                acceptance=round(stats.acceptance_rate, 4),
                mean_accepted_length=round(stats.mean_accepted_length, 3),
                target_calls_per_token=round(stats.target_calls_per_token, 4),
                merged_accepted=stats.merged_accepted,
                stage_seconds={k: round(v, 4) for k, v in stats.stage_seconds.items()},
            )
        rows.append(row)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": _device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": _commit(),
        "prompts": len(prompts),
        "max_new_tokens": new,
        "k": args.k,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# End-to-end greedy decoding, embedded zoo code-pair ({result['date']}, {result['device']}, "
        f"torch {result['torch']}, transformers {result['transformers']}, commit {result['commit']})",
        "",
        f"{len(prompts)} held-out prompts (code, math, prose), {new} new tokens each, k = {args.k}.",
        "",
        "| method | tok/s | speed-up | greedy identical | acceptance | accepted len | target calls/tok |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['tokens_per_second']} | {row['speedup']:.2f}x | {row['greedy_identical']} | "
            f"{row.get('acceptance', '-')} | {row.get('mean_accepted_length', '-')} | "
            f"{row.get('target_calls_per_token', '-')} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
