"""benchmarks/gpu_suite.sh, on any machine: its list of step names (what STEPS may name) is the steps it runs,
and a name that is no step stops it before anything runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def test_the_known_steps_are_the_steps_the_suite_runs():
    script = SUITE.read_text()
    known = set(re.search(r'KNOWN="([^"]*)"', script).group(1).split())
    pairs = set(re.findall(r"zoo_targets=\(([^)]*)\)", script)[0].split())  # FULL's targets: every pair
    run = set(re.findall(r"^\s*step (\w+) ", script, re.MULTILINE))
    run |= {f"bench_{op}" for op in re.findall(r"^\s*bench (\w+) ", script, re.MULTILINE)}
    for prefix in re.findall(r'step "(\w+)_\$pair"', script):
        run |= {f"{prefix}_{pair}" for pair in pairs}
    assert run == known


def test_a_name_that_is_no_step_stops_the_suite(tmp_path):
    result = subprocess.run(
        ["bash", str(SUITE)],
        env={
            "PATH": "/usr/bin:/bin",
            "OUT": str(tmp_path),
            "WORK": str(tmp_path / "work"),
            "STEPS": "e2e bench_verfy",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown step in STEPS: bench_verfy" in result.stdout
    assert not (tmp_path / "gpu-results.tgz").exists()
