"""Where a measurement was taken (device, package versions, commit) and how results files are written."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["device_name", "environment", "error_line", "provenance", "synchronize", "write_results"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def _commit() -> str:
    """This checkout's commit, wherever the script runs from, with ``-dirty`` where its Python code or
    pyproject.toml differs from it (result files written by a run do not count)."""
    where = {"cwd": Path(__file__).resolve().parent, "stderr": subprocess.DEVNULL}
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, **where).strip()
        changed = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", ":(top,glob)**/*.py", ":(top)pyproject.toml"], **where
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changed else "")


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


def provenance(env: dict[str, str]) -> str:
    """One line for a results file's Markdown title: an :func:`environment`'s every field."""
    cuda = f", CUDA {env['cuda']}" if "cuda" in env else ""
    return (
        f"{env['date']}, {env['device']}, torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}{cuda}, commit {env['commit']}"
    )


def error_line(error: BaseException, limit: int = 300) -> str:
    """An exception in one line for a results file: its type and the first line of its message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU. Call around every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PARTIAL = (
    "**Partial results**: written while the run went on, which stopped before its end or is still running; "
    "what is missing was not measured."
)


def write_results(stem: Path, result: dict, markdown: str, complete: bool | None = None) -> None:
    """``stem``.json and ``stem``.md (creating the folder), and the Markdown on stdout.

    A benchmark that writes after each unit of work, so that a run killed by a time limit keeps what it
    measured, passes ``complete``: it becomes the JSON's ``"complete"`` field; a partial write also gets
    ``PARTIAL`` under the Markdown's title and is not printed (one line says where it went)."""
    if complete is not None:
        result = {**result, "complete": complete}
    if complete is False:
        title, _, rest = markdown.partition("\n")
        markdown = f"{title}\n\n{PARTIAL}\n{rest}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown)):
        # Written aside, then renamed over the last write: a run killed while writing keeps a whole file.
        aside = stem.with_suffix(f"{suffix}.tmp")
        aside.write_text(text)
        aside.replace(stem.with_suffix(suffix))
    print(f"partial results written to {stem}.json and .md" if complete is False else markdown, flush=True)
