"""Time the scale shapes of EVALUATION.md: a Llama-3-8B-shaped target and a Llama-68M-shaped drafter.

Random bf16 weights (``--preset tiny``: float32), built from configs directly on the device. Measured in one process, batch 1:

- plain ``model.generate()`` (greedy), ms per token: ``(t(N tokens) - t(1 token)) / (N - 1)``, so the
  prefill is left out; and the same with transformers' static cache, whose decoding forward transformers
  compiles on CUDA (``torch.compile`` "reduce-overhead": CUDA graphs), the fair baseline for the captured
  engine (``--compiled``, on CUDA by default; off CUDA transformers does not compile it);
- the target's forward over ``k + 1`` tokens and over 1 token, and the drafter's one-token step, each at
  the prompt's context length in the engine's slot cache (median of ``--reps``), through ``lean.py``'s
  forward (what the engine runs) and through transformers' forward; the lean forward's also with each
  SDPA backend forced in turn (``torch.nn.attention.sdpa_kernel``; a backend that cannot take the engine's
  additive mask records its error): which backend torch picks is a fixed priority, and on the 2026-11-30
  H200 run it picked cuDNN, whose host time per call was the largest of any op in the eager round's profile;
- this engine (``SpeculativeEngine``), per drafter: ``shared`` (Llama-68M shape, the target's 128k
  vocabulary) and, when ``../shared/tokenizers`` is there, ``cross`` (Mistral's 32k vocabulary, real
  Llama-3 and Mistral tokenizers, so translation runs for real). With ``EngineConfig(time_stages=True)``:
  ms per round of each stage (draft, translate, target, verify, commit, learn, host); the engine's own
  overhead per round is the round minus the drafter's and the target's stages. ``round_ms`` is from
  untimed requests, as plain decoding is measured: (a request's wall time - that of a one-token request of
  the same engine) / (its rounds - that request's rounds), so its prefill is left out, the least over
  ``ENGINE_REPS`` requests of each kind (load on the machine only adds time); ``graph_round_ms`` the same
  for the first request with ``EngineConfig(cuda_graphs=True)`` (its first round eager and its second
  captured included); ``kept_graph_round_ms`` the same for the next requests of the same shapes, which
  replay the graphs the engine kept from its first, the projection's second speed-up column;
- online learning in flight (``DistillConfig()``: LoRA rank 32 on every projection of the drafter, and
  ``EngineConfig(in_flight_rounds=--in-flight-rounds)``), on a copy of the drafter: the learning step's
  time (``update`` stage, stage timing on, per step) and the round time with learning included, eager and
  with CUDA graphs (the step captured too; capture included, and for the next request of the same shapes,
  replaying the kept graphs), against the same engines without learning;
- with ``torch.profiler`` (on CUDA; ``--profile`` on the CPU too) a short request per drafter, summarised
  per stage from the ``stage:<name>`` ranges that ``StageTimer`` emits, plus the top ops (``--trace PATH``
  also writes the Chrome trace).

**Projection, not a measurement.** Random weights accept nothing, so every round emits one token; a
round's work does not depend on acceptance (fixed shapes). The projected speed-up for an i.i.d.
acceptance rate ``a`` and ``k`` drafts per round is

    tokens per round E(a) = (1 - a^(k+1)) / (1 - a)        (k + 1 when a = 1)
    projected speed-up    = E(a) / round_ms * plain_ms_per_token
    (with kept CUDA graphs: kept_graph_round_ms; against compiled plain decoding: plain_static_ms_per_token)

Written as ``scale-<device>.json`` and ``.md`` under ``--out``, also after the plain decoding and forward
times and after each drafter, marked partial, so that a run cut short keeps what it measured.

    python benchmarks/scale.py [--preset llama3-8b|tiny] [--k 4] [--acceptance 0.4 0.6 0.8] [--reps N]
                               [--new-tokens N] [--in-flight-rounds 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from omnidraft_fast import DistillConfig, EngineConfig, GenerationStats, SpeculativeEngine
from omnidraft_fast.models import CausalLM
from omnidraft_fast.report import environment, error_line, provenance, synchronize, write_results
from omnidraft_fast.zoo.train import ModelSpec, llama_model
from omnidraft_fast.zoo.train_bench import DRAFTER_68M, TOKENIZERS, VOCABS


@dataclass(frozen=True)
class Preset:
    target: ModelSpec
    drafter: ModelSpec
    prompt: int  # prompt tokens: the context length of every timed forward
    new_tokens: int
    reps: int
    dtype: torch.dtype = torch.bfloat16


PRESETS = {
    "llama3-8b": Preset(
        target=ModelSpec(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, tied=False),
        drafter=DRAFTER_68M, prompt=512, new_tokens=128, reps=20,
    ),
    "tiny": Preset(  # a CPU check in seconds: the vocabularies stay real, the rest shrinks
        target=ModelSpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, tied=False),
        drafter=ModelSpec(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, tied=False),
        prompt=16, new_tokens=8, reps=2, dtype=torch.float32,  # bf16 matmuls are slow on CPUs
    ),
}  # fmt: skip


def tokens_per_round(acceptance: float, k: int) -> float:
    """Expected tokens per round with ``k`` drafts, each accepted i.i.d. with probability ``acceptance``."""
    if acceptance == 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


def _median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


ENGINE_REPS = 3  # each engine's round time is the least over this many requests: load only adds time

_SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _per_sdpa_backend(timed) -> dict[str, float | str]:
    """``timed()`` (ms) with each SDPA backend forced in turn, by backend name; an error line where the
    backend cannot run the call (no kernel for the device, the dtype or the mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    result = {}
    for name in _SDPA_BACKENDS:
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                result[name.lower()] = timed()
        except RuntimeError as error:
            result[name.lower()] = error_line(error)
    return result


def _forward_ms(model, ids: torch.Tensor, n: int, reps: int, lean: bool = True) -> float:
    """One forward of ``n`` tokens written after ``ids`` [1, prompt] in the slot cache (rewritten each rep);
    ``lean=False``: through transformers' forward rather than ``lean.py``'s."""
    lm, prompt = CausalLM(model, "model", lean=lean), ids.shape[1]
    lm.begin(torch.zeros(1, dtype=torch.int64, device=ids.device), prompt + n)
    slots = torch.arange(prompt + n, device=ids.device)[None]  # [1, prompt + n]
    lm.forward(ids, slots[:, :prompt], last_only=True)
    try:
        return _median_ms(lambda: lm.forward(ids[:, -n:], slots[:, prompt:]), ids.device, reps)
    finally:
        lm.end()


def _engine(
    target,
    drafter,
    ids,
    *,
    k: int,
    new: int,
    tokenizers,
    acceptance,
    plain_ms,
    static_ms,
    profile,
    in_flight: int,
) -> dict:
    """Stage times per round, round time, overhead, the projection, learning in flight and (``profile``)
    the profiler summary."""
    learner = copy.deepcopy(drafter)  # the LoRA adapter goes into this copy, not into the plain drafter
    configs = {
        "timed": ({"time_stages": True}, drafter),
        "untimed": ({"time_stages": False}, drafter),
        "graphs": ({"cuda_graphs": True}, drafter),
        "learning timed": (
            {"time_stages": True, "distill": DistillConfig(), "in_flight_rounds": in_flight},
            learner,
        ),
        "learning": (
            {"time_stages": False, "distill": DistillConfig(), "in_flight_rounds": in_flight},
            learner,
        ),
        "learning graphs": (
            {"cuda_graphs": True, "distill": DistillConfig(), "in_flight_rounds": in_flight},
            learner,
        ),
    }
    engines = {
        mode: SpeculativeEngine(target, model, config=EngineConfig(num_draft_tokens=k, **config),
                                target_tokenizer=tokenizers[0], drafter_tokenizer=tokenizers[1])
        for mode, (config, model) in configs.items()
    }  # fmt: skip
    one, first, kept = {}, {}, {}  # per engine: one-token requests, the first request of N, the next ones
    for mode, engine in engines.items():
        engine.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: bridge, kernels
        one[mode] = min(_requests(engine, ids, 1, ENGINE_REPS), key=lambda stats: stats.seconds)
        engine.stats = GenerationStats()
        engine.generate(ids, max_new_tokens=new, do_sample=False)
        first[mode] = engine.stats
    for mode in ("untimed", "graphs", "learning", "learning graphs"):  # the same shapes again: graphs replay
        kept[mode] = _requests(engines[mode], ids, new, ENGINE_REPS)

    def per_round(requests: list[GenerationStats], mode: str) -> float:
        """ms per round of ``mode``'s engine, as plain decoding is measured: (t(N) - t(1)) / (rounds(N) -
        rounds(1)), t(1) the least of that engine's one-token requests; the least over ``requests``."""
        return min(
            1e3 * (stats.seconds - one[mode].seconds) / (stats.rounds - one[mode].rounds)
            for stats in requests
        )

    timed, learning_timed = first["timed"], first["learning timed"]
    steps = learning_timed.rounds // in_flight  # in-flight steps of the timed request
    stage_ms = {
        stage: 1e3 * s / timed.rounds for stage, s in timed.stage_seconds.items() if stage != "prefill"
    }
    round_ms = per_round([first["untimed"], *kept["untimed"]], "untimed")
    graph_round_ms = per_round([first["graphs"]], "graphs")  # its capture included
    kept_graph_round_ms = per_round(kept["graphs"], "graphs")
    result = {
        "drafter_params": sum(p.numel() for p in drafter.parameters()),
        "drafter_vocab": drafter.config.vocab_size,
        "drafter_step_ms": _forward_ms(drafter, _ids(drafter, ids), 1, 5),
        "drafter_step_ms_transformers_forward": _forward_ms(drafter, _ids(drafter, ids), 1, 5, lean=False),
        "drafter_step_ms_per_sdpa_backend": _per_sdpa_backend(lambda: _forward_ms(drafter, _ids(drafter, ids), 1, 5)),
        "rounds": first["untimed"].rounds,
        "measured_acceptance": first["untimed"].acceptance_rate,
        "stage_ms_per_round": stage_ms,
        "timed_round_ms": sum(stage_ms.values()),
        "overhead_ms_per_round": sum(v for s, v in stage_ms.items() if s not in ("draft", "target")),
        "round_ms": round_ms,
        "graph_round_ms": graph_round_ms,
        "kept_graph_round_ms": kept_graph_round_ms,
        "in_flight": {
            "rounds_per_step": in_flight,
            "lora_parameters": sum(p.numel() for p in engines["learning"].learner.adapter.parameters),
            "window_slots": in_flight * engines["learning"].rounds.slots_per_round(k),
            "update_ms_per_step": 1e3 * learning_timed.stage_seconds.get("update", 0.0) / max(1, steps),
            "round_ms": per_round([first["learning"], *kept["learning"]], "learning"),
            "graph_round_ms": per_round([first["learning graphs"]], "learning graphs"),
            "kept_graph_round_ms": per_round(kept["learning graphs"], "learning graphs"),
        },
        "projection": [
            {"acceptance": a, "tokens_per_round": tokens_per_round(a, k),
             "ms_per_token": round_ms / tokens_per_round(a, k),
             "speedup": tokens_per_round(a, k) / round_ms * plain_ms,
             "speedup_graphs": tokens_per_round(a, k) / kept_graph_round_ms * plain_ms,
             **({} if static_ms is None else
                {"speedup_graphs_vs_static": tokens_per_round(a, k) / kept_graph_round_ms * static_ms})}
            for a in acceptance
        ],
    }  # fmt: skip
    if profile:
        result["profile"] = _profile(engines["timed"], ids, min(new, 16), profile)
    return result


def _requests(engine: SpeculativeEngine, ids: torch.Tensor, new: int, n: int) -> list[GenerationStats]:
    """The statistics of ``n`` greedy requests of ``new`` tokens, one by one."""
    requests = []
    for _ in range(n):
        engine.generate(ids, max_new_tokens=new, do_sample=False)
        requests.append(engine.last_stats)
    return requests


def _ids(model, like: torch.Tensor) -> torch.Tensor:
    """Random ids of ``model``'s vocabulary, shaped like ``like``."""
    return torch.randint(0, model.config.vocab_size, like.shape, device=like.device)


def _profile(engine: SpeculativeEngine, ids: torch.Tensor, new: int, options: dict) -> dict:
    """One request under ``torch.profiler``: time per round of every ``stage:<name>`` range, their sums
    beside the request's own round time (its wall time less its prefill, per round), the top ops."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.device.type == "cuda"
    engine.stats = GenerationStats()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        engine.generate(ids, max_new_tokens=new, do_sample=False)
    if options["trace"] is not None:
        prof.export_chrome_trace(str(options["trace"].with_suffix(f".{options['pair']}.json")))
    stats = engine.stats
    averages = prof.key_averages()
    stages = _stage_times(averages, stats.rounds)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {
        "rounds": stats.rounds,
        "round_ms": 1e3 * (stats.seconds - stats.stage_seconds["prefill"]) / stats.rounds,
        "stages": stages,
        "stage_sum_ms_per_round": {  # every stage of a round: the prefill is not one
            column: sum(
                times[f"{column}_ms_per_round"] for stage, times in stages.items() if stage != "prefill"
            )
            for column in ("cpu", "device")
        },
        "top_ops": averages.table(sort_by=sort, row_limit=25),
    }


def _stage_times(averages, rounds: int) -> dict[str, dict]:
    """Calls and ms per round of each ``stage:<name>`` range in ``key_averages()``. On CUDA a range has two
    entries under its name: the host's (device type CPU), whose ``cpu_time_total`` is the range's host time
    and ``device_time_total`` the time of the kernels launched inside it, and a GPU annotation spanning its
    first kernel's start to its last one's end, idle gaps included; only the host's is kept."""
    from torch.autograd import DeviceType

    return {
        event.key.removeprefix("stage:"): {
            "calls": event.count,
            "cpu_ms_per_round": event.cpu_time_total / 1e3 / rounds,
            "device_ms_per_round": event.device_time_total / 1e3 / rounds,
        }
        for event in averages
        if event.key.startswith("stage:") and event.device_type == DeviceType.CPU
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=tuple(PRESETS), default="llama3-8b")
    parser.add_argument("--k", type=int, default=4, help="draft length")
    parser.add_argument("--acceptance", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    parser.add_argument("--tokenizers", type=Path, default=TOKENIZERS)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.profiler summary per stage (default: on CUDA only)")  # fmt: skip
    parser.add_argument("--trace", type=Path, default=None, help="also write Chrome traces next to this path")
    parser.add_argument("--reps", type=int, default=None, help="timing repetitions (default: the preset's)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens per request (default: the preset's)"
    )
    parser.add_argument(
        "--in-flight-rounds", type=int, default=4, help="rounds between in-flight learning steps"
    )
    parser.add_argument(
        "--compiled", choices=("auto", "on", "off"), default="auto",
        help="also time plain decoding with transformers' static cache, compiled on CUDA (auto: on CUDA)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if any(not 0.0 <= a <= 1.0 for a in args.acceptance):
        parser.error(f"--acceptance values must be in [0, 1], got {args.acceptance}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset, k = PRESETS[args.preset], args.k
    reps = preset.reps if args.reps is None else args.reps
    new = preset.new_tokens if args.new_tokens is None else args.new_tokens
    if reps < 1 or new < 2:
        parser.error(f"--reps must be >= 1 and --new-tokens >= 2, got {reps} and {new}")
    if args.in_flight_rounds < 1:
        parser.error(f"--in-flight-rounds must be >= 1, got {args.in_flight_rounds}")
    profile = device.type == "cuda" if args.profile is None else args.profile
    vocab = VOCABS["llama3"]

    tokenizers = {"shared": (None, None)}
    if all((args.tokenizers / name).is_dir() for name in ("llama3", "mistral")):
        from transformers import AutoTokenizer

        tokenizers["cross"] = tuple(
            AutoTokenizer.from_pretrained(args.tokenizers / n) for n in ("llama3", "mistral")
        )
    else:
        print(
            f"no llama3/mistral tokenizers under {args.tokenizers}: the cross-vocabulary drafter is left out"
        )
    with torch.device(device):
        target = llama_model(preset.target, vocab, None, None, args.seed, preset.dtype).eval()
    ordinary = min(tokenizers["cross"][0].all_special_ids) if "cross" in tokenizers else vocab
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, ordinary, (1, preset.prompt), generator=generator).to(device)  # [1, prompt]

    plain = {n: _median_ms(lambda n=n: target.generate(ids, attention_mask=torch.ones_like(ids),
                                                           max_new_tokens=n, do_sample=False), device, reps)
             for n in (1, new)}  # fmt: skip
    plain_ms = (plain[new] - plain[1]) / (new - 1)
    static_ms, static_error = None, None
    if args.compiled == "on" or (args.compiled == "auto" and device.type == "cuda"):
        # The longest request first: transformers sizes the static cache once for both (no recompilation).
        try:
            static = {n: _median_ms(lambda n=n: target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                                 do_sample=False, cache_implementation="static"), device, reps)
                      for n in (new, 1)}  # fmt: skip
            static_ms = (static[new] - static[1]) / (new - 1)
        except Exception as error:  # torch.compile fails in many ways: say so, go on without the baseline
            static_error = error_line(error)
    result = {
        **environment(device),
        "preset": args.preset,
        "shapes": {"target": asdict(preset.target), "drafter": asdict(preset.drafter)},
        "target_params": sum(p.numel() for p in target.parameters()),
        "target_vocab": vocab,
        "dtype": str(preset.dtype).removeprefix("torch."),
        "batch": 1,
        "prompt_tokens": preset.prompt,
        "new_tokens": new,
        "reps": reps,
        "k": k,
        "plain_ms_per_token": plain_ms,
        "plain_static_ms_per_token": static_ms,
        "plain_static_compiled": static_ms is not None and device.type == "cuda",
        "plain_static_error": static_error,
        "target_forward_ms": {
            f"{k + 1} tokens": _forward_ms(target, ids, k + 1, reps),
            "1 token": _forward_ms(target, ids, 1, reps),
            f"{k + 1} tokens, transformers forward": _forward_ms(target, ids, k + 1, reps, lean=False),
            "1 token, transformers forward": _forward_ms(target, ids, 1, reps, lean=False),
        },
        "target_forward_ms_per_sdpa_backend": {
            f"{k + 1} tokens": _per_sdpa_backend(lambda: _forward_ms(target, ids, k + 1, reps)),
            "1 token": _per_sdpa_backend(lambda: _forward_ms(target, ids, 1, reps)),
        },
        "projection_formula": "speedup(a) = E(a) / round_ms * plain_ms_per_token, E(a) = (1 - a^(k+1)) / (1 - a)",
        "pairs": {},
    }
    stem = args.out / f"scale-{device.type}"
    write_results(stem, result, _markdown(result), complete=False)  # then after each pair
    for index, (pair, pair_tokenizers) in enumerate(tokenizers.items()):
        with torch.device(device):
            drafter = llama_model(preset.drafter, VOCABS["mistral"] if pair == "cross" else vocab, None, None,
                                  args.seed + 1 + index, preset.dtype).eval()  # fmt: skip
        result["pairs"][pair] = _engine(
            target, drafter, ids, k=k, new=new, tokenizers=pair_tokenizers, acceptance=args.acceptance,
            plain_ms=plain_ms, static_ms=static_ms, profile={"trace": args.trace, "pair": pair} if profile else None,
            in_flight=args.in_flight_rounds,
        )  # fmt: skip
        del drafter
        write_results(stem, result, _markdown(result), complete=False)
    write_results(stem, result, _markdown(result), complete=True)


def _backends(times: dict[str, float | str]) -> str:
    return ", ".join(
        f"{name} {ms:.2f} ms" if isinstance(ms, float) else f"{name} n/a" for name, ms in times.items()
    )


def _markdown(result: dict) -> str:
    k = result["k"]
    forward = ", ".join(f"{n} {ms:.2f} ms" for n, ms in result["target_forward_ms"].items())
    lines = [
        f"# Scale shapes, preset {result['preset']} ({provenance(result)})",
        "",
        f"Random {result['dtype']} weights, batch 1, prompt {result['prompt_tokens']} tokens, "
        f"{result['new_tokens']} new tokens, k = {k}. Target {result['target_params'] / 1e9:.2f} B parameters "
        f"({result['shapes']['target']}, vocabulary {result['target_vocab']}); drafter {result['shapes']['drafter']}.",
        "",
        f"- plain `model.generate()`: **{result['plain_ms_per_token']:.2f} ms per token** (prefill excluded)",
        *(
            [
                f'- plain `model.generate(cache_implementation="static")`'
                f"{', compiled by transformers' if result['plain_static_compiled'] else ' (not compiled off CUDA)'}: "
                f"**{result['plain_static_ms_per_token']:.2f} ms per token**"
            ]
            if result["plain_static_ms_per_token"] is not None
            else []
        ),
        *(
            [f"- plain decoding with the static cache failed: {result['plain_static_error']}"]
            if result.get("plain_static_error")
            else []
        ),
        f"- target forward at the prompt's length: {forward}",
        *(
            f"- the same, {n}, with one SDPA backend forced: {_backends(times)}"
            for n, times in result["target_forward_ms_per_sdpa_backend"].items()
        ),
    ]
    static_column = (
        ""
        if result["plain_static_ms_per_token"] is None
        else " with kept CUDA graphs, over static-cache plain decoding |"
    )
    for pair, row in result["pairs"].items():
        stages = row["stage_ms_per_round"]
        lines += [
            "",
            f"## Drafter `{pair}` (vocabulary {row['drafter_vocab']}, {row['drafter_params'] / 1e6:.0f} M parameters)",
            "",
            f"Drafter step {row['drafter_step_ms']:.2f} ms ({row['drafter_step_ms_transformers_forward']:.2f} ms "
            f"through transformers' forward; with one SDPA backend forced: "
            f"{_backends(row['drafter_step_ms_per_sdpa_backend'])}). Round {row['round_ms']:.2f} ms untimed "
            f"({row['timed_round_ms']:.2f} ms with stage timing); the engine's own overhead "
            f"{row['overhead_ms_per_round']:.2f} ms per round (every stage but draft and target). With "
            f"`cuda_graphs=True`: {row['graph_round_ms']:.2f} ms per round, capture included; "
            f"{row['kept_graph_round_ms']:.2f} ms for the next request, replaying the kept graphs.",
            "",
            f"| ms per round | {' | '.join(stages)} | sum |",
            "|---|" + "---|" * (len(stages) + 1),
            f"| stage timer (synchronising) | {' | '.join(f'{v:.3f}' for v in stages.values())} "
            f"| {row['timed_round_ms']:.3f} |",
        ]
        if "profile" in row:
            profile = row["profile"]
            for column in ("cpu", "device"):
                times = {s: t[f"{column}_ms_per_round"] for s, t in profile["stages"].items()}
                if not any(times.values()):
                    continue  # no device activity: a CPU run
                cells = " | ".join(f"{times[s]:.3f}" if s in times else "-" for s in stages)
                lines.append(
                    f"| profiler, {column} | {cells} | {profile['stage_sum_ms_per_round'][column]:.3f} |"
                )
            sums = profile["stage_sum_ms_per_round"]
            device = f", their kernels' device time to {sums['device']:.2f} ms" if sums["device"] else ""
            lines += [
                "",
                f"Under the profiler a round took {profile['round_ms']:.2f} ms (wall, prefill excluded; "
                f"{profile['rounds']} rounds); its stages' host time sums to {sums['cpu']:.2f} ms{device}.",
            ]
        learning = row["in_flight"]
        lines += [
            "",
            f"Learning in flight (LoRA rank 32, {learning['lora_parameters'] / 1e6:.2f} M parameters, a step every "
            f"{learning['rounds_per_step']} rounds on a window of {learning['window_slots']} drafter slots per row): "
            f"{learning['update_ms_per_step']:.2f} ms per step with stage timing; rounds of "
            f"{learning['round_ms']:.2f} ms eager, {learning['graph_round_ms']:.2f} ms with CUDA graphs and "
            f"{learning['kept_graph_round_ms']:.2f} ms with kept ones, the steps included (without learning: "
            f"{row['round_ms']:.2f}, {row['graph_round_ms']:.2f} and {row['kept_graph_round_ms']:.2f} ms).",
        ]
        lines += [
            "",
            f"**Projection** (not a measurement: random weights accept nothing, measured acceptance "
            f"{row['measured_acceptance']:.3f}): {result['projection_formula']}, i.i.d. acceptance a, k = {k}.",
            "",
            "| acceptance a | tokens per round E(a) | ms per token | projected speed-up | with kept CUDA graphs "
            f"|{static_column}",
            "|---|---|---|---|---|" + ("---|" if static_column else ""),
            *(f"| {p['acceptance']} | {p['tokens_per_round']:.3f} | {p['ms_per_token']:.2f} | {p['speedup']:.2f}x "
              f"| {p['speedup_graphs']:.2f}x |"
              + (f" {p['speedup_graphs_vs_static']:.2f}x |" if static_column else "") for p in row["projection"]),
        ]  # fmt: skip
        if "profile" in row:
            lines += ["", "Top ops under the profiler:", "", "```", row["profile"]["top_ops"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
