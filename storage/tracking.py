"""MLflow helpers: one experiment per config name, a parent run per pipeline run, child runs.

Everything goes through `MlflowClient` with explicit run ids (never the thread-local "active
run"), so Prefect tasks running in worker threads log to the right run. The default tracking
store is `sqlite:///<store>/mlflow.db` (absolute) with artifacts under `<store>/mlruns`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_URI = "MLFLOW_TRACKING_URI"


def default_tracking_uri(store: Path) -> str:
    """`sqlite:///<absolute store>/mlflow.db`, unless MLFLOW_TRACKING_URI is set."""
    return os.environ.get(ENV_URI) or f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict / pydantic model → {"a.b": "value"} for MLflow params (values as strings)."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix.rstrip(".")] = str(config)[:6000]  # MLflow's param value limit
    return out


@dataclass(frozen=True)
class Tracker:
    """A client bound to one tracking URI and experiment."""

    uri: str
    experiment_id: str

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def start_run(
        self,
        name: str,
        params: dict[str, str] | None = None,
        parent: str | None = None,
        tags: dict | None = None,
    ) -> str:
        """Create a run (a child when `parent` is given); returns its id."""
        from mlflow.entities import Param, RunTag

        all_tags = dict(tags or {})
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        if params:
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow's batch limit
                self.client.log_batch(run_id, params=items[i : i + 100])
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One batched call (a single log_metric costs ~7 ms against SQLite)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_artifacts(self, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def open_tracker(store: Path, experiment: str, uri: str | None = None) -> Tracker:
    """Get or create the experiment (artifacts under `<store>/mlruns/<experiment>`)."""
    from mlflow.tracking import MlflowClient

    uri = uri or default_tracking_uri(store)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return Tracker(uri, found.experiment_id)
    location = (Path(store).resolve() / "mlruns" / experiment).as_uri()
    try:
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    except Exception:  # another process created it meanwhile
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        experiment_id = found.experiment_id
    return Tracker(uri, experiment_id)
