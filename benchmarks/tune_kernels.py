"""Tile sweep and per-kernel device times of the sampling and verification kernels at the goal shapes.

One process, CUDA only (the next tuning step of ``benchmarks/TUNING.md``): for sampling at [72, 128256]
bf16 (greedy, temperature, top-p, top-k + top-p; greedy and temperature also drawing the ids alone, as
draft steps verified by exact match do), verification at [8 x 9, 128256] bf16 (the rule mix of
``bench_verify.py``, its inputs, with and without top-k/top-p) and verification by exact match at the same
shape (``bench_match.py``'s inputs, greedy and at T = 0.8), the median time of the Triton launcher at each
``block`` (the vocabulary tile) beside the eager reference and a device-to-device copy of the logits, both
replayed from a CUDA graph (device time) and launched back to back with no cache flush between calls (the
host's launch time shows where it exceeds the device's), every call on one of 4 input sets in turn
(together larger than the L2 cache); then each kernel's device time per call under ``torch.profiler`` at
the default tile, the sets in turn too.

    python benchmarks/tune_kernels.py --out DIR      # writes DIR/tune-<device>.{json,md}
    python benchmarks/tune_kernels.py --out DIR --only top_p top-p     # the cases with a threshold search
    python benchmarks/tune_kernels.py --out DIR --programs 2 4 8 16 --pass-warps 8 16 --caps-off

``--programs`` times the cases without a threshold search at the default tile with each number of programs
per SM their passes aim at (``rows.PROGRAMS_PER_SM``), ``--pass-warps`` the cases with one at each most warps
a threshold pass takes (``thresholds.PASS_WARPS``): how many warps an SM keeps in flight, which
``benchmarks/kernel_resources.py`` reports from the compiled kernels; ``--caps-off`` times every case once
more without the launches' register caps (``CAPS``: ptxas's ``maxnreg``, which sets how many programs an SM
holds at once).

The two files are written after each case too, marked partial, so that a run cut short keeps its cases.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
from pathlib import Path

import torch
import triton
from bench_match import match_bytes, match_inputs
from bench_sampling import sampling_bytes, sampling_inputs
from bench_verify import TEMPERATURE, held_rules, verify_bytes, verify_inputs
from kernel_resources import setting
from omnidraft_fast.kernels import rows, sampling, thresholds, verify
from omnidraft_fast.kernels.match import match_reference, match_triton
from omnidraft_fast.kernels.sampling import sample_reference, sample_triton
from omnidraft_fast.kernels.verify import verify_reference, verify_triton

from omnidraft_fast.report import environment, provenance, write_results

ROWS, VOCAB = 72, 128256
BATCH, K = 8, 8
BLOCKS = (1024, 2048, 4096)
# The tile the engine runs per op (the launchers' default): the per-kernel times are taken there.
SHIPPED = {
    op: inspect.signature(launcher).parameters["block"].default
    for op, launcher in (("sample", sample_triton), ("verify", verify_triton), ("match", match_triton))
}
SETS = 4  # input sets per case, 4 x 18.5 MB of logits > the 50 MB L2 of an H200
SAMPLING = {  # name: (temperature, top_k, top_p, probs); probs False: the ids alone (exact-match draft steps)
    "greedy": (0.0, 0, 1.0, True),
    "greedy_ids": (0.0, 0, 1.0, False),
    "temperature": (0.8, 0, 1.0, True),
    "temperature_ids": (0.8, 0, 1.0, False),
    "top_p": (0.8, 0, 0.9, True),
    "top_k_top_p": (0.8, 50, 0.95, True),
}
VERIFY = {"rule mix": (0, 1.0), "rule mix, top-k 50 + top-p 0.95": (50, 0.95)}  # name: (top_k, top_p)
MATCH = {"greedy": 0.0, "temperature": 0.8}  # verification by exact match; name: temperature


def _times(fn, sets: list) -> dict[str, float | None]:
    """Median microseconds per call of ``fn(*one of sets)``, the sets taken in turn: ``stream``, calls
    launched back to back (``_stream_us``: the host's launch time shows where it exceeds the device's), and
    ``graph``, the same calls replayed from a CUDA graph (device time: what a captured round pays); None
    where the calls cannot be captured."""
    stream = _stream_us(fn, sets)
    try:
        graph = triton.testing.do_bench_cudagraph(
            lambda: [fn(*s) for s in sets], rep=100, return_mode="median"
        )
        graph = 1e3 * graph / len(sets)
    except Exception as error:  # e.g. a host sync in a reference: no graph time
        print(f"no CUDA graph time: {error}", flush=True)
        graph = None
    return {"stream": round(stream, 2), "graph": None if graph is None else round(graph, 2)}


def _stream_us(fn, sets: list, calls: int = 4 * SETS, reps: int = 10) -> float:
    """Median over ``reps`` timings of microseconds per call of ``calls`` calls launched back to back, the
    sets taken in turn, between two events. No cache flush between calls (``triton.testing.do_bench``
    flushes a 256 MB buffer before each, which hides the next call's launches behind the memset): where the
    host launches slower than the device runs, the device waits and the time is the host's."""
    for args in sets:  # warm-up: compilation, the caching allocator
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in range(calls):
            fn(*sets[call % len(sets)])
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    return statistics.median(times)


def _sampling_sets(temperature: float) -> list:
    sets = [sampling_inputs(ROWS, VOCAB, seed) for seed in range(SETS)]
    return [(logits, None if temperature == 0.0 else noise) for logits, noise in sets]


def _verify_sets() -> list:  # (logits, draft_ids, probs, uniforms, noise, rule, alpha) per set
    return [verify_inputs(BATCH, K, VOCAB, cross_vocab=False, seed=seed)[:7] for seed in range(SETS)]


def _kernel_times(fn, sets: list, calls: int = 3 * SETS) -> dict[str, dict]:
    """Device microseconds per call of each kernel ``fn(*one of sets)`` launches (``per_kernel``: summed
    over its launches), the sets taken in turn as in ``_times``, so that the inputs are not left in the L2
    cache; and, for a kernel a call launches more than once, each launch's (``per_launch``, below)."""
    fn(*sets[0])
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for call in range(calls):
            fn(*sets[call % len(sets)])
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in profile.key_averages():
        total = getattr(event, "self_device_time_total", None)
        if total is None:
            total = event.self_cuda_time_total
        if total > 0:
            times[event.key] = round(total / calls, 2)
    kernels = sorted(
        (event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda event: event.time_range.start,
    )
    launches = [(event.name, event.time_range.elapsed_us()) for event in kernels]
    return {
        "per_kernel": dict(sorted(times.items(), key=lambda item: -item[1])),
        "per_launch": launch_sequence(launches, calls),
    }


def launch_sequence(launches: list[tuple[str, float]], calls: int) -> dict[str, list[float]]:
    """The median device microseconds of each kernel's i-th launch within a call, for the kernels a call
    launches more than once (the threshold search's passes: which of them read the logits, and at what
    cost), from ``launches``, (kernel, microseconds) in launch order over ``calls`` identical calls. A
    kernel whose launches do not divide evenly over the calls is left out, not guessed at."""
    by_kernel: dict[str, list[float]] = {}
    for kernel, us in launches:
        by_kernel.setdefault(kernel, []).append(us)
    sequence = {}
    for kernel, times in by_kernel.items():
        per_call, rest = divmod(len(times), calls)
        if per_call > 1 and rest == 0:
            sequence[kernel] = [round(statistics.median(times[i::per_call]), 2) for i in range(per_call)]
    return sequence


# The register caps of the kernels' launches (ptxas's maxnreg), which ``--caps-off`` lifts all at once.
CAPS = ((thresholds, "PASS_MAXNREG"), (sampling, "PROBS_MAXNREG"), (verify, "DRAW_MAXNREG"),
        (verify, "CROSS_SUMS_MAXNREG"))  # fmt: skip


def _launch_sweep(
    fn, sets: list, filtered: bool, programs: list[int], pass_warps: list[int], caps_off: bool
) -> dict:
    """``fn``'s times at each programs per SM (a case without a threshold search) or each most warps of a
    threshold pass (a case with one), keyed ``programs N`` / ``pass warps N``, and with every register cap
    lifted (``caps off``)."""
    module, name, values, label = (
        (thresholds, "PASS_WARPS", pass_warps, "pass warps") if filtered else
        (rows, "PROGRAMS_PER_SM", programs, "programs")
    )  # fmt: skip
    times = {}
    for value in values:
        with setting(module, name, value):
            times[f"{label} {value}"] = _times(fn, sets)
    if caps_off:
        with contextlib.ExitStack() as lifted:
            for cap_module, cap in CAPS:
                lifted.enter_context(setting(cap_module, cap, None))
            times["caps off"] = _times(fn, sets)
    return times


def _copy_times(sets: list) -> dict[str, float | None]:
    """A device-to-device copy of the logits, the bandwidth yardstick."""
    return _times(lambda x, o: o.copy_(x), [(s[0], torch.empty_like(s[0])) for s in sets])


def _print_case(op: str, name: str, case: dict) -> None:
    skip = ("per_kernel", "per_launch")
    print(op, name, {k: v for k, v in case.items() if isinstance(v, dict) and k not in skip}, flush=True)


def _sampling_case(temperature: float, top_k: int, top_p: float, probs: bool, sweep: dict) -> dict:
    sets = _sampling_sets(temperature)

    def triton_(logits, noise, block=SHIPPED["sample"]):
        return sample_triton(logits, noise, temperature, top_k, top_p, probs=probs, block=block)

    logits, noise = sets[0]
    case = {
        "bytes_moved": sampling_bytes(logits, noise, probs),
        "copy_bytes": 2 * logits.numel() * logits.element_size(),
        "copy": _copy_times(sets),
        "eager": _times(lambda x, e: sample_reference(x, e, temperature, top_k, top_p, probs=probs), sets),
    }
    for block in BLOCKS:
        case[f"triton {block}"] = _times(lambda x, e, b=block: triton_(x, e, b), sets)
    case["launch"] = _launch_sweep(triton_, sets, top_k > 0 or top_p < 1.0, **sweep)
    case.update(_kernel_times(triton_, sets))
    return case


def _match_case(temperature: float, sweep: dict) -> dict:
    sets = [match_inputs(BATCH, K, VOCAB, temperature, seed) for seed in range(SETS)]

    def triton_(logits, draft_ids, noise, block=SHIPPED["match"]):
        return match_triton(logits, draft_ids, noise, temperature, 0, 1.0, block=block)

    logits, _, noise = sets[0]
    case = {
        "bytes_moved": match_bytes(logits, noise),
        "copy_bytes": 2 * logits.numel() * logits.element_size(),
        "copy": _copy_times(sets),
        "eager": _times(lambda x, d, e: match_reference(x, d, e, temperature, 0, 1.0), sets),
    }
    for block in BLOCKS:
        case[f"triton {block}"] = _times(lambda x, d, e, b=block: triton_(x, d, e, b), sets)
    case["launch"] = _launch_sweep(triton_, sets, False, **sweep)
    case.update(_kernel_times(triton_, sets))
    return case


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="TEXT",
        help="run only the cases whose name holds one of these (e.g. 'top-p' 'top_p': the threshold search)",
    )
    for flag, text in (
        (
            "--programs",
            "programs per SM to time the cases without a threshold search at (rows.PROGRAMS_PER_SM)",
        ),
        (
            "--pass-warps",
            "most warps of a threshold pass to time the cases with one at (thresholds.PASS_WARPS)",
        ),
    ):
        parser.add_argument(flag, nargs="*", type=int, default=[], metavar="N", help=text)
    parser.add_argument(
        "--caps-off",
        action="store_true",
        help="time every case once more with the launches' register caps lifted (tune_kernels.CAPS)",
    )
    args = parser.parse_args(argv)
    sweep = {"programs": args.programs, "pass_warps": args.pass_warps, "caps_off": args.caps_off}

    def wanted(key: str) -> bool:
        return not args.only or any(text in key for text in args.only)

    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels.py needs a CUDA device")
    device = torch.cuda.get_device_name()
    # date, device, torch/triton/transformers/CUDA versions and the commit, as every other results file has
    result: dict = {**environment(torch.device("cuda")), "cases": {}}
    stem = args.out / f"tune-{device.lower().replace(' ', '-')}"

    def add(op: str, name: str, key: str, case: dict) -> None:
        """Keep ``case`` and write the results so far: a run cut short keeps the cases it measured."""
        result["cases"][key] = {"block": SHIPPED[op], **case}  # the tile the engine runs (kernel_report.py)
        _print_case(op, name, case)
        write_results(stem, result, _markdown(result), complete=False)

    for name, (temperature, top_k, top_p, probs) in SAMPLING.items():
        if wanted(key := f"sample {name} [{ROWS}, {VOCAB}]"):
            add("sample", name, key, _sampling_case(temperature, top_k, top_p, probs, sweep))

    verifications = {name: case for name, case in VERIFY.items() if wanted(f"verify {name}")}
    sets = _verify_sets() if verifications else []
    copy = _copy_times(sets) if verifications else {}
    for name, (top_k, top_p) in verifications.items():

        def verify(
            logits,
            draft,
            probs,
            uniforms,
            noise,
            rule,
            alpha,
            block=SHIPPED["verify"],
            top_k=top_k,
            top_p=top_p,
        ):
            return verify_triton(
                logits,
                draft,
                probs,
                None,
                uniforms,
                noise,
                rule,
                alpha,
                TEMPERATURE,
                top_k,
                top_p,
                block=block,
            )

        def reference(logits, draft, probs, uniforms, noise, rule, alpha, top_k=top_k, top_p=top_p):
            return verify_reference(  # told the rows' rules, as bench_verify's reference is
                logits, draft, probs, None, uniforms, noise, rule, alpha, TEMPERATURE, top_k, top_p,
                rules=held_rules("mix", BATCH),
            )  # fmt: skip

        logits, rule = sets[0][0], sets[0][5]
        case = {
            "bytes_moved": verify_bytes(BATCH, K, VOCAB, VOCAB, logits, rule),
            "copy_bytes": 2 * logits.numel() * logits.element_size(),
            "copy": copy,
            "eager": _times(reference, sets),
        }
        for block in BLOCKS:
            case[f"triton {block}"] = _times(lambda *a, b=block, f=verify: f(*a, block=b), sets)
        case["launch"] = _launch_sweep(verify, sets, top_k > 0 or top_p < 1.0, **sweep)
        case.update(_kernel_times(verify, sets))
        add("verify", name, f"verify {name} [{BATCH} x {K + 1}, {VOCAB}]", case)

    for name, temperature in MATCH.items():
        if wanted(key := f"match {name} [{BATCH} x {K + 1}, {VOCAB}]"):
            add("match", name, key, _match_case(temperature, sweep))

    result["compiled"] = compiled_resources()
    write_results(stem, result, _markdown(result), complete=True)


def compiled_resources() -> list[dict] | str:
    """Registers, spills, warps and shared memory of every kernel variant this process compiled and loaded
    (Triton's per-device kernel caches: ``JITFunction.device_caches``, as Triton 3.6 to 3.9 keep them), to
    hold ``kernel_resources.py``'s offline figures against; a string saying why where the caches are laid
    out otherwise."""
    import omnidraft_fast.kernels as package

    found = set()
    for module in vars(package).values():
        for fn in vars(module).values() if inspect.ismodule(module) else ():
            if not isinstance(fn, triton.runtime.jit.JITFunction) or fn.__module__ != module.__name__:
                continue
            caches = getattr(fn, "device_caches", None)
            if caches is None:
                return "JITFunction.device_caches is gone in this Triton"
            for cache in caches.values():
                for compiled in cache[0].values():
                    registers = getattr(compiled, "n_regs", None)
                    if registers is None:  # compiled, never loaded
                        continue
                    meta = compiled.metadata
                    found.add((fn.__name__, meta.num_warps, registers, compiled.n_spills, meta.shared))
    keys = ("kernel", "warps", "registers", "spills", "shared")
    return [dict(zip(keys, variant, strict=True)) for variant in sorted(found)]


def _markdown(result: dict) -> str:
    columns = ["copy", "eager", *(f"triton {b}" for b in BLOCKS)]
    lines = [
        f"# Tile sweep ({provenance(result)})",
        "",
        "Median microseconds per call over 4 input sets taken in turn (`benchmarks/tune_kernels.py`): replayed",
        "from a CUDA graph (device time) / launched back to back with no cache flush (the host's launch time",
        "shows where it exceeds the device's).",
        "",
        f"| case | {' | '.join(columns)} |",
        "|---|" + "---|" * len(columns),
    ]

    def cell(times: dict) -> str:
        graph = "-" if times["graph"] is None else f"{times['graph']:.1f}"
        return f"{graph} / {times['stream']:.1f}"

    for name, case in result["cases"].items():
        lines.append(f"| {name} | {' | '.join(cell(case[c]) for c in columns)} |")
    compiled = result.get("compiled")
    if isinstance(compiled, list) and compiled:
        lines += [
            "",
            "Every kernel variant the run loaded (Triton's caches): registers, spilled bytes, shared memory",
            "(Triton's dynamic share), as `benchmarks/kernel_resources.py` reports them offline:",
            "",
            "| kernel | warps | registers | spills | shared |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{v['kernel']}` | {v['warps']} | {v['registers']} | {v['spills']} | {v['shared']} |"
            for v in compiled
        ]
    elif isinstance(compiled, str):
        lines += ["", f"Compiled kernels' resources: not read ({compiled})."]
    swept = {name: case["launch"] for name, case in result["cases"].items() if case.get("launch")}
    if swept:
        lines += [
            "",
            f"Launch sweep at each case's default tile (`--programs`: programs per SM of the passes, shipped "
            f"{rows.PROGRAMS_PER_SM}; `--pass-warps`: most warps of a threshold pass, shipped "
            f"{thresholds.PASS_WARPS}), the same two times:",
            "",
        ]
        lines += [
            f"- {name}: " + ", ".join(f"{k} {cell(t)}" for k, t in sweep.items())
            for name, sweep in swept.items()
        ]
    for name, case in result["cases"].items():
        lines += [
            "",
            f"Device time per call by kernel, {name}, block {case['block']}, the 4 sets in turn (us):",
            "",
        ]
        lines += [f"- `{kernel}`: {us}" for kernel, us in case["per_kernel"].items()]
        for kernel, times in case.get("per_launch", {}).items():
            lines += ["", f"Each launch of `{kernel}` in a call, in order (us): {', '.join(map(str, times))}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
