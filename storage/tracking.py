"""MLflow helpers: one experiment per config name, a parent run per pipeline run, child runs.

Everything goes through `MlflowClient` with explicit run ids (never the thread-local "active
run"), so Prefect tasks running in worker threads log to the right run. The default tracking
store is `sqlite:///<store>/mlflow.db` (absolute) with artifacts under `<store>/mlruns`.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignheads.storage.atomic import fsync_dir
from alignheads.storage.store_errors import writing

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

    def log_dataset(
        self,
        run_id: str,
        name: str,
        digest: str,
        source: str,
        *,
        schema: dict[str, Any] | None = None,
        profile: dict[str, Any] | None = None,
        context: str = "training",
    ) -> None:
        """Record a dataset as an input of the run (the MLflow UI's "Datasets used" column).

        ``digest`` identifies the content (the artifact key); ``source`` is where it lives.
        """
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],  # MLflow's digest column holds 36 characters
            source_type="local" if "://" not in source else source.split("://", 1)[0],
            source=json.dumps({"uri": source}),
            schema=json.dumps(schema) if schema is not None else None,
            profile=json.dumps(profile) if profile is not None else None,
        )
        tags = [InputTag("mlflow.data.context", context)]
        from mlflow.exceptions import MlflowException

        for attempt in range(3):
            try:
                self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
                return
            except MlflowException as exc:
                # Two runs logging the same dataset at once: MLflow checks, then inserts, and the
                # slower one hits the unique key. The dataset exists now: linking it again works.
                if "UNIQUE constraint failed" not in str(exc) or attempt == 2:
                    raise

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI, else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) and uri != f"{prefix}:memory:" else None


def ensure_sqlite_db(uri: str, artifact_root: Path) -> None:
    """Create the MLflow SQLite database of `uri` once, atomically, if it does not exist yet.

    MLflow creates a new database by running its migrations in place: two processes doing it at
    once both fail (`table ... already exists`, `Online migration expected to match one row`),
    and a process killed half-way leaves a database no later run can open. Here one process at a
    time (a file lock) builds it under a temporary name and renames it into place when complete.
    """
    db = sqlite_path(uri)
    if db is None or db.is_file():
        return
    with writing(db, db.parent):
        _create_sqlite_db(db, artifact_root)


def _create_sqlite_db(db: Path, artifact_root: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if db.is_file():  # created by another process while this one waited
            return
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        for stale in db.parent.glob(f".{db.name}.tmp-*"):  # left by killed processes (we hold the lock)
            stale.unlink(missing_ok=True)
        tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
        built = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root.resolve().as_uri())
        built.engine.dispose()
        SqlAlchemyStore._engine_map.pop(f"sqlite:///{tmp}", None)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, db)
        fsync_dir(db.parent)


def open_tracker(store: Path, experiment: str, uri: str | None = None) -> Tracker:
    """Get or create the experiment (artifacts under `<store>/mlruns/<experiment>`)."""
    from mlflow.tracking import MlflowClient

    uri = uri or default_tracking_uri(store)
    ensure_sqlite_db(uri, Path(store) / "mlruns")
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
