"""Every Triton kernel compiles for the GPUs it is written for, checked on any machine: a kernel that is
right only under the interpreter (which never compiles) is a bug. ``compile_kernels.py`` runs the
launchers with their launches compiled for Hopper (sm_90) and Ampere (sm_80) instead of run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_every_kernel_compiles_for_hopper_and_ampere(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    script = Path(__file__).resolve().parent / "compile_kernels.py"
    result = subprocess.run(
        [sys.executable, str(script), "90", "80"], env=env, capture_output=True, text=True, timeout=900
    )
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_resident_programs_by_the_bounding_resource():
    """The occupancy arithmetic of ``benchmarks/kernel_resources.py`` (CUDA's tables: registers a warp in
    units of 256, 2048 threads, 32 programs and 228 KB of shared memory an SM on sm_90, 164 KB on sm_80), by
    the rules of ``cuda_occupancy.h``: an SM's registers in 4 sub-partitions of whole warps, and a program's
    shared memory with the driver's reserved 1 KB in units of 128 bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from kernel_resources import LIMITS, resident

    hopper, ampere = LIMITS[90], LIMITS[80]
    assert resident(48, 4, 1056, hopper) == (10, "registers")  # 48 x 128 threads: 6144 a program
    assert resident(174, 8, 5120, hopper) == (1, "registers")  # 176 a thread (units of 8): 45056 a program
    assert resident(128, 8, 5120, hopper) == (2, "registers")
    assert resident(16, 4, 0, hopper) == (16, "threads")  # 2048 threads / 128
    assert resident(32, 1, 1024, hopper) == (32, "programs")
    assert resident(32, 4, 100 * 1024, hopper) == (2, "shared")
    assert resident(32, 4, 60 * 1024, ampere) == (2, "shared") and resident(32, 4, 60 * 1024, hopper)[0] == 3
    assert resident(200, 1, 0, hopper) == (8, "registers")  # 2 warps of 6400 in each 16384, not 65536 // 6400
    assert resident(32, 4, 114 * 1024, hopper) == (1, "shared")  # two of 114 KB + 1 KB reserved exceed 228 KB
    assert resident(32, 4, 45670, hopper) == (4, "shared")  # 46694 with the reserved: 46720 in 128s


def test_goal_case_resources_from_the_compiled_kernels(tmp_path):
    """``kernel_resources.py`` compiles the goal cases' launches as a GPU launch specialises them and reports
    each kernel's registers, the programs an SM holds and the grid in waves of a 132-SM GPU; the launches'
    register caps hold (the threshold passes after the first, filtered sampling's probability pass,
    verification's draw and cross-vocabulary sums kernels), keep two 8-warp or four 4-warp programs an SM,
    and spill little."""
    from omnidraft_fast.kernels import sampling, thresholds, verify

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    only = ["sample greedy", "sample temperature", "sample top_p", "cross-vocabulary"]
    result = subprocess.run(
        [sys.executable, str(script), "--only", *only, "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    cases = json.loads((tmp_path / "resources-sm_90.json").read_text())["cases"]
    assert set(cases) == {
        "sample greedy", "sample greedy_ids", "sample temperature", "sample temperature_ids", "sample top_p",
        "verify rule mix, cross-vocabulary", "verify rule mix, cross-vocabulary, T = 1 law apart",
    }  # fmt: skip
    for case in ("sample greedy", "sample greedy_ids"):
        launches = cases[case]
        assert [launch["kernel"] for launch in launches] == ["_stats_kernel", "_finish_kernel"], case
        stats = launches[0]
        assert stats["grid"] == [72, 8] and stats["warps"] == 4  # 4 programs an SM over 72 rows of 63 tiles
        assert 0 < stats["registers"] <= 255 and stats["per_sm"] >= 1 and stats["shared"] >= 1024
        assert stats["waves"] == round(72 * 8 / (stats["per_sm"] * 132), 2)
    passes = [launch for launch in cases["sample top_p"] if launch["kernel"] == "_threshold_pass_kernel"]
    assert passes[0]["maxnreg"] is None and len(passes) >= 3  # the first pass uncapped; one per variant
    capped = [launch for case in cases.values() for launch in case if launch["maxnreg"] is not None]
    assert {launch["kernel"] for launch in capped} == {
        "_threshold_pass_kernel", "_probs_kernel", "_sums_kernel", "_draw_kernel"
    }  # fmt: skip
    for launch in capped:
        assert launch["registers"] <= launch["maxnreg"] and launch["stack"] <= 64, launch
    for case in ("sample temperature", "sample temperature_ids", "sample top_p"):  # capped where filtered
        (probs,) = [launch for launch in cases[case] if launch["kernel"] == "_probs_kernel"]
        assert probs["maxnreg"] == (sampling.PROBS_MAXNREG if case == "sample top_p" else None), case
    for launch in passes[1:]:
        assert launch["maxnreg"] == thresholds.PASS_MAXNREG and launch["per_sm"] >= 2, launch
    for case in ("verify rule mix, cross-vocabulary", "verify rule mix, cross-vocabulary, T = 1 law apart"):
        caps = {launch["kernel"]: launch["maxnreg"] for launch in cases[case]}
        assert (
            caps["_sums_kernel"] == verify.CROSS_SUMS_MAXNREG and caps["_draw_kernel"] == verify.DRAW_MAXNREG
        )
        assert all(launch["per_sm"] >= 4 for launch in cases[case]), case
