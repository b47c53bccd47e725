"""A flow run that stops on the user's mistake ends in a Failed state whose message is the one-line
reason, on the Prefect API too (what the UI shows and `--watch` reports); in-process callers still
get the error itself; the flows' parameter forms are unchanged by the decorator (issue 21, item 9)."""

from __future__ import annotations

import asyncio

import pytest
from prefect.utilities.callables import parameter_schema

from alignheads.flows.failures import one_line
from alignheads.flows.pipeline import pipeline
from alignheads.flows.stages import MissingArtifactError, refpass_flow, sweep_flow, train_flow

pytestmark = pytest.mark.integration


def _api_state(flow_run_id):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state

    return asyncio.run(read())


def test_a_missing_key_fails_the_run_with_its_one_line_as_the_state_message(prefect_harness, tmp_path):
    state = train_flow(refpass_key="deadbeef", store=tmp_path / "store", return_state=True)
    want = (
        "MissingArtifactError: refpass_key='deadbeef': no complete refpass artifact in the store "
        f"({tmp_path / 'store' / 'refpass' / 'deadbeef'} has no manifest.json); run the pipeline or "
        "the stage that builds it first"
    )
    assert state.is_failed() and state.message == want
    assert _api_state(state.state_details.flow_run_id).message == want
    with pytest.raises(MissingArtifactError, match="refpass_key='deadbeef'"):
        train_flow(refpass_key="deadbeef", store=tmp_path / "store")
    # a config mistake (several lines) is one line too
    state = pipeline(overrides=[f"store={tmp_path / 'other'}", "sweep.alphaz=[1]"], return_state=True)
    assert state.is_failed() and "\n" not in state.message
    assert state.message.startswith("ConfigError: invalid configuration") and "sweep.alphaz" in state.message


def test_a_missing_data_file_fails_before_any_stage_runs(prefect_harness, tmp_path, monkeypatch):
    """On an empty store the tiny world would be built first (minutes): the missing file must be
    found before that (issue 21, item 5)."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    state = pipeline(
        overrides=[f"store={store}", "data.train={path: missing.jsonl}", "tracking.enabled=false"],
        return_state=True,
    )
    assert state.is_failed()
    assert state.message == (
        "FileNotFoundError: data.train: preference data file missing.jsonl not found "
        f"(relative paths are read from {tmp_path})"
    )
    assert not (store / "world").exists() and not (store / "data").exists()


def test_the_decorator_keeps_every_flows_parameter_form():
    for flow in (pipeline, refpass_flow, train_flow, sweep_flow):
        assert flow.parameters == parameter_schema(flow.fn.__wrapped__), flow.name
    assert set(train_flow.parameters.properties) == {
        "refpass_key",
        "store",
        "name",
        "model",
        "train",
        "tracking",
    }


def test_one_line():
    assert one_line(ValueError("a:\n  b: c\n  d: e")) == "ValueError: a: b: c; d: e"
    assert one_line(KeyError()) == "KeyError"
