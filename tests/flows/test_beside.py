"""`flows.beside`: a part of a flow run in a thread as its own sub-flow, its errors, and interrupts."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import flow

from alignheads.flows.beside import beside
from tests.helpers.small_runs import subflow_names


def _part(events: list[str], started: threading.Event, seconds: float = 0.0, error: Exception | None = None):
    def part() -> None:
        started.set()
        time.sleep(seconds)
        if error is not None:
            raise error
        events.append("part done")

    return part


def test_the_part_runs_as_a_sub_flow_beside_the_block(prefect_harness) -> None:
    events: list[str] = []
    started = threading.Event()

    @flow(name="beside-parent")
    def parent() -> None:
        with beside(_part(events, started, seconds=0.2), "beside-part"):
            assert started.wait(30)  # the part runs while the block does
            events.append("block done")

    state = parent(return_state=True)
    assert state.is_completed()
    assert events == ["block done", "part done"]  # the block's end waited for the part
    assert subflow_names(state) == ["beside-part"]


def test_the_parts_error_is_raised_when_the_block_ends(prefect_harness) -> None:
    events: list[str] = []

    @flow(name="beside-part-fails")
    def parent() -> None:
        with beside(_part(events, threading.Event(), error=ValueError("bad dial data")), "beside-part"):
            events.append("block done")

    with pytest.raises(ValueError, match="bad dial data"):
        parent()
    assert events == ["block done"]


def test_a_failing_block_waits_for_the_part_then_raises_its_own_error(prefect_harness) -> None:
    events: list[str] = []

    @flow(name="beside-block-fails")
    def parent() -> None:
        with beside(_part(events, threading.Event(), seconds=0.3), "beside-part"):
            raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        parent()
    assert events == ["part done"]  # nothing was left running when the error came out


def test_an_interrupt_goes_through_without_waiting(prefect_harness) -> None:
    """Ctrl-C in the block leaves at once; the part (here 2 s long) keeps running in its daemon
    thread until the process ends."""
    events: list[str] = []
    started = threading.Event()

    def interrupted() -> None:
        with beside(_part(events, started, seconds=2.0), "beside-part"):
            assert started.wait(30)
            raise KeyboardInterrupt

    @flow(name="beside-interrupted")
    def parent() -> tuple[float, list[str]]:
        t = time.perf_counter()
        try:
            interrupted()
        except KeyboardInterrupt:
            waited, seen = time.perf_counter() - t, list(events)
        # here, unlike after a real Ctrl-C, the process goes on: let the part's sub-flow end
        # inside this flow run, which its API client belongs to
        for thread in threading.enumerate():
            if thread.name == "beside-part":
                thread.join(30)
        return waited, seen

    waited, seen = parent()
    assert 0 <= waited < 1.5 and seen == []  # out before the part finished
    assert events == ["part done"]  # which went on in its thread
