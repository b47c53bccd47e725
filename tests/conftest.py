"""Session-wide test settings: offline, no analytics, quiet Prefect."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

# Tiny models run fastest on one thread: two OpenMP threads on two shared cores spin-wait
# (seen here: a 2 ms forward pass took 0.3 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (each start costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield
