"""Online learning while serving, measured: LoRA distillation and adaptive draft length on a zoo pair.

For each drafter of the pair (shared vocabulary, and cross-vocabulary with OmniDraft translation) and
each learning configuration, in one process:

1. a fresh engine (its own copy of the drafter) decodes the *evaluation* prompts with learning paused:
   greedily (acceptance, drafter tokens per round, tokens/s and speed-up over plain ``generate()``, the
   faster of ``--repeats`` timings, plain decoding timed the same way), then sampled at T=1 with a fixed
   seed (acceptance: what distillation towards the target's distribution raises);
2. it serves a stream of *other* prompts (``--passes`` times over them, alternately greedy and sampled
   at T=1), learning as configured; the time spent training counts as serving time;
3. it decodes the evaluation prompts again.

The acceptance of every served request is kept too: the curve over the request stream, per drafter and
configuration, is plotted (with matplotlib) beside the JSON and Markdown. Those two are written after each
configuration too, marked partial, so that a run cut short keeps what it measured.

Configurations: ``static`` (no learning), ``distill`` (LoRA, SPEC §4), ``adaptive`` (acceptance head,
SPEC §5), ``confidence 0.4`` (no learning: rows stop drafting below that drafter confidence, the rule
without a head that transformers uses, ``EngineConfig.confidence_threshold``; what a head must beat),
``adaptive (confidence input)`` (the head reading the drafter's confidence too, starting as that rule), the
two learners together in the ``alternating`` and ``joint`` modes, and alternating with the learners fed
every ``--in-flight-rounds`` rounds of a request too (``EngineConfig.in_flight_rounds``). Every greedy
output is checked against plain greedy decoding. Prompts are the zoo's held-out code, arithmetic and prose
(``omnidraft_fast.zoo.data``): even-numbered ones are served, odd-numbered ones evaluate.

    python benchmarks/online.py [--pair DIR] [--prompts-per-task 8] [--passes 2] [--lr 1e-4] [--confidence 0.4]
                                [--configs NAME ...] [--tag NAME]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from tqdm import tqdm

from omnidraft_fast import AdaptiveConfig, DistillConfig, EngineConfig, GenerationStats, SpeculativeEngine
from omnidraft_fast.report import environment, provenance, synchronize, write_results
from omnidraft_fast.zoo import load
from omnidraft_fast.zoo.data import heldout_prompts


def configurations(args) -> dict[str, EngineConfig]:
    distill = DistillConfig(lr=args.lr, interval=args.interval)
    adaptive = dict(interval=args.interval, gamma=args.gamma)
    return {
        "static": EngineConfig(num_draft_tokens=args.k),
        "distill": EngineConfig(num_draft_tokens=args.k, distill=distill),
        "adaptive": EngineConfig(num_draft_tokens=args.k, adaptive=AdaptiveConfig(**adaptive)),
        f"confidence {args.confidence}": EngineConfig(
            num_draft_tokens=args.k, confidence_threshold=args.confidence
        ),
        "adaptive (confidence input)": EngineConfig(
            num_draft_tokens=args.k, adaptive=AdaptiveConfig(confidence_input=True, **adaptive)
        ),
        "distill+adaptive (alternating)": EngineConfig(
            num_draft_tokens=args.k, distill=distill, adaptive=AdaptiveConfig(mode="alternating", **adaptive)
        ),
        "distill+adaptive (joint)": EngineConfig(
            num_draft_tokens=args.k, distill=distill, adaptive=AdaptiveConfig(mode="joint", **adaptive)
        ),
        "distill+adaptive (alternating, in flight)": EngineConfig(
            num_draft_tokens=args.k,
            distill=distill,
            adaptive=AdaptiveConfig(mode="alternating", **adaptive),
            in_flight_rounds=args.in_flight_rounds,
        ),
    }


def evaluate(engine, prompts, references, tokenizer, new, device, repeats: int, seed: int) -> dict:
    """Greedy decoding of ``prompts`` with learning paused: the stats summed, the faster of ``repeats``
    timings, and whether every output matched plain greedy decoding; then the acceptance when sampling
    (T=1, seeded), which distribution matching targets (1 - TV(q, p) per position)."""
    if engine.learner is not None:
        engine.learner.enabled = False
    seconds, identical = float("inf"), True
    for _ in range(repeats):
        total, elapsed = GenerationStats(), 0.0
        for text, reference in zip(prompts, references, strict=True):
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            synchronize(device)
            began = time.perf_counter()
            out = engine.generate(ids, max_new_tokens=new, do_sample=False)
            synchronize(device)
            elapsed += time.perf_counter() - began
            identical &= torch.equal(out, reference)
            total.add(engine.last_stats)
        seconds = min(seconds, elapsed)
    torch.manual_seed(seed)
    sampled = GenerationStats()
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        engine.generate(ids, max_new_tokens=new, do_sample=True, temperature=1.0, top_k=0)
        sampled.add(engine.last_stats)
    if engine.learner is not None:
        engine.learner.enabled = True
    return {
        "sampled_acceptance": sampled.acceptance_rate,
        "acceptance": total.acceptance_rate,
        "tokens_per_round": total.mean_accepted_length,
        "drafter_tokens_per_round": total.drafted_per_round,
        "tokens_per_second": total.new_tokens / seconds,
        "identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pair", type=Path, default=None, help="a benchmark-zoo pair folder (default code-pair)"
    )
    parser.add_argument("--prompts-per-task", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2, help="passes over the served prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4, help="draft length (k_max with an acceptance head)")
    parser.add_argument("--lr", type=float, default=DistillConfig.lr)
    parser.add_argument("--interval", type=int, default=DistillConfig.interval)
    parser.add_argument("--gamma", type=float, default=AdaptiveConfig.gamma)
    parser.add_argument(
        "--confidence", type=float, default=0.4, help="the confidence-threshold configuration's threshold"
    )
    parser.add_argument(
        "--in-flight-rounds", type=int, default=4, help="the in-flight configuration's cadence"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timings per evaluation (the fastest counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs", nargs="+", default=None, help="learning configurations to run (default: all of them)"
    )
    parser.add_argument("--tag", default="", help="suffix of the results files' names")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    zoo = load(args.pair or "code-pair", device=device)
    target, tokenizer, new = zoo.target, zoo.target_tokenizer, args.max_new_tokens
    prompts = heldout_prompts(per_task=args.prompts_per_task)
    served = [text for i, (_, text) in enumerate(prompts) if i % 2 == 0]
    evaluated = [text for i, (_, text) in enumerate(prompts) if i % 2 == 1]

    references, seconds = [], float("inf")
    for _ in range(args.repeats):  # plain greedy decoding: the reference outputs and the baseline speed
        references, elapsed = [], 0.0
        for text in evaluated:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            synchronize(device)
            began = time.perf_counter()
            references.append(target.generate(ids, max_new_tokens=new, do_sample=False))
            synchronize(device)
            elapsed += time.perf_counter() - began
        seconds = min(seconds, elapsed)
    plain = sum(int(r.shape[1]) - int(tokenizer(t, return_tensors="pt").input_ids.shape[1])
                for r, t in zip(references, evaluated, strict=True)) / seconds  # fmt: skip

    drafters = {
        "shared": (zoo.drafter_shared, tokenizer),
        "cross": (zoo.drafter_cross, zoo.drafter_tokenizer),
    }
    rows = []
    names = args.configs or list(configurations(args))
    unknown = sorted(set(names) - set(configurations(args)))
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {list(configurations(args))}")
    env = environment(device)
    result = {
        "environment": env,
        "settings": vars(args) | {"out": str(args.out), "pair": str(args.pair or "code-pair")},
        "plain_tokens_per_second": plain,
        "served_prompts": len(served),
        "evaluation_prompts": len(evaluated),
        "rows": rows,
    }

    def markdown() -> str:
        lines = [
            f"# Online learning while serving ({provenance(env)})",
            "",
            f"Pair `{args.pair or 'code-pair'}`; {len(served)} served prompts x {args.passes} passes "
            f"(alternately greedy and T=1), {len(evaluated)} other prompts evaluated greedily before and "
            f"after; {new} new tokens, k = {args.k}, LoRA lr {args.lr:g} every {args.interval} rows, "
            f"gamma {args.gamma}. Plain greedy `generate()`: {plain:.1f} tok/s. Speed-ups are over it, "
            f"measured in this run (the faster of {args.repeats} timings); evaluation requests teach the "
            "learners nothing.",
            "",
            "| drafter | learning | greedy acceptance before → after | sampled (T=1) acceptance "
            "| tokens/round | drafter tokens/round | speed-up before → after "
            "| serving: steps (LoRA / head), training share | identical |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            b, a, s = row["before"], row["after"], row["serving"]
            lines.append(
                f"| {row['drafter']} | {row['config']} | {b['acceptance']:.1%} → {a['acceptance']:.1%} | "
                f"{b['sampled_acceptance']:.1%} → {a['sampled_acceptance']:.1%} | "
                f"{b['tokens_per_round']:.2f} → {a['tokens_per_round']:.2f} | "
                f"{b['drafter_tokens_per_round']:.2f} → {a['drafter_tokens_per_round']:.2f} | "
                f"{b['speedup']:.2f}x → {a['speedup']:.2f}x | {s['distill_steps']} / {s['head_steps']}, "
                f"{s['training_seconds'] / s['seconds']:.0%} | {b['identical'] and a['identical']} |"
            )
        return "\n".join(lines) + "\n"

    parts = [
        "online",
        *([args.pair.name] if args.pair else []),
        device.type,
        *([args.tag] if args.tag else []),
    ]
    stem = args.out / "-".join(parts)
    jobs = [(d, c) for d in drafters if drafters[d][0] is not None for c in names]
    for drafter_name, config_name in tqdm(jobs, desc="online"):
        drafter, drafter_tokenizer = drafters[drafter_name]
        torch.manual_seed(args.seed)
        engine = SpeculativeEngine(
            target, copy.deepcopy(drafter), target_tokenizer=tokenizer, drafter_tokenizer=drafter_tokenizer,
            config=configurations(args)[config_name],
        )  # fmt: skip
        before = evaluate(engine, evaluated, references, tokenizer, new, device, args.repeats, args.seed)
        serving, served_tokens, served_seconds, stream = GenerationStats(), 0, 0.0, []
        for n, text in enumerate(served * args.passes):
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            sample = dict(do_sample=True, temperature=1.0, top_k=0) if n % 2 else dict(do_sample=False)
            synchronize(device)
            began = time.perf_counter()
            engine.generate(ids, max_new_tokens=new, **sample)
            synchronize(device)
            served_seconds += time.perf_counter() - began
            serving.add(engine.last_stats)
            served_tokens += engine.last_stats.new_tokens
            stream.append(
                {
                    "sampled": bool(n % 2),
                    "acceptance": engine.last_stats.acceptance_rate,
                    "drafter_tokens_per_round": engine.last_stats.drafted_per_round,
                }
            )
        after = evaluate(engine, evaluated, references, tokenizer, new, device, args.repeats, args.seed)
        learner = engine.learner.stats if engine.learner is not None else None
        rows.append(
            {
                "drafter": drafter_name,
                "config": config_name,
                "before": before | {"speedup": before["tokens_per_second"] / plain},
                "after": after | {"speedup": after["tokens_per_second"] / plain},
                "serving": {
                    "requests": len(served) * args.passes,
                    "acceptance": serving.acceptance_rate,
                    "tokens_per_second": served_tokens / served_seconds,
                    "distill_steps": learner.distill_steps if learner else 0,
                    "head_steps": learner.head_steps if learner else 0,
                    "training_seconds": learner.seconds if learner else 0.0,
                    "seconds": served_seconds,
                    "stream": stream,
                },
            }
        )
        write_results(stem, result, markdown(), complete=False)

    write_results(stem, result, markdown(), complete=True)
    plot_stream(result, stem.with_suffix(".png"))


def plot_stream(result: dict, path: Path, window: int = 4) -> None:
    """Acceptance of each served request (a running mean over ``window`` requests), one panel per drafter
    and one line per learning configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return
    drafters = list(dict.fromkeys(row["drafter"] for row in result["rows"]))
    figure, axes = plt.subplots(1, len(drafters), figsize=(6.5 * len(drafters), 4.2), squeeze=False)
    for axis, drafter in zip(axes[0], drafters, strict=True):
        for row in (r for r in result["rows"] if r["drafter"] == drafter):
            values = [request["acceptance"] for request in row["serving"]["stream"]]
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                      for i in range(len(values))]  # fmt: skip
            axis.plot(range(1, len(values) + 1), smooth, label=row["config"])
        axis.set_xlabel("served request")
        axis.set_ylabel(f"acceptance (running mean of {window})")
        axis.set_title(f"{drafter} drafter, {result['environment']['device']}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
