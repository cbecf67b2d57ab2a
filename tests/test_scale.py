"""The scale benchmark (``benchmarks/scale.py --preset tiny``) and the benchmark-zoo trainer, at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED, shared_path

ROOT = Path(__file__).resolve().parents[1]


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_scale_tiny_writes_the_figures_and_follows_the_projection(tmp_path):
    scale = _scale_module()
    scale.main(["--preset", "tiny", "--acceptance", "0.5", "0.9", "--profile", "--compiled", "on", "--tokenizers",
                str(SHARED / "tokenizers"), "--out", str(tmp_path)])  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = json.loads((tmp_path / f"scale-{device}.json").read_text())
    assert (tmp_path / f"scale-{device}.md").read_text().startswith("# Scale shapes, preset tiny")
    assert result["complete"] is True
    assert result["plain_static_ms_per_token"] > 0 and result["plain_static_compiled"] == (device == "cuda")
    for field in ("device", "torch", "transformers", "commit", "plain_ms_per_token", "target_forward_ms",
                  "projection_formula", "target_params"):  # fmt: skip
        assert field in result
    k = result["k"]
    backends = {"cudnn_attention", "flash_attention", "efficient_attention", "math"}
    for times in (*result["target_forward_ms_per_sdpa_backend"].values(),
                  *(row["drafter_step_ms_per_sdpa_backend"] for row in result["pairs"].values())):  # fmt: skip
        assert set(times) == backends and isinstance(times["math"], float) and times["math"] > 0
        assert all(isinstance(ms, float) or ms.startswith("RuntimeError") for ms in times.values())
    expected_pairs = {"shared", "cross"} if (SHARED / "tokenizers" / "llama3").is_dir() else {"shared"}
    assert set(result["pairs"]) == expected_pairs
    for row in result["pairs"].values():
        stages = row["stage_ms_per_round"]
        assert {"draft", "translate", "target", "verify", "commit", "host"} <= set(stages)
        assert row["overhead_ms_per_round"] == pytest.approx(
            sum(v for s, v in stages.items() if s not in ("draft", "target"))
        )
        assert row["round_ms"] > 0 and row["drafter_step_ms"] > 0 and row["kept_graph_round_ms"] > 0
        assert [p["acceptance"] for p in row["projection"]] == [0.5, 0.9]
        for point in row["projection"]:
            a = point["acceptance"]
            tokens = (1 - a ** (k + 1)) / (1 - a)
            assert point["tokens_per_round"] == pytest.approx(tokens)
            assert point["speedup"] == pytest.approx(tokens / row["round_ms"] * result["plain_ms_per_token"])
            assert point["speedup_graphs"] == pytest.approx(
                tokens / row["kept_graph_round_ms"] * result["plain_ms_per_token"]
            )
            assert point["speedup_graphs_vs_static"] == pytest.approx(
                tokens / row["kept_graph_round_ms"] * result["plain_static_ms_per_token"]
            )
        profile = row["profile"]
        assert {"draft", "target", "verify"} <= set(profile["stages"]) and profile["round_ms"] > 0
        assert all(times["cpu_ms_per_round"] > 0 for times in profile["stages"].values())
        assert profile["stage_sum_ms_per_round"]["cpu"] == pytest.approx(
            sum(t["cpu_ms_per_round"] for s, t in profile["stages"].items() if s != "prefill")
        )
        learning = row["in_flight"]  # LoRA rank 32 on the drafter, a step every 4 rounds
        assert learning["rounds_per_step"] == 4 and learning["lora_parameters"] > 0
        assert (
            learning["update_ms_per_step"] > 0
            and learning["round_ms"] > 0
            and learning["graph_round_ms"] > 0
            and learning["kept_graph_round_ms"] > 0
        )
    assert result["pairs"]["shared"]["in_flight"]["window_slots"] == 4 * (k + 1)  # one drafter slot per token
    assert scale.tokens_per_round(1.0, k) == k + 1
    assert scale.tokens_per_round(0.0, k) == 1


def test_profile_stage_times_keep_the_host_ranges():
    """On CUDA ``key_averages()`` lists a ``stage:<name>`` range twice: the host's range (its CPU time and
    its kernels' device time) and a GPU annotation (no CPU time, the span of its kernels). The host's is
    kept, whatever the order."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, device_type, cpu_us, device_us):
        return SimpleNamespace(
            key=key, count=4, device_type=device_type, cpu_time_total=cpu_us, device_time_total=device_us
        )

    averages = [
        event("stage:draft", DeviceType.CPU, 800.0, 400.0),
        event("stage:draft", DeviceType.CUDA, 0.0, 1200.0),
        event("stage:target", DeviceType.CUDA, 0.0, 3000.0),
        event("stage:target", DeviceType.CPU, 1000.0, 2000.0),
        event("aten::mm", DeviceType.CPU, 50.0, 20.0),
    ]
    stages = _scale_module()._stage_times(averages, rounds=4)
    assert stages == {
        "draft": {"calls": 4, "cpu_ms_per_round": 0.2, "device_ms_per_round": 0.1},
        "target": {"calls": 4, "cpu_ms_per_round": 0.25, "device_ms_per_round": 0.5},
    }


