"""MLflow helpers against a real SQLite tracking store: datasets logged as run inputs, also by
several runs at once (two pipeline runs on one store log the same pairs)."""

from __future__ import annotations

import threading

from alignheads.storage.tracking import open_tracker


def test_the_same_dataset_logged_by_runs_at_once_links_to_every_run(tmp_path):
    tracker = open_tracker(tmp_path, "datasets")
    runs = [tracker.start_run(f"run-{i}") for i in range(6)]
    barrier, errors = threading.Barrier(len(runs)), []

    def log(run_id: str) -> None:
        barrier.wait()  # all insert the same (experiment, name, digest) together
        try:
            tracker.log_dataset(run_id, "pairs", "0123abcd", "/data/pairs", profile={"num_rows": 3})
        except Exception as exc:  # noqa: BLE001 (collected and reported below)
            errors.append(exc)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for run_id in runs:
        inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in inputs] == [
            ("pairs", "0123abcd", "training")
        ]


def _run_of_a_killed_process(store) -> tuple[str, int]:
    """(run id, pid) of a run started by another process through the project's Tracker, which
    was then SIGKILLed: the run is left RUNNING, as a killed `alignheads run` leaves it."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "from alignheads.storage.tracking import open_tracker\n"
        "run = open_tracker(sys.argv[1], 'reaped').start_run('killed')\n"
        "print(run, os.getpid(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    run_id, pid = done.stdout.split()
    return run_id, int(pid)


def test_runs_whose_process_is_gone_are_marked_killed_and_no_others(tmp_path):
    """Every run records its owning process (host, pid, start time); ending dead runs marks
    KILLED, with a note, exactly those of this host whose process is gone or whose pid now
    belongs to another process. Live processes' runs, other hosts' and untagged runs stay."""
    import os
    import socket

    from alignheads.storage.tracking import OWNER_TAGS, end_dead_runs, process_start

    tracker = open_tracker(tmp_path, "reaped")
    killed, dead_pid = _run_of_a_killed_process(tmp_path)
    alive = tracker.start_run("alive")  # owned by this (live) process
    mine = tracker.client.get_run(alive).data.tags
    owner = {key: mine[key] for key in OWNER_TAGS.values()}
    assert mine[OWNER_TAGS["host"]] == socket.gethostname()
    assert mine[OWNER_TAGS["pid"]] == str(os.getpid())
    assert mine[OWNER_TAGS["start"]] == process_start(os.getpid()) != ""
    killed_tags = tracker.client.get_run(killed).data.tags
    assert (
        killed_tags[OWNER_TAGS["pid"]] == str(dead_pid)
        and killed_tags[OWNER_TAGS["host"]] == owner[OWNER_TAGS["host"]]
    )

    def left_by(name: str, **changed: str) -> str:
        tags = owner | {OWNER_TAGS[k]: v for k, v in changed.items()}
        return tracker.client.create_run(tracker.experiment_id, run_name=name, tags=tags).info.run_id

    reused_pid = left_by("pid-reused", start="1")  # this pid, but another process's start time
    elsewhere = left_by("other-host", host="elsewhere.invalid", pid=str(dead_pid))
    untagged = tracker.client.create_run(tracker.experiment_id, run_name="untagged").info.run_id
    other_experiment = open_tracker(tmp_path, "another")
    dead_there = other_experiment.client.create_run(
        other_experiment.experiment_id, run_name="dead", tags=owner | {OWNER_TAGS["pid"]: str(dead_pid)}
    ).info.run_id

    assert sorted(end_dead_runs(tracker)) == sorted([killed, reused_pid, dead_there])
    status = {r: tracker.client.get_run(r).info.status for r in (killed, reused_pid, dead_there)}
    assert status == dict.fromkeys(status, "KILLED")
    for run_id in (alive, elsewhere, untagged):
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
    note = tracker.client.get_run(killed).data.tags["mlflow.note.content"]
    assert f"pid {dead_pid}" in note and "KILLED" in note and str(os.getpid()) in note
    assert end_dead_runs(tracker) == []  # nothing left to end
