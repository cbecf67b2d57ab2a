"""Where a measurement was taken: device, package versions and commit, for every results file."""

from __future__ import annotations

import datetime
import platform
import subprocess

import torch

__all__ = ["device_name", "environment"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def _commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """Date, device, torch/triton/transformers versions (and the CUDA driver's) and the git commit."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "commit": _commit(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda or "unknown"
    return env
