"""Fixtures of the reliability tests: the session's Prefect API for subprocesses, and one
uninterrupted reference run of the small config that the kill and concurrency tests compare to."""

from __future__ import annotations

import pytest

from tests.helpers.small_runs import small_run, write_config


@pytest.fixture(scope="session")
def api_url(prefect_harness) -> str:
    """The session harness's Prefect API: pipeline subprocesses talk to it instead of each
    starting an ephemeral server (~15 s per process)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http://127.0.0.1:"), url
    return url


@pytest.fixture(scope="session")
def reference_run(prefect_harness, tmp_path_factory):
    """(store, outcomes) of the small config run once, uninterrupted, in this process."""
    from alignheads.config import load_config
    from alignheads.flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "run.yaml", small_run(root / "store"))
    outcomes = pipeline(config=load_config(config))
    return root / "store", outcomes
