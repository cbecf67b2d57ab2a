"""The quality-speed trade-off of speculative cascades: ``omnidraft-fast cascade-sweep``.

For a model pair and prompt set, it sweeps ``alpha`` for every deferral rule (``CascadeConfig``) and
measures, per point, in one process and on the same prompts as plain target decoding:

- deferral rate, acceptance, mean accepted length (engine stats);
- tokens/s and speed-up over plain ``model.generate()``;
- quality against the target, teacher-forced on the produced text: *agreement*, the share of produced
  tokens that are the target's own greedy choice after the same prefix (1 for exact decoding), and the
  target's mean log-likelihood per produced token; also *sequence agreement*, the share of positions equal
  to the target's free-running greedy output (one early difference changes everything after it).

Timing: each point is the faster of two runs, and plain decoding is re-timed before each rule, the
point's speed-up taken against it (the machine's speed drifts over a long sweep).

Decoding is greedy by default (the rules decide on the T=1 distributions, the output is deterministic and the
exact point, ``cascade=None``, reproduces the target, so agreement is 1 there); ``temperature > 0`` samples
(no top-k/top-p) instead, plain decoding then sampling too, and agreement stays measured against the
target's greedy choice, so it is below 1 even for exact speculative sampling; then each point also gets
``z`` (``omnidraft_fast.fidelity``), how far its tokens' likelihood under the target is from what sampling
from the target gives, in standard deviations (about 0 at the exact point). Writes JSON, Markdown and a
PNG (quality against speed-up, one curve per rule, the exact point marked) under ``--out``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import CascadeConfig, EngineConfig
from .engine import SpeculativeEngine
from .fidelity import TargetScore, score_against_target
from .report import provenance, synchronize
from .report import write_results as write_results_files

__all__ = ["ALPHAS", "run_sweep"]

# From exact (first) to lenient (last); see CascadeConfig for each rule's range.
ALPHAS = {
    "chow": (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
    "diff": (-1.0, -0.3, -0.2, -0.1, 0.0, 0.2, 1.0),
    "opt": (0.0, 0.1, 0.25, 0.5, 1.0, 4.0),
    "token_v1": (-1.0, -0.3, -0.2, -0.1, 0.0, 0.2, 1.0),
    "token_v2": (-0.5, 0.0, 0.02, 0.05, 0.1, 0.4, 1.0),
    "token_v3": (-0.5, 0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0),
    "lossy": (0.0, 0.3, 0.6, 0.9),  # greedy: q and p are one-hot, so lossy is exact at every alpha
}


def run_sweep(
    target, drafter, prompts: list[torch.Tensor], *, max_new_tokens: int, num_draft_tokens: int,
    rules: dict[str, tuple[float, ...]] = ALPHAS, temperature: float = 0.0, seed: int = 0,
    progress: Callable[[dict], None] | None = None, **engine_kwargs,
) -> dict:  # fmt: skip
    """Sweep every rule's alphas; ``prompts`` are [1, n] id tensors on the target's device; ``temperature``
    0 is greedy. ``progress`` is called with the sweep so far after each rule (the plain speed the one
    measured before that rule), so that a caller can write it out before a time limit cuts the run."""
    device = prompts[0].device
    new = max_new_tokens
    decoding = {"do_sample": False}
    if temperature > 0:
        decoding = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}

    def timed(run) -> tuple[list[torch.Tensor], float]:
        """Outputs and tokens/s of ``run`` over the prompts, the faster of two passes."""
        best = 0.0
        for _ in range(2):
            outputs, seconds = [], 0.0
            torch.manual_seed(seed)
            for ids in prompts:
                synchronize(device)
                began = time.perf_counter()
                outputs.append(run(ids))
                synchronize(device)
                seconds += time.perf_counter() - began
            tokens = sum(out.shape[1] - ids.shape[1] for out, ids in zip(outputs, prompts, strict=True))
            best = max(best, tokens / seconds)
        return outputs, best

    def plain_run(ids):
        return target.generate(ids, max_new_tokens=new, **decoding)

    plain = [target.generate(ids, max_new_tokens=new, do_sample=False) for ids in prompts]  # the reference
    own = TargetScore()
    for out, ids in zip(plain, prompts, strict=True):
        own += score_against_target(target, out, ids.shape[1])

    def sweep(plain_speed: float) -> dict:
        return {
            "decoding": "greedy" if temperature == 0 else f"sampling at T={temperature}",
            "plain_tokens_per_second": round(plain_speed, 2),
            "plain_target_log_likelihood": round(own.mean_log_likelihood, 4),
            "points": list(points),
        }

    engine = SpeculativeEngine(
        target, drafter, config=EngineConfig(num_draft_tokens=num_draft_tokens), **engine_kwargs
    )
    engine.generate(prompts[0], max_new_tokens=4)  # warm-up: bridge, caches

    points = []
    for rule, alphas in [("exact", (None,)), *rules.items()]:
        _, plain_speed = timed(plain_run)
        for alpha in alphas:
            cascade = None if alpha is None else CascadeConfig(rule, alpha)
            engine.stats = type(engine.stats)()
            outputs, speed = timed(
                lambda ids, c=cascade: engine.generate(ids, max_new_tokens=new, cascade=c, **decoding)
            )
            same, score = 0, TargetScore()
            for out, reference, ids in zip(outputs, plain, prompts, strict=True):
                width = ids.shape[1]
                overlap = min(out.shape[1], reference.shape[1]) - width
                same += int((out[0, width : width + overlap] == reference[0, width : width + overlap]).sum())
                score += score_against_target(target, out, width, temperature or 1.0)
            stats = engine.stats
            points.append(
                {
                    "rule": rule,
                    "alpha": alpha,
                    "deferral_rate": round(stats.deferral_rate, 4),
                    "acceptance": round(stats.acceptance_rate, 4),
                    "mean_accepted_length": round(stats.mean_accepted_length, 3),
                    "tokens_per_second": round(speed, 2),
                    "speedup": round(speed / plain_speed, 3),
                    "agreement": round(score.agreement, 4),
                    "sequence_agreement": round(same / max(score.tokens, 1), 4),
                    "target_log_likelihood": round(score.mean_log_likelihood, 4),
                    **({"z": round(score.z, 2)} if temperature > 0 else {}),
                }
            )
        if progress is not None:
            progress(sweep(plain_speed))
    return sweep(timed(plain_run)[1])


def best_points(points: list[dict], agreement: float = 0.99) -> dict[str, dict]:
    """Per rule, the fastest point whose agreement with the target is at least ``agreement``."""
    best: dict[str, dict] = {}
    for point in points:
        if point["agreement"] >= agreement and point["speedup"] > best.get(point["rule"], {}).get(
            "speedup", 0
        ):
            best[point["rule"]] = point
    return best


def write_results(results: dict, out: Path, stem: str, complete: bool = True) -> None:
    """``results``: {"meta": {...}, "pairs": {pair name: run_sweep(...)}} -> JSON and Markdown, written as
    ``report.write_results`` writes them (a partial write is marked so in both; the Markdown printed when
    complete), and a PNG when ``complete``."""
    meta = results["meta"]
    lines = [
        f"# Speculative cascades: quality against speed ({provenance(meta)})",
        "",
        f"Model pair: {meta['models']}; {meta['prompts']} held-out prompts, {meta['max_new_tokens']} new tokens, "
        f"k = {meta['k']}, {meta.get('decoding', 'greedy')}. Agreement: share of produced tokens that are the target's greedy choice "
        "after the same prefix; sequence agreement: share of positions equal to the target's own greedy output; "
        "log-lik: the target's mean log-probability per produced token (all three teacher-forced on the "
        "produced text); z (sampling only): the produced tokens' log-probability against what sampling from the "
        "target gives, in standard deviations (omnidraft_fast.fidelity; |z| > 4: not the target's law). "
        "Each point is the faster of two runs; plain decoding is re-timed before each rule.",
    ]
    for pair, sweep in results["pairs"].items():
        lines += [
            "",
            f"## {pair} (plain decoding {sweep['plain_tokens_per_second']} tok/s, "
            f"target log-lik of its own greedy output {sweep['plain_target_log_likelihood']})",
            "",
            "Fastest point per rule at >= 99% / >= 95% agreement (the exact points set the baseline):",
            "",
            "| rule | alpha at 99% | speed-up | deferral | alpha at 95% | speed-up | agreement | deferral |",
            "|---|---|---|---|---|---|---|---|",
        ]
        strict, loose = best_points(sweep["points"], 0.99), best_points(sweep["points"], 0.95)
        for rule, near in loose.items():  # every point at >= 99% is one at >= 95% too
            point = strict.get(rule)
            at_99 = (
                f"{point['alpha']} | {point['speedup']:.2f}x | {point['deferral_rate']:.3f}"
                if point is not None
                else "none | - | -"
            )
            lines.append(
                f"| {rule} | {at_99} | "
                f"{near['alpha']} | {near['speedup']:.2f}x | {near['agreement']:.3f} | {near['deferral_rate']:.3f} |"
            )
        sampled = "z" in sweep["points"][0]
        lines += [
            "",
            "| rule | alpha | deferral | acceptance | accepted len | tok/s | speed-up | agreement | sequence agreement "
            f"| log-lik |{' z |' if sampled else ''}",
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sampled else ""),
        ]
        for p in sweep["points"]:
            lines.append(
                f"| {p['rule']} | {p['alpha']} | {p['deferral_rate']} | {p['acceptance']} | "
                f"{p['mean_accepted_length']} | {p['tokens_per_second']} | {p['speedup']:.2f}x | "
                f"{p['agreement']} | {p['sequence_agreement']} | {p['target_log_likelihood']} |"
                + (f" {p['z']} |" if sampled else "")
            )
    write_results_files(out / stem, results, "\n".join(lines) + "\n", complete)
    if complete:
        _plot(results, out / f"{stem}.png")


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    pairs = results["pairs"]
    figure, axes = plt.subplots(2, len(pairs), figsize=(6.5 * len(pairs), 8), squeeze=False)
    for column, (pair, sweep) in enumerate(pairs.items()):
        for row, (key, label) in enumerate(
            (
                ("agreement", "agreement with the target's greedy output"),
                ("target_log_likelihood", "target log-lik / token"),
            )
        ):
            axis = axes[row][column]
            for rule in dict.fromkeys(p["rule"] for p in sweep["points"]):
                chosen = [p for p in sweep["points"] if p["rule"] == rule]
                if rule == "exact":
                    axis.scatter([chosen[0]["speedup"]], [chosen[0][key]], color="black", marker="*", s=150,
                                 zorder=5, label="exact SD")  # fmt: skip
                else:
                    axis.plot(
                        [p["speedup"] for p in chosen], [p[key] for p in chosen], marker="o", label=rule
                    )
            axis.set_xlabel("speed-up over plain generate()")
            axis.set_ylabel(label)
            axis.set_title(pair)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{results['meta']['device']}, {results['meta']['models']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")
