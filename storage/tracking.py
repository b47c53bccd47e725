"""MLflow helpers: one experiment per config name, a parent run per pipeline run, child runs.

Everything goes through `MlflowClient` with explicit run ids (never the thread-local "active
run"), so Prefect tasks running in worker threads log to the right run. The default tracking
store is `sqlite:///<store>/mlflow.db` (absolute) with artifacts under `<store>/mlruns`.

Every run started here is tagged with the process that owns it (`OWNER_TAGS`: host, pid,
process start time, boot and pid namespace). A process killed with SIGKILL cannot end its runs;
`end_dead_runs` (called before each flow run starts its own parent run) marks KILLED, with a
note, the RUNNING runs of the store whose owner is visibly gone: same host and pid namespace,
and the pid no longer exists, is a zombie, now belongs to a process started at another time, or
the machine has rebooted since. Runs of live processes, of other hosts (or containers) and
runs without the tags are left alone.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
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


# --- the process that owns a run -------------------------------------------------------------

OWNER_TAGS = {
    "host": "alignheads.owner.host",
    "pid": "alignheads.owner.pid",
    "start": "alignheads.owner.start",  # process start time: clock ticks after boot (/proc)
    "boot": "alignheads.owner.boot",  # the kernel's boot id: a reboot ends every process
    "pidns": "alignheads.owner.pidns",  # pid namespace: another container's pids are not ours
}
NOTE = "mlflow.note.content"


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """When process `pid` started, as a string comparable on this machine (field 22 of
    /proc/<pid>/stat; psutil's create_time where there is no /proc); None when there is no
    such process or it is a zombie; "" when this platform cannot tell (then the pid alone is
    compared)."""
    if os.path.isfile("/proc/self/stat"):
        stat = _read(f"/proc/{pid}/stat")
        if not stat:  # no such process, or /proc hides other users' (hidepid): ask the kernel
            return _pid_exists(pid)
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ")"
        return None if fields[0] in ("Z", "X") else fields[19]
    try:
        import psutil
    except ImportError:
        return _pid_exists(pid)
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else f"{proc.create_time():.3f}"
    except psutil.Error:
        return None


def _pid_exists(pid: int) -> str | None:
    """An empty string when process `pid` exists (its start time unknown), None when not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # exists, another user's
        pass
    return ""


@dataclass(frozen=True)
class Owner:
    """The process that started a run."""

    host: str
    pid: int
    start: str
    boot: str
    pidns: str

    def tags(self) -> dict[str, str]:
        return {OWNER_TAGS[k]: str(v) for k, v in asdict(self).items()}

    @classmethod
    def of(cls, tags: dict[str, str]) -> Owner | None:
        """The owner a run's tags name, or None (a run from before owners were recorded)."""
        if OWNER_TAGS["host"] not in tags or not tags.get(OWNER_TAGS["pid"], "").isdigit():
            return None
        values = {k: tags.get(tag, "") for k, tag in OWNER_TAGS.items()}
        return cls(**(values | {"pid": int(values["pid"])}))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f", start time {self.start}" if self.start else "")


@functools.lru_cache(maxsize=4)
def _owner_of(pid: int) -> Owner:
    boot = _read("/proc/sys/kernel/random/boot_id")  # Linux only: elsewhere "" (not compared)
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return Owner(socket.gethostname(), pid, process_start(pid) or "", boot, pidns)


def this_process() -> Owner:
    """This process, as the owner of the runs it starts (looked up again after a fork)."""
    return _owner_of(os.getpid())


def is_dead(owner: Owner, here: Owner) -> bool:
    """Whether `owner` is visibly gone as seen from `here`: only a process of the same host and
    pid namespace can be checked; another's is taken to be alive."""
    if owner.host != here.host or owner.pidns != here.pidns:
        return False
    if owner.boot and here.boot and owner.boot != here.boot:
        return True
    start = process_start(owner.pid)
    return start is None or bool(owner.start and start and start != owner.start)


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

        all_tags = this_process().tags() | dict(tags or {})
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

    def log_history(self, run_id: str, rows: Iterable[dict[str, Any]]) -> None:
        """Metrics at their own steps, from (step, name, value) rows (a train_metrics table)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(r["name"], float(r["value"]), now, int(r["step"])) for r in rows]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def first_run(self, filter_string: str):
        """The earliest active run of any experiment of this tracking store matching the filter
        (artifact keys are content hashes: the same key under another config name is the same
        result), or None."""
        client = self.client
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(
            experiments, filter_string, max_results=1, order_by=["attributes.start_time ASC"]
        )
        return found[0] if found else None


def end_dead_runs(tracker: Tracker) -> list[str]:
    """Mark KILLED every RUNNING run of the tracking store (all experiments) whose owning process
    is visibly gone (see `is_dead`), with a note saying why; returns their ids."""
    client, here = tracker.client, this_process()
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"attributes.status = 'RUNNING' AND tags.`{OWNER_TAGS['host']}` = '{here.host}'"
    ended, token = [], None
    while True:
        page = client.search_runs(experiments, query, max_results=1000, page_token=token)
        for run in page:
            owner = Owner.of(run.data.tags)
            if owner is None or not is_dead(owner, here):
                continue
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
            note = (
                f"Marked KILLED at {stamp} by {here.describe()}: its process ({owner.describe()}) "
                "was gone while the run was still RUNNING (killed, or its machine restarted)."
            )
            before = run.data.tags.get(NOTE, "")
            tracker.set_tags(run.info.run_id, {NOTE: f"{before}\n\n{note}" if before else note})
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
        token = page.token
        if not token:
            return ended


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