def test_train_bench_tiny_writes_a_loadable_pair(tmp_path):
    from omnidraft_fast.zoo import load
    from omnidraft_fast.zoo.train_bench import main

    tokenizers = shared_path("tokenizers")
    main(["--tiny", "--targets", "llama3", "--tokenizers", str(tokenizers), "--out", str(tmp_path)])
    pair = load(tmp_path / "llama3")
    assert pair.drafter_shared is None
    assert pair.target.config.vocab_size == 128_256 and pair.drafter_cross.config.vocab_size == 32_000
    assert len(pair.drafter_tokenizer) == 32_000
    card = json.loads((tmp_path / "llama3" / "card.json").read_text())
    assert [row["model"] for row in card] == ["target", "drafter-cross"]
    assert "distill_train_loss" in card[1]


def test_train_bench_fits_a_time_budget(tmp_path):
    from omnidraft_fast.zoo.train_bench import main

    tokenizers = shared_path("tokenizers")
    args = ["--tiny", "--targets", "llama3", "--tokenizers", str(tokenizers), "--out", str(tmp_path)]
    main([*args, "--steps", "100000", "--seconds", "2"])
    card = json.loads((tmp_path / "llama3" / "card.json").read_text())
    assert 5 <= card[0]["steps"] < 100_000  # the probe's steps, then what fits a second
    assert card[1]["steps"] == 4 and card[1]["distill_steps"] == 2  # short runs are not cut
    assert "within a budget of 2 s" in (tmp_path / "llama3" / "MODEL_CARD.md").read_text()
    with pytest.raises(SystemExit):
        main([*args, "--seconds", "0"])


def test_train_bench_skips_without_tokenizers(tmp_path, capsys):
    from omnidraft_fast.zoo.train_bench import main

    main(["--tiny", "--tokenizers", str(tmp_path / "absent"), "--out", str(tmp_path / "zoo")])
    assert "benchmark zoo skipped" in capsys.readouterr().out
    assert not (tmp_path / "zoo").exists()


def test_write_results_marks_partial_writes(tmp_path):
    from omnidraft_fast.report import PARTIAL, write_results

    stem = tmp_path / "out" / "bench-cpu"
    write_results(stem, {"rows": [1]}, "# Title\n\nbody\n", complete=False)
    assert json.loads(stem.with_suffix(".json").read_text()) == {"rows": [1], "complete": False}
    assert stem.with_suffix(".md").read_text() == f"# Title\n\n{PARTIAL}\n\nbody\n"
    write_results(stem, {"rows": [1, 2]}, "# Title\n\nbody\n", complete=True)  # overwrites the partial files
    assert json.loads(stem.with_suffix(".json").read_text()) == {"rows": [1, 2], "complete": True}
    assert stem.with_suffix(".md").read_text() == "# Title\n\nbody\n"
    assert sorted(path.name for path in stem.parent.iterdir()) == ["bench-cpu.json", "bench-cpu.md"]


def test_error_line_names_the_error_in_one_line():
    from omnidraft_fast.report import error_line

    assert error_line(RuntimeError("inductor failed\ntraceback...")) == "RuntimeError: inductor failed"
    assert error_line(RuntimeError()) == "RuntimeError"  # no message: no index error
    assert error_line(ValueError("x" * 500), limit=10) == "ValueError: " + "x" * 10


def test_provenance_names_every_field_of_the_environment():
    import torch

    from omnidraft_fast.report import environment, provenance

    env = environment(torch.device("cpu"))
    line = provenance(env)
    assert all(str(value) in line for value in env.values())
    assert "CUDA 12.8" in provenance({**env, "cuda": "12.8"})
