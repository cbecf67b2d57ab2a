"""A/B of the sampling and verification kernels: another revision's against the working tree's, side by
side in one process, outputs compared and device times taken from CUDA-graph replays.

The base revision's ``kernels/`` package is taken with ``git archive`` into a temporary folder and imported
under another name, so both versions run on the same inputs in the same process: the speed-up is a ratio
measured in one sitting (the base timed before and after the new version, so drift shows), not two runs
compared. The cases are sampling and verification at the goal shapes, every one by default (``--cases``;
names below).

    python benchmarks/ab_kernels.py --base fa88b63 --out DIR     # DIR/ab-<device>.{json,md}
    python benchmarks/ab_kernels.py --base HEAD --tiny           # outputs compared at small shapes

``--tiny`` compares the outputs at small shapes and times nothing: on the CPU under ``TRITON_INTERPRET=1``
(a machine without CUDA), on the GPU where the kernels are compiled.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import triton
from bench_sampling import sampling_inputs
from bench_verify import TEMPERATURE, verify_inputs
from omnidraft_fast.kernels import sampling, verify

from omnidraft_fast.report import environment, provenance, write_results

ROOT = Path(__file__).resolve().parents[1]
SETS = 4  # input sets per case, taken in turn (together larger than an H200's L2 cache)
SAMPLING = {  # name: (temperature, top_k, top_p)
    "sample top-p 0.9": (0.8, 0, 0.9),
    "sample top-k 50 + top-p 0.95": (0.8, 50, 0.95),
    "sample top-k 50": (0.8, 50, 1.0),
    "sample T 0.8": (0.8, 0, 1.0),
    "sample greedy": (0.0, 0, 1.0),
}
VERIFY = {"verify mix, top-k 50 + top-p 0.95": (50, 0.95), "verify mix": (0, 1.0)}  # name: (top_k, top_p)


def base_kernels(revision: str):
    """The ``kernels`` package of ``revision``, imported as ``base_kernels`` (its modules import each other
    relatively, so the package needs nothing of the working tree). ``revision`` may also be a folder that
    holds such a package, for a machine without the repository's history (a copy of the
    working tree only): ``git archive REV kernels | tar x -C FOLDER`` makes one."""
    folder = Path(tempfile.mkdtemp(prefix="ab-kernels-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # imported from until the process ends
    if Path(revision, "kernels").is_dir():
        shutil.copytree(
            Path(revision, "kernels"), folder / "kernels", ignore=shutil.ignore_patterns("__pycache__")
        )
    else:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", revision, "kernels"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            # the "data" filter where this Python has it (3.11.4 and later): plain files under the folder only
            tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (folder / "kernels").rename(folder / "base_kernels")
    for name in [name for name in sys.modules if name.partition(".")[0] == "base_kernels"]:
        del sys.modules[name]  # an earlier call's base
    sys.path.insert(0, str(folder))
    return importlib.import_module("base_kernels.sampling"), importlib.import_module("base_kernels.verify")


def _equal(a, b) -> bool:
    """Both outputs' tensors equal (a distribution within 1e-6: the sums may be taken in another order)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if isinstance(x, torch.Tensor)]
    return all(
        torch.allclose(x, y, rtol=0, atol=1e-6) if x.is_floating_point() else torch.equal(x, y)
        for x, y in pairs
    )


def _device_us(fn, sets: list) -> float:
    """Median device microseconds per call, the calls over the sets replayed from one CUDA graph."""
    ms = triton.testing.do_bench_cudagraph(lambda: [fn(*s) for s in sets], rep=100, return_mode="median")
    return round(1e3 * ms / len(sets), 1)


def ab_case(base, new, sets: list, timed: bool) -> dict:
    """``base`` and ``new`` (callables of one input set) compared on every set, then timed base, new, base."""
    row: dict = {"outputs_equal": all(_equal(base(*s), new(*s)) for s in sets)}
    if timed:
        row["base_us"], row["new_us"], row["base_again_us"] = (_device_us(f, sets) for f in (base, new, base))
        row["speedup"] = round(min(row["base_us"], row["base_again_us"]) / row["new_us"], 2)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base",
        required=True,
        help="the revision to compare against (e.g. HEAD, fa88b63), or a folder holding its kernels/",
    )
    parser.add_argument("--cases", nargs="+", choices=[*SAMPLING, *VERIFY], default=[*SAMPLING, *VERIFY])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="small shapes, outputs compared only (on the CPU under TRITON_INTERPRET=1, else on CUDA)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    # --tiny runs on the tensors the kernels take in this process: CPU ones under the Triton interpreter,
    # CUDA ones where they are compiled (a machine with a GPU, TRITON_INTERPRET unset)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = torch.device("cpu" if args.tiny and interpreted else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "ab_kernels.py runs the kernels compiled on a CUDA device; --tiny under TRITON_INTERPRET=1 "
            "compares the outputs on the CPU"
        )
    base_sampling, base_verify = base_kernels(args.base)
    rows, vocab, batch, k = (3, 300, 2, 3) if args.tiny else (72, 128256, 8, 8)
    env = environment(device)
    result: dict = {**env, "base": args.base, "cases": {}}
    for name in args.cases:
        if name in SAMPLING:
            temperature, top_k, top_p = SAMPLING[name]
            sets = [sampling_inputs(rows, vocab, seed, device=device) for seed in range(SETS)]

            def run(module, t=temperature, tk=top_k, tp=top_p):
                return lambda logits, noise: module.sample_triton(logits, noise, t, tk, tp)

            base, new = run(base_sampling), run(sampling)
        else:
            top_k, top_p = VERIFY[name]
            sets = [
                verify_inputs(batch, k, vocab, False, seed, device=str(device))[:7] for seed in range(SETS)
            ]

            def run(module, tk=top_k, tp=top_p):
                return lambda logits, draft, probs, uniforms, noise, rule, alpha: module.verify_triton(
                    logits, draft, probs, None, uniforms, noise, rule, alpha, TEMPERATURE, tk, tp
                )

            base, new = run(base_verify), run(verify)
        key = f"{name} [{rows if name in SAMPLING else f'{batch} x {k + 1}'}, {vocab}]"
        result["cases"][key] = ab_case(base, new, sets, timed=not args.tiny)
        print(key, result["cases"][key], flush=True)
    stem = args.out / f"ab-{env['device'].lower().replace(' ', '-')}"
    write_results(stem, result, _markdown(result))


def _markdown(result: dict) -> str:
    lines = [
        f"# Kernels A/B against {result['base']} ({provenance(result)})",
        "",
        "Median device microseconds per call from CUDA-graph replays over 4 input sets taken in turn "
        "(`benchmarks/ab_kernels.py`), the base timed before and after the new version.",
        "",
        "| case | outputs equal | base | new | base again | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["cases"].items():
        times = [row.get(key, "-") for key in ("base_us", "new_us", "base_again_us")]
        speedup = f"{row['speedup']}x" if "speedup" in row else "-"
        lines.append(f"| {name} | {row['outputs_equal']} | {' | '.join(map(str, times))} | {speedup} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
