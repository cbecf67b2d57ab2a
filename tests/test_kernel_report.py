"""The kernel report (``benchmarks/kernel_report.py``) on pytest-benchmark JSON files written here by hand
in that format: ratios, bandwidth shares and goal checks."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import _interpreter_problem

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def kernel_report():
    spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "benchmarks" / "kernel_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(test: str, params: dict, median: float, **extra) -> dict:
    param = "-".join(str(v) for v in params.values())
    return {
        "group": None, "name": f"{test}[{param}]", "fullname": f"benchmarks/x.py::{test}[{param}]",
        "params": params, "param": param, "extra_info": {"device": DEVICE, **extra},
        "stats": {"min": median, "max": median, "mean": median, "median": median, "rounds": 10},
    }  # fmt: skip


def _write(folder: Path, op: str, cases: list[dict]) -> None:
    (folder / f"bench_{op}.json").write_text(
        json.dumps(
            {"machine_info": {}, "commit_info": {}, "benchmarks": cases, "datetime": "", "version": "5"}
        )
    )


def test_sampling_and_verification_against_the_copy(tmp_path, kernel_report):
    shape = {"rows": 72, "vocab": 128256}
    _write(tmp_path, "sampling", [
        _case("test_copy", shape, 10e-6, bytes_moved=4_000_000),  # 400 GB/s
        _case("test_sample", {**shape, "config": "temperature", "impl": "eager"}, 300e-6, bytes_moved=3_000_000),
        _case("test_sample", {**shape, "config": "temperature", "impl": "compile"}, 100e-6, bytes_moved=3_000_000),
        _case("test_sample", {**shape, "config": "temperature", "impl": "triton"}, 10e-6, bytes_moved=3_000_000),
        _case("test_sample", {"rows": 1, "vocab": 32000, "config": "greedy", "impl": "triton"}, 5e-6),
    ])  # fmt: skip
    verify_shape = {"batch": 8, "k": 8, "vocab": 128256, "cross_vocab": False}
    _write(tmp_path, "verify", [
        _case("test_verify", {**verify_shape, "implementation": "copy"}, 10e-6, bytes_moved=4_000_000),
        _case("test_verify", {**verify_shape, "implementation": "eager"}, 50e-6, bytes_moved=3_800_000),
        _case("test_verify", {**verify_shape, "implementation": "compile"}, 30e-6, bytes_moved=3_800_000),
        _case("test_verify", {**verify_shape, "implementation": "triton"}, 10e-6, bytes_moved=3_800_000),
    ])  # fmt: skip
    (tmp_path / "environment.txt").write_text("NVIDIA H100, 580.1\ntorch 2.11.0\nabc1234\n")
    kernel_report.main([str(tmp_path)])

    result = json.loads((tmp_path / "kernels-nvidia-h100-80gb-hbm3.json").read_text())
    (goal,) = result["ops"]["sampling"]["goals"]
    row = next(r for r in result["ops"]["sampling"]["rows"] if r["shape"] == goal["shape"])
    assert row["copy_share"] == pytest.approx(0.75) and row["triton_gb_per_s"] == pytest.approx(300.0)
    assert row["vs_eager"] == pytest.approx(30.0) and row["vs_compile"] == pytest.approx(10.0)
    assert list(goal["checks"].values()) == [False, True, True] and not goal["met"]
    (goal,) = result["ops"]["verify"]["goals"]
    assert goal["checks"] == {"copy share >= 80%": True, ">= 3x eager": True, ">= 1.5x torch.compile": True}
    assert goal["met"]
    assert result["environment"].startswith("NVIDIA H100")
    text = (tmp_path / "kernels-nvidia-h100-80gb-hbm3.md").read_text()
    assert "copy share >= 80%: **no**" in text and "torch 2.11.0" in text


def test_verification_goals_per_rule_set(tmp_path, kernel_report):
    """bench_verify's ``rules`` parameter (the rule mix, exact, one rule) keeps its cases apart, one goal each;
    a case without it (runs before it existed) is the mix."""
    shape = {"batch": 8, "k": 8, "vocab": 128256, "cross_vocab": False}
    cases = [_case("test_verify", {**shape, "implementation": "copy"}, 10e-6, bytes_moved=4_000_000)]
    for rules, eager in ((None, 50e-6), ("exact", 20e-6), ("token_v2", 40e-6)):
        params = shape if rules is None else {**shape, "rules": rules}
        cases.append(
            _case("test_verify", {**params, "implementation": "eager"}, eager, bytes_moved=3_800_000)
        )
        cases.append(
            _case("test_verify", {**params, "implementation": "triton"}, 10e-6, bytes_moved=3_800_000)
        )
    _write(tmp_path, "verify", cases)
    kernel_report.main([str(tmp_path)])

    result = json.loads((tmp_path / "kernels-nvidia-h100-80gb-hbm3.json").read_text())
    goals = {g["shape"]["rules"]: g["checks"][">= 3x eager"] for g in result["ops"]["verify"]["goals"]}
    assert goals == {"mix": True, "exact": False, "token_v2": True}


def test_ngram_rates_against_their_goals(tmp_path, kernel_report):
    """Goals at the largest batch per table size; a smaller batch, whose rate the host's launch and sync
    bound, is tabled without a verdict."""
    cases = []
    for op, triton_seconds in (("test_lookup", 1e-4), ("test_insert", 1e-3)):
        for name, seconds in (("eager", 1e-2), ("triton", triton_seconds)):
            cases.append(_case(op, {"capacity": 1 << 19, "batch": 1 << 17, "implementation": name}, seconds))
        cases.append(_case(op, {"capacity": 1 << 19, "batch": 1 << 10, "implementation": "triton"}, 2e-5))
    _write(tmp_path, "ngram", cases)
    result = kernel_report.report(tmp_path)
    lookup, small_lookup, insert, small_insert = result["ops"]["ngram"]["rows"]
    assert "met" not in small_lookup and "met" not in small_insert
    assert small_lookup["triton_keys_per_s"] == pytest.approx(1024 / 2e-5)
    assert lookup["triton_keys_per_s"] == pytest.approx(1.31072e9) and lookup["met"]
    assert insert["triton_keys_per_s"] == pytest.approx(1.31072e8) and not insert["met"]
    assert insert["eager_keys_per_s"] == pytest.approx(1.31072e7)


def test_exact_match_goals_per_configuration(tmp_path, kernel_report):
    """Each configuration at the goal shape is checked against its own copy; other shapes only tabled."""
    cases = []
    for config, triton_seconds in (("greedy", 5e-6), ("top_p", 40e-6)):
        shape = {"batch": 8, "k": 8, "vocab": 128256, "config": config}
        for name, seconds in (
            ("copy", 5e-6),
            ("eager", 60e-6),
            ("compile", 30e-6),
            ("triton", triton_seconds),
        ):
            cases.append(
                _case("test_match", {**shape, "implementation": name}, seconds, bytes_moved=2_000_000)
            )
    cases.append(_case("test_match", {"batch": 1, "k": 4, "vocab": 32000, "config": "greedy",
                                      "implementation": "triton"}, 3e-6))  # fmt: skip
    _write(tmp_path, "match", cases)
    summary = kernel_report.report(tmp_path)["ops"]["match"]
    assert len(summary["rows"]) == 3
    greedy, top_p = summary["goals"]
    assert greedy["shape"]["config"] == "greedy" and greedy["met"]
    assert top_p["checks"] == {
        "copy share >= 80%": False,
        ">= 3x eager": False,
        ">= 1.5x torch.compile": False,
    }


def test_translation_with_and_without_split_tokens(tmp_path, kernel_report):
    cases = []
    for test, name, seconds in (("test_translate", "eager", 90e-6), ("test_translate", "compile", 30e-6),
                                ("test_translate", "triton", 10e-6), ("test_translate_with_splits", "triton", 25e-6)):  # fmt: skip
        cases.append(_case(test, {"batch": 8, "k": 4, "implementation": name}, seconds))
    _write(tmp_path, "translate", cases)
    (row,) = kernel_report.report(tmp_path)["ops"]["translate"]["rows"]
    assert row["vs_eager"] == pytest.approx(9.0) and row["vs_compile"] == pytest.approx(3.0)
    assert row["triton_with_splits_us"] == pytest.approx(25.0) and "eager_with_splits_us" not in row


def test_prompt_lookup_table(tmp_path, kernel_report):
    """Per (batch, context, ngram): the three implementations, the kernel's bandwidth, the kernel at one
    program a row beside it; no goal."""
    params = {"batch": 8, "context": 8192, "ngram": 2}
    cases = [_case("test_lookup", {**params, "implementation": name}, seconds, bytes_moved=5.0e5)
             for name, seconds in (("eager", 80e-6), ("compile", 40e-6), ("triton", 5e-6), ("triton_row", 15e-6))]  # fmt: skip
    _write(tmp_path, "lookup", cases)
    summary = kernel_report.report(tmp_path)["ops"]["lookup"]
    (row,) = summary["rows"]
    assert row["shape"] == params and "goals" not in summary
    assert row["vs_eager"] == pytest.approx(16.0) and row["vs_compile"] == pytest.approx(8.0)
    assert row["triton_gb_per_s"] == pytest.approx(100.0)
    assert row["triton_row_us"] == pytest.approx(15.0) and row["vs_triton_row"] == pytest.approx(3.0)
    assert "## lookup" in kernel_report.markdown(kernel_report.report(tmp_path))


def test_a_benchmark_cut_off_before_it_wrote_is_named_not_read(tmp_path, kernel_report):
    """A step's time limit can stop pytest-benchmark before it writes its JSON (an empty file, as the H200 run
    of 2026-12-04 left bench_ngram.json): the report goes on with the others and names it."""
    params = {"batch": 8, "context": 8192, "ngram": 2}
    _write(
        tmp_path,
        "lookup",
        [_case("test_lookup", {**params, "implementation": "triton"}, 5e-6, bytes_moved=5e5)],
    )
    (tmp_path / "bench_ngram.json").write_text("")
    result = kernel_report.report(tmp_path)
    assert list(result["ops"]) == ["lookup"] and result["unread"] == ["bench_ngram.json"]
    assert (
        "Not read (empty or cut off by its step's time limit): bench_ngram.json."
        in kernel_report.markdown(result)
    )


def test_an_empty_folder_is_an_error(tmp_path, kernel_report):
    with pytest.raises(SystemExit):
        kernel_report.main([str(tmp_path)])


def test_device_times_of_the_tile_sweep(tmp_path, kernel_report):
    """``tune_kernels.py``'s CUDA-graph times: the tile the engine runs (as the sweep records it; 1024 in a
    sweep that recorded none) against the copy and the eager reference, the fastest tile beside it; a missing
    copy time leaves its goal "n/a"."""
    case = {
        "bytes_moved": 3_000_000,
        "copy_bytes": 4_000_000,
        "copy": {"stream": 20.0, "graph": 5.0},  # 800 GB/s
        "eager": {"stream": 300.0, "graph": 90.0},
        "triton 1024": {"stream": 40.0, "graph": 4.0},  # 750 GB/s: 94% of the copy's
        "triton 2048": {"stream": 41.0, "graph": 6.0},
        "triton 4096": {"stream": 42.0, "graph": None},  # not captured: left out
        "per_kernel": {"_stats_kernel": 3.0},
    }
    slow = {
        **case,
        "triton 1024": {"stream": 50.0, "graph": 10.0},
        "triton 2048": {"stream": 50.0, "graph": 8.0},
    }
    no_copy = {**case, "copy": {"stream": 20.0, "graph": None}}
    no_shipped_tile = {**case, "triton 1024": {"stream": 40.0, "graph": None}}
    recorded = {"block": 2048, **slow}  # a sweep records the tile the engine runs
    tune = {
        "device": DEVICE,
        "torch": "2.11",
        "triton": "3.6",
        "cases": {"fast": case, "slow": slow, "x": no_copy, "y": no_shipped_tile, "z": recorded},
    }
    (tmp_path / "tune-nvidia-h100.json").write_text(json.dumps(tune))
    kernel_report.main([str(tmp_path)])

    result = json.loads((tmp_path / "kernels-nvidia-h100-80gb-hbm3.json").read_text())
    fast, slow, no_copy, recorded = result["ops"]["device time"][
        "rows"
    ]  # the shipped tile not measured: no row
    assert recorded["block"] == 2048 and recorded["triton_us"] == pytest.approx(8.0)
    assert fast["block"] == 1024 and fast["copy_share"] == pytest.approx(0.9375)
    assert fast["vs_eager"] == pytest.approx(22.5) and fast["best_block"] == 1024
    # the goals are checked at the tile the engine runs, not at the faster one it does not
    assert slow["block"] == 1024 and slow["copy_share"] == pytest.approx(0.375)
    assert slow["best_block"] == 2048 and slow["best_block_us"] == pytest.approx(8.0)
    assert "copy_share" not in no_copy and no_copy["vs_eager"] == pytest.approx(22.5)
    goals = result["ops"]["device time"]["goals"]
    assert [goal["met"] for goal in goals] == [True, False, None, False]
    assert list(goals[2]["checks"].values()) == [None, True]
    text = (tmp_path / "kernels-nvidia-h100-80gb-hbm3.md").read_text()
    assert "## device time" in text and "copy share >= 80%: n/a" in text and "Partial sweep" not in text
    (tmp_path / "tune-nvidia-h100.json").write_text(json.dumps({**tune, "complete": False}))
    kernel_report.main([str(tmp_path)])  # a run cut short by its time limit says so
    assert "Partial sweep" in (tmp_path / "kernels-nvidia-h100-80gb-hbm3.md").read_text()


def test_a_baseline_that_was_not_measured_is_neither_met_nor_missed(kernel_report):
    """A compile case that failed (no ``vs_compile``) leaves its goal "n/a": the goal is not met then, nor
    missed; a missed goal beside it still decides."""
    row = {"shape": {"rows": 72}, "copy_share": 0.9, "vs_eager": 4.0}
    goal = kernel_report._bandwidth_goal(row)
    assert list(goal["checks"].values()) == [True, True, None] and goal["met"] is None
    assert kernel_report._bandwidth_goal({**row, "vs_eager": 2.0})["met"] is False
    assert kernel_report._bandwidth_goal({**row, "vs_compile": 1.5})["met"] is True


def test_each_launch_of_a_kernel_a_call_launches_more_than_once(monkeypatch):
    """``tune_kernels.launch_sequence``: the i-th launch's median over the calls, in launch order, for the
    kernels launched more than once per call (the threshold passes); one launch per call, or launches that
    do not divide over the calls, are left out."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("tune_kernels", ROOT / "benchmarks" / "tune_kernels.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    calls = [
        [("stats", 5.0), ("pass", 100.0), ("pass", 40.0), ("pass", 3.0), ("odd", 1.0), ("probs", 9.0)],
        [("stats", 6.0), ("pass", 110.0), ("pass", 42.0), ("pass", 2.0), ("probs", 8.0)],
        [("stats", 7.0), ("pass", 90.0), ("pass", 41.0), ("pass", 4.0), ("odd", 1.0), ("probs", 7.0)],
    ]
    launches = [launch for call in calls for launch in call]
    assert tune.launch_sequence(launches, calls=3) == {"pass": [100.0, 41.0, 3.0]}


