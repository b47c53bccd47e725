"""`runtime.pin_torch_threads`: the run's torch CPU thread count, set with or without torch imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _python(code: str, threads_env: str = "2") -> list[str]:
    """Run `code` in a fresh interpreter with OMP_NUM_THREADS=`threads_env`; its printed lines."""
    env = dict(os.environ, OMP_NUM_THREADS=threads_env)
    env.pop("MKL_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_before_torch_is_imported_the_environment_carries_the_count() -> None:
    """A run that has not imported torch (a cached re-run) does not import it to pin the count;
    torch imported later, and any process it starts, run on the pinned count."""
    out = _python(
        "import os, subprocess, sys\n"
        "from alignheads.runtime import pin_torch_threads\n"
        "pin_torch_threads(1)\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.get_num_threads())\n"
        "child = 'import torch; print(torch.get_num_threads())'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout.strip())\n"
    )
    assert out == ["False", "1", "1"]


def test_after_torch_is_imported_it_is_set_on_torch() -> None:
    """Set on torch itself, it holds for threads started later too (the task runner's)."""
    out = _python(
        "import os, threading, torch\n"
        "from alignheads.runtime import pin_torch_threads\n"
        "print(torch.get_num_threads())\n"
        "pin_torch_threads(1)\n"
        "seen = []\n"
        "worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))\n"
        "worker.start(); worker.join()\n"
        "print(torch.get_num_threads(), seen[0], os.environ['OMP_NUM_THREADS'])\n"
    )
    assert out == ["2", "1", "1", "1"]


@pytest.mark.parametrize("torch_first", [False, True])
def test_none_leaves_torch_its_own_choice(torch_first: bool) -> None:
    out = _python(
        ("import torch\n" if torch_first else "")
        + "import os\n"
        "from alignheads.runtime import pin_torch_threads\n"
        "pin_torch_threads(None)\n"
        "import torch\n"
        "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], 'MKL_NUM_THREADS' in os.environ)\n"
    )
    assert out == ["2", "2", "False"]
