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
            "evaluate": {"target_kls": []},  # no α calibration here (tested on its own)
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
    # its only metrics say it loaded no model (every sweep artifact was complete); no artifacts
    assert rerun.data.metrics == {"model_loads": 0.0, "iav/model_loads": 0.0, "calm/model_loads": 0.0}
    assert client.list_artifacts(rerun.info.run_id) == []
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


# --- trained heads as MLflow models (registry, pyfunc, serving) ---------------------------------

PROMPT = "What is 3 plus 4?"


def _registered(cfg: RunConfig, method: str):
    client = _client(cfg)
    versions = client.search_model_versions(f"name = '{EXPERIMENT}-{method}'")
    return client, sorted(versions, key=lambda v: int(v.version))


def test_every_trained_head_is_a_registered_model_with_newest_and_best_aliases(first):
    cfg, _, outcome = first
    for method in ("iav", "calm"):
        client, versions = _registered(cfg, method)
        assert versions, method
        model = client.get_registered_model(f"{EXPERIMENT}-{method}")
        assert model.aliases["newest"] == versions[-1].version  # the stage flow's calm is version 2
        accuracy = {v.version: float(v.tags["alignheads.eval_accuracy"]) for v in versions}
        best = model.aliases["best"]
        assert accuracy[best] == max(accuracy.values())
        tied = [v.version for v in versions if accuracy[v.version] == accuracy[best]]
        assert min(tied) == best  # on a tie the earlier version keeps `best`
        first_version = versions[0]
        assert first_version.tags["alignheads.train_key"] == outcome.train[method].key
        assert first_version.source == f"runs:/{first_version.run_id}/model"
        run = client.get_run(first_version.run_id)
        assert run.info.run_name == f"train-{method}"
        assert run.data.tags["mlflow.parentRunId"] == outcome.mlflow_run
        names = {a.path for a in client.list_artifacts(first_version.run_id, "model")}
        assert {"model/MLmodel", "model/artifacts"} <= names


def test_best_moves_only_to_a_strictly_better_version_and_newest_always(first):
    """The registry rule on the real SQLite registry: three more versions of the run's model."""
    from alignheads.storage.model_registry import register
    from alignheads.storage.tracking import open_tracker

    cfg, _, outcome = first
    _, versions = _registered(cfg, "iav")
    tracker = open_tracker(cfg.store, EXPERIMENT)
    run_id, name = versions[0].run_id, f"{EXPERIMENT}-rule"
    seen = [register(tracker, run_id, name, accuracy=a) for a in (0.7, 0.6, 0.7, 0.8)]
    assert [r.aliases for r in seen] == [("newest", "best"), ("newest",), ("newest",), ("newest", "best")]
    aliases = tracker.client.get_registered_model(name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"newest": seen[-1].version, "best": seen[-1].version}


@pytest.fixture(scope="module")
def served_calm(first):
    """The registered CALM head loaded through MLflow, with the tiny world's model moved away:
    the model carries its own base (nothing is read from the store but MLflow's own files)."""
    import mlflow

    cfg, _, outcome = first
    world_model = outcome.world.directory / "model"
    aside = world_model.with_name("model-aside")
    mlflow.set_tracking_uri(f"sqlite:///{cfg.store / 'mlflow.db'}")
    world_model.rename(aside)
    try:
        yield cfg, outcome, mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}-calm@best"), aside
    finally:
        aside.rename(world_model)
        mlflow.set_tracking_uri(None)


def test_the_registered_model_answers_prompts_with_alpha_as_a_parameter(served_calm):
    from alignheads import inference

    cfg, outcome, model, aside = served_calm
    schema = {p.name: p.default for p in model.metadata.get_params_schema().params}
    sweep = cfg.sweep
    assert schema == {
        "alpha": 1.0,
        "max_new_tokens": sweep.max_new_tokens,
        "temperature": sweep.temperature,
        "top_p": sweep.top_p,
        "seed": sweep.seed,
    }
    out = model.predict([PROMPT], params={"alpha": 1.5})
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert model.predict([PROMPT], params={"alpha": 1.5}) == out  # seeded: the same request, the same answer

    # what the head itself generates, loaded by the project (the world model put back for it)
    _, versions = _registered(cfg, "calm")
    best = _client(cfg).get_registered_model(f"{EXPERIMENT}-calm").aliases["best"]
    key = next(v for v in versions if v.version == best).tags["alignheads.train_key"]
    aside.rename(outcome.world.directory / "model")
    try:
        aligned, tok = inference.load_for_generation(cfg.store / "train" / key / "head")
    finally:
        (outcome.world.directory / "model").rename(aside)
    text = inference.format_prompt(tok, PROMPT)
    settings = {"max_new_tokens": sweep.max_new_tokens, "do_sample": True, "temperature": sweep.temperature,
                "top_p": sweep.top_p, "top_k": 0}  # fmt: skip
    assert out == inference.generate(aligned, tok, [text], 1.5, seed=sweep.seed, **settings)
    # α = 0 is the plain base model (CALM's modulation is multiplied by α)
    assert model.predict([PROMPT], params={"alpha": 0.0}) == inference.generate_base(
        aligned, tok, [text], seed=sweep.seed, **settings
    )
    greedy = model.predict([PROMPT, "Hello"], params={"temperature": 0.0, "max_new_tokens": 4})
    assert greedy == inference.generate(aligned, tok, [text, inference.format_prompt(tok, "Hello")], 1.0,
                                        seed=sweep.seed, max_new_tokens=4, do_sample=False)  # fmt: skip


def test_mlflow_models_serve_answers_invocations_with_params(served_calm, tmp_path):
    """A real `mlflow models serve` process on 127.0.0.1 answers POST /invocations."""
    import json
    import socket
    import time
    import urllib.request

    cfg, _, model, _ = served_calm
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cfg.store / 'mlflow.db'}",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")  # fmt: skip
    command = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{EXPERIMENT}-calm@best",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        body = json.dumps({"inputs": [PROMPT, "Hello"], "params": {"alpha": 1.5}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert answer == {"predictions": model.predict([PROMPT, "Hello"], params={"alpha": 1.5})}