def test_launch_sweep_times_each_setting_and_puts_the_shipped_one_back(monkeypatch):
    """``tune_kernels --programs/--pass-warps``: a case without a threshold search is timed at each programs
    per SM of its passes, one with a search at each most warps of a threshold pass, and (``--caps-off``)
    once with every register cap lifted, the launch constants read at the time of the call; the shipped
    constants are back afterwards, and the table lists the times."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("tune_kernels", ROOT / "benchmarks" / "tune_kernels.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    from omnidraft_fast.kernels import rows, thresholds

    shipped = rows.PROGRAMS_PER_SM, thresholds.PASS_WARPS
    seen = []

    def fake_times(fn, sets):
        lifted = [getattr(module, name) is None for module, name in tune.CAPS]
        assert all(lifted) or not any(lifted)  # the caps are lifted together
        seen.append((rows.PROGRAMS_PER_SM, thresholds.PASS_WARPS, all(lifted)))
        return {"stream": 2.0 * len(seen), "graph": 1.0 * len(seen)}

    monkeypatch.setattr(tune, "_times", fake_times)
    caps = [getattr(module, name) for module, name in tune.CAPS]
    plain = tune._launch_sweep(None, [], False, programs=[2, 8], pass_warps=[16], caps_off=False)
    searched = tune._launch_sweep(None, [], True, programs=[2, 8], pass_warps=[16], caps_off=True)
    assert seen == [(2, shipped[1], False), (8, shipped[1], False), (shipped[0], 16, False), (*shipped, True)]
    assert list(plain) == ["programs 2", "programs 8"] and list(searched) == ["pass warps 16", "caps off"]
    assert shipped == (rows.PROGRAMS_PER_SM, thresholds.PASS_WARPS)
    assert caps == [getattr(module, name) for module, name in tune.CAPS] and None not in caps
    times = {"stream": 1.0, "graph": 1.0}
    case = {
        "block": 2048,
        "copy": times,
        "eager": times,
        **{f"triton {b}": times for b in tune.BLOCKS},
        "per_kernel": {},
    }
    markdown = tune._markdown(
        {"date": "d", "device": "x", "torch": "t", "triton": "t", "transformers": "t", "commit": "c",
         "cases": {"sample greedy": {**case, "launch": plain}, "sample top_p": {**case, "launch": {}}}}
    )  # fmt: skip
    assert "- sample greedy: programs 2 1.0 / 2.0, programs 8 2.0 / 4.0" in markdown
    assert "- sample top_p" not in markdown


def test_kernels_a_b_against_a_revision(tmp_path, monkeypatch):
    """``ab_kernels.py --tiny``: HEAD's kernels, taken from git, run beside the working tree's on the same
    inputs, on the tensors the kernels take here (CPU ones under the interpreter, CUDA ones where they are
    compiled: tests/conftest.py sets TRITON_INTERPRET only on a machine without an NVIDIA driver); a version
    whose outputs differ is reported so."""
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the kernels run neither interpreted (TRITON_INTERPRET=1) nor compiled (CUDA) here")
    problem = _interpreter_problem() if device == "cpu" else None
    if problem is not None:
        pytest.skip(problem)
    try:
        head = subprocess.run(["git", "cat-file", "-e", "HEAD:kernels"], cwd=ROOT, capture_output=True)
    except FileNotFoundError:  # no git at all
        head = None
    if head is None or head.returncode:
        pytest.skip("no git history holding HEAD's kernels/: ab_kernels.py takes the base revision from git")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ab_kernels", ROOT / "benchmarks" / "ab_kernels.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    ab.main(["--base", "HEAD", "--tiny", "--cases", "sample top-k 50 + top-p 0.95", "--out", str(tmp_path)])
    (case,) = json.loads(next(tmp_path.glob("ab-*.json")).read_text())["cases"].values()
    assert case == {"outputs_equal": True}  # nothing timed on the CPU
    # a folder holding a kernels/ package (what a machine without the history is given) serves as the base
    shutil.copytree(
        ROOT / "kernels", tmp_path / "copy" / "kernels", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "copy" / "kernels" / "marker.py").write_text("")
    sampling, _ = ab.base_kernels(str(tmp_path / "copy"))
    assert (Path(sampling.__file__).parent / "marker.py").exists()

    logits, noise = torch.randn(3, 40, device=device), torch.rand(3, 40, device=device)
    new = lambda x, e: ab.sampling.sample_triton(x, e, 0.8, 5, 0.9)  # noqa: E731
    shifted = lambda x, e: ab.sampling.sample_triton(x, e, 0.8, 6, 0.9)  # noqa: E731
    assert ab.ab_case(new, new, [(logits, noise)], timed=False) == {"outputs_equal": True}
    assert ab.ab_case(shifted, new, [(logits, noise)], timed=False) == {"outputs_equal": False}


def test_compiled_resources_read_from_tritons_kernel_caches(monkeypatch):
    """``tune_kernels.compiled_resources``: each loaded variant of each kernel of the package, once, from
    Triton's per-device caches (a variant compiled but never loaded has no registers yet, and is left out)."""
    import types

    import omnidraft_fast.kernels as package
    import triton

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("tune_kernels", ROOT / "benchmarks" / "tune_kernels.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)

    def _probe_kernel(x_ptr):
        pass

    module = types.ModuleType("omnidraft_fast.kernels._probe")
    _probe_kernel.__module__ = module.__name__
    kernel = triton.runtime.jit.JITFunction(_probe_kernel)
    module._probe_kernel = kernel

    def loaded(registers, spills, warps, shared):
        return types.SimpleNamespace(n_regs=registers, n_spills=spills,
                                     metadata=types.SimpleNamespace(num_warps=warps, shared=shared))  # fmt: skip

    unloaded = types.SimpleNamespace(metadata=types.SimpleNamespace(num_warps=4, shared=0))
    kernel.device_caches = {0: ({"a": loaded(40, 0, 4, 32), "b": loaded(128, 24, 8, 4096), "c": unloaded},),
                            1: ({"a": loaded(40, 0, 4, 32)},)}  # fmt: skip
    monkeypatch.setattr(package, "_probe", module, raising=False)
    found = [variant for variant in tune.compiled_resources() if variant["kernel"] == "_probe_kernel"]
    assert found == [
        {"kernel": "_probe_kernel", "warps": 4, "registers": 40, "spills": 0, "shared": 32},
        {"kernel": "_probe_kernel", "warps": 8, "registers": 128, "spills": 24, "shared": 4096},
    ]
