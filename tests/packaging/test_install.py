"""A plain (non-editable) install works from any directory: the wheel carries every sub-package
and the shipped configs, and the embedded default is read from inside the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNSHIPPED = (".git", ".venv", "store", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The project built as a wheel (no network: this environment's setuptools) and installed,
    without its dependencies, into a directory of its own."""
    root = tmp_path_factory.mktemp("install")
    wheels, target = root / "wheels", root / "site"
    # built from a copy, so that the build leaves nothing in the checkout
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*UNSHIPPED))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)]
    subprocess.run(build, check=True, cwd=root, capture_output=True, timeout=300)
    wheel = next(wheels.glob("alignheads-*.whl"))
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300
    )
    return {"root": root, "wheel": wheel, "site": target}


def _run(installed: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    """`python args...` from a directory outside the checkout, importing only the installed copy
    (the dependencies come from this environment's site-packages, after it on the path)."""
    env = {**os.environ, "PYTHONPATH": str(installed["site"])}
    away = installed["root"] / "elsewhere"
    away.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-P", *args], cwd=away, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_wheel_carries_every_package_and_the_shipped_configs(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for path in (
        "alignheads/cli.py",
        "alignheads/flows/pipeline.py",
        "alignheads/tasks/train.py",
        "alignheads/tasks/training/loop.py",
        "alignheads/tasks/reporting/plots.py",
        "alignheads/models/methods.py",
        "alignheads/storage/artifacts.py",
        "alignheads/world/build.py",
        "alignheads/serving.py",  # the MLflow models-from-code file
        "alignheads/tasks/export.py",
        "alignheads/storage/model_registry.py",
        "alignheads/configs/tiny.yaml",
        "alignheads/configs/llama7b-hh.yaml",
        "alignheads/configs/spaces/tiny.yaml",  # the embedded default's search space
    ):
        assert path in names, path
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_copy_reads_its_embedded_default_and_answers_help(installed):
    probe = _run(
        installed,
        "-c",
        "import alignheads, alignheads.flows.pipeline as p; from alignheads.config import read_config;"
        "print(alignheads.__file__); print(p.__file__); print(read_config().train.iav.lr);"
        "from alignheads.config import load_search_space; print(load_search_space().trials)",
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, pipeline_file, lr, trials = probe.stdout.split()
    assert int(trials) > 0  # configs/spaces/tiny.yaml, read from the installed package data
    assert Path(where).is_relative_to(installed["site"]) and Path(pipeline_file).is_relative_to(
        installed["site"]
    )
    assert float(lr) == 5e-3  # configs/tiny.yaml's, read from the installed package data
    for verb in ("run", "query", "tune"):
        helped = _run(installed, "-m", "alignheads.cli", verb, "--help")
        assert helped.returncode == 0, helped.stderr[-3000:]
        assert f"usage: alignheads {verb}" in helped.stdout
