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
