"""What a flow run leaves in MLflow: runs of killed processes are ended before a new run starts,
a run that recomputes nothing adds one parent run tagged as cached (no copies of child runs),
and a stage flow logs child runs only for what it computed. Also: the pipeline's first write on
a store it cannot create is the same one-line error as every later write.

One computing pipeline run on a 64-pair world (module fixture); the re-runs are cached or
train one head for a few steps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alignheads.config import RunConfig
from alignheads.flows.pipeline import pipeline
from alignheads.flows.stages import train_flow
from alignheads.world.build import tiny_test_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT = "mlflow-runs"
# the tags naming the process that started a run (alignheads.storage.tracking.OWNER_TAGS)
OWNER = {"host": "alignheads.owner.host", "pid": "alignheads.owner.pid", "start": "alignheads.owner.start"}


def small_config(store: Path) -> RunConfig:
    """Every stage in seconds: 48 train / 16 test pairs, 3 steps per head, 4 prompts at 2 α."""
    return RunConfig.model_validate(
        {
            "name": EXPERIMENT,
            "store": str(store),
            "world": tiny_test_config(
                n_train_pairs=48,
                n_test_pairs=16,
                pretrain_steps=30,
                n_pretrain_dialogues=400,
                report_samples=4,
                report_max_new_tokens=8,
            ).model_dump(),
            "tokenize": {"max_prompt_length": 48, "max_response_length": 32},
            "refpass": {"k": 16, "pairs_per_shard": 64},
            "train": {
                "iav": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "eval_every": 2},
                "calm": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "rank": 4, "eval_every": 2},
            },
            "sweep": {"alphas": [0, 1], "n_prompts": 4, "max_new_tokens": 8, "batch_size": 4},
        }
    ).resolved()


def _client(cfg: RunConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cfg.store / 'mlflow.db'}")  # not set_tracking_uri


def _runs(cfg: RunConfig, filter_string: str = "") -> list:
    client = _client(cfg)
    return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], filter_string)


def _children(cfg: RunConfig, parent: str) -> list[str]:
    return sorted(r.info.run_name for r in _runs(cfg, f"tags.mlflow.parentRunId = '{parent}'"))


def _left_behind(store: Path) -> dict[str, str]:
    """Runs on the store before the pipeline runs: one of a SIGKILLed process (left RUNNING),
    one of this live process, one of a process on another host."""
    from alignheads.storage.tracking import open_tracker

    code = (
        "import os, signal, sys\n"
        "from alignheads.storage.tracking import open_tracker\n"
        "print(open_tracker(sys.argv[1], sys.argv[2]).start_run('killed'), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(store), EXPERIMENT], capture_output=True, text=True, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    tracker = open_tracker(store, EXPERIMENT)
    alive = tracker.start_run("alive")
    owner = {
        k: v for k, v in tracker.client.get_run(alive).data.tags.items() if k.startswith("alignheads.owner.")
    }
    elsewhere = tracker.client.create_run(
        tracker.experiment_id, run_name="elsewhere", tags=owner | {OWNER["host"]: "elsewhere.invalid"}
    ).info.run_id
    return {"killed": done.stdout.strip(), "alive": alive, "elsewhere": elsewhere}


@pytest.fixture(scope="module")
def first(prefect_harness, tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("mlflow-runs") / "store")
    stale = _left_behind(cfg.store)
    return cfg, stale, pipeline(config=cfg)


def test_the_next_run_ends_the_runs_of_killed_processes_first(first):
    cfg, stale, outcome = first
    client = _client(cfg)
    killed = client.get_run(stale["killed"])
    assert killed.info.status == "KILLED"
    assert "KILLED" in killed.data.tags["mlflow.note.content"]
    assert killed.info.end_time <= client.get_run(outcome.mlflow_run).info.start_time  # before its own
    # a live process's run and another host's are not this run's to end
    assert client.get_run(stale["alive"]).info.status == "RUNNING"
    assert client.get_run(stale["elsewhere"]).info.status == "RUNNING"


def test_every_run_records_the_process_that_owns_it(first):
    cfg, _, outcome = first
    runs = [_client(cfg).get_run(outcome.mlflow_run)] + _runs(
        cfg, f"tags.mlflow.parentRunId = '{outcome.mlflow_run}'"
    )
    assert len(runs) == 1 + 2 + 4  # parent, train-{iav,calm}, eval-{iav,calm}-alpha-{0,1}
    for run in runs:
        assert run.data.tags[OWNER["pid"]] == str(os.getpid()), run.info.run_name
        assert run.data.tags[OWNER["start"]], run.info.run_name
        assert run.info.status == "FINISHED"


def test_a_run_that_recomputes_nothing_adds_one_cached_parent_run_and_no_copies(first):
    cfg, _, outcome = first
    client = _client(cfg)
    parent = client.get_run(outcome.mlflow_run)
    assert parent.data.tags["alignheads.cached"] == "false"
    trained = {
        r.info.run_name: r.info.run_id
        for r in _runs(cfg, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }
    before = {r.info.run_id for r in _runs(cfg)}

    again = pipeline(config=cfg)
    assert {r.status for _, r in again.stages()} == {"cached"}
    added = [r for r in _runs(cfg) if r.info.run_id not in before]
    assert [r.info.run_id for r in added] == [again.mlflow_run]  # one parent run, no child runs
    rerun = added[0]
    assert rerun.info.status == "FINISHED" and rerun.info.run_id != outcome.mlflow_run
    assert rerun.data.tags["alignheads.cached"] == "true"
    assert rerun.data.tags["alignheads.results_run"] == outcome.mlflow_run  # who computed them
    assert rerun.data.tags["alignheads.reused.train-iav"] == trained["train-iav"]
    assert rerun.data.tags["alignheads.reused.train-calm"] == trained["train-calm"]
    assert rerun.data.metrics == {} and client.list_artifacts(rerun.info.run_id) == []
    assert rerun.data.params["name"] == EXPERIMENT  # still a record of this flow run's config


def test_a_stage_flow_logs_child_runs_only_for_what_it_computed(first):
    cfg, _, outcome = first
    calm = cfg.train.calm.model_copy(update={"lr": 1e-3})
    out = train_flow(
        refpass_key=outcome.refpass.key,
        store=cfg.store,
        name=cfg.name,
        model=cfg.model,
        train=cfg.train.model_copy(update={"calm": calm}),
        tracking=cfg.tracking,
    )
    assert {k: v.status for k, v in out.stages()} == {"train iav": "cached", "train calm": "computed"}
    assert out.mlflow_run is not None  # the parent run this flow run logged to
    assert _children(cfg, out.mlflow_run) == ["train-calm"]
    parent = _client(cfg).get_run(out.mlflow_run)
    assert parent.data.params["refpass_key"] == outcome.refpass.key
    assert parent.data.tags["alignheads.cached"] == "false"
    first_iav = _runs(
        cfg, f"tags.mlflow.parentRunId = '{outcome.mlflow_run}' AND attributes.run_name = 'train-iav'"
    )
    assert parent.data.tags["alignheads.reused.train-iav"] == first_iav[0].info.run_id
    (child,) = _runs(cfg, f"tags.mlflow.parentRunId = '{out.mlflow_run}'")
    steps = out.train["calm"].info["steps"]
    assert len(_client(cfg).get_metric_history(child.info.run_id, "loss")) == steps > 0


def test_the_first_write_to_a_store_it_cannot_create_is_one_clear_line(prefect_harness, tmp_path):
    """`alignheads run` with the store three levels under a directory nobody may write: the
    store's creation fails on the first of them, and says so in the StoreWriteError line."""
    from prefect.settings import PREFECT_API_URL

    readonly = tmp_path / "readonly"
    readonly.mkdir()
    store = readonly / "a" / "b" / "store"
    command = [str(Path(sys.executable).parent / "alignheads"), "run", "--set", f"store={store}"]
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no directory is read-only to this process")
        command = ["setpriv", "--bounding-set=-dac_override", *command]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    readonly.chmod(0o555)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        readonly.chmod(0o755)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {store}: cannot write (permission denied): no permission to write there; "
        "point --set store=DIR at a directory you can write"
    ], done.stderr[-3000:]
    assert "PermissionError" not in done.stderr.splitlines()[-1]
    assert not (readonly / "a").exists()
