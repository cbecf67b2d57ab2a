"""The repository's ``kernels/`` folder (installed as ``omnidraft_fast.kernels``) is also importable as a
top-level ``kernels`` wherever the checkout's root is on ``sys.path`` (``python -m pytest`` run there). That
name belongs to Hugging Face's ``kernels`` distribution, which transformers 5.25 installs and imports:
where one is installed, the folder hands the import over to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_kernels(tmp_path: Path, installed: bool) -> str:
    if installed:  # a stand-in for the distribution, on sys.path after the checkout's root
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    code = "import kernels; print(getattr(kernels, 'CUDAProperties', None), kernels.__file__)"
    run = subprocess.run(  # -S: without site-packages, where the real distribution may be installed
        [sys.executable, "-S", "-c", code],
        cwd=ROOT,  # -c puts the working directory first on sys.path, as -m does
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.split()


def test_an_installed_kernels_distribution_wins_over_the_folder(tmp_path):
    name, path = _import_kernels(tmp_path, installed=True)
    assert name == "hub" and Path(path) == tmp_path / "kernels" / "__init__.py"


def test_without_one_the_folder_imports_as_before(tmp_path):
    name, path = _import_kernels(tmp_path, installed=False)
    assert name == "None" and Path(path) == ROOT / "kernels" / "__init__.py"
