"""The deployments end to end, as a user runs them: a real `prefect server start`, the work pool,
`prefect --no-prompt deploy --all` from the repository root, a worker, and a run created through
the REST endpoint the UI's "Run" button calls, with parameters overridden to a test-size world
and a temporary store. Everything started here is stopped at teardown (whole process groups).

The session's `prefect_harness` is not used: this module needs a server that the worker and
the flow-run processes it spawns can reach.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignheads.config import RunConfig, SearchSpace, read_config
from alignheads.storage.manifest import MANIFEST, verify_artifact
from alignheads.storage.query import run_query
from alignheads.world.build import tiny_test_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
CHROMIUM = Path("/usr/bin/chromium")
DEPLOYMENTS = {"tiny", "llama7b-hh", "refpass", "train", "sweep", "tune"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A subprocess in its own process group (so teardown can stop it and its children)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    proc.wait(timeout=15)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    """`prefect server start` on 127.0.0.1 at a free port with its own PREFECT_HOME and database."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # tiny models: more threads only spin on shared cores
        "PWD": str(REPO),  # prefect.yaml's pull step records {{ $PWD }} at deploy time
    }
    log = root / "server.log"
    proc = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"prefect server exited:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not up after 180 s:\n{_tail(log)}"
            time.sleep(0.5)
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": env, "root": root}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def deployed(server) -> Iterator[dict[str, dict]]:
    """The work pool, every deployment of prefect.yaml, and a worker polling the pool."""
    env, root = server["env"], server["root"]

    def cli(*args: str) -> str:
        done = subprocess.run(
            [PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
        )
        assert done.returncode == 0, (
            f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done.stdout

    cli("work-pool", "create", "alignheads", "--type", "process")
    worker = _start([PREFECT, "worker", "start", "--pool", "alignheads"], env, root / "worker.log")
    try:
        cli("--no-prompt", "deploy", "--all")
        found = httpx.post(f"{server['api']}/deployments/filter", json={}, timeout=30).json()
        yield {d["name"]: d for d in found}
    finally:
        _stop(worker)


def test_every_deployment_is_registered_with_a_typed_form(server, deployed):
    assert set(deployed) == DEPLOYMENTS
    # the form the UI draws: GET /api/deployments/{id} -> parameter_openapi_schema
    tiny = httpx.get(f"{server['api']}/deployments/{deployed['tiny']['id']}").json()
    schema = tiny["parameter_openapi_schema"]
    # the config is a typed RunConfig (empty: the embedded default, read when the run starts)
    assert {"$ref": "#/definitions/RunConfig"} in schema["properties"]["config"]["anyOf"]
    run_cfg = schema["definitions"]["RunConfig"]
    assert run_cfg["properties"]["name"]["description"] == "Run name; also the MLflow experiment name"
    refpass = schema["definitions"]["RefPassConfig"]["properties"]
    assert refpass["k"]["type"] == "integer" and refpass["k"]["default"] == 64 and refpass["k"]["description"]
    assert schema["definitions"]["RunnerConfig"]["properties"]["kind"]["enum"] == ["threads", "processes", "dask"]
    assert schema["definitions"]["SweepConfig"]["properties"]["alphas"]["items"]["type"] == "number"
    # the form starts from the deployment's parameters: the embedded default, configs/tiny.yaml
    # (not RunConfig's seed defaults), as the server stores it
    default = tiny["parameters"]["config"]
    assert RunConfig.model_validate(default) == read_config()
    assert default["train"]["iav"]["lr"] == read_config().train.iav.lr != RunConfig().train.iav.lr
    assert schema["properties"]["overrides"]["anyOf"][0]["items"]["type"] == "string"
    # stage flows: the input keys are required strings with descriptions
    for name, keys in {
        "refpass": ["tokenize_key"],
        "train": ["refpass_key"],
        "sweep": ["train_keys", "data_key"],
    }.items():
        dep = httpx.get(f"{server['api']}/deployments/{deployed[name]['id']}").json()
        stage = dep["parameter_openapi_schema"]
        assert stage["required"] == keys, name
        assert all("store/" in stage["properties"][k]["description"] for k in keys), name
    assert stage["properties"]["train_keys"]["items"]["type"] == "string"
    # the search: a typed search space, given as the deployment's parameters
    tune = httpx.get(f"{server['api']}/deployments/{deployed['tune']['id']}").json()
    assert "SearchSpace" in tune["parameter_openapi_schema"]["definitions"]
    assert SearchSpace.model_validate(tune["parameters"]["space"]).trials == 4
    # the real-model template: deployed with its parameters, never run here
    real = httpx.get(f"{server['api']}/deployments/{deployed['llama7b-hh']['id']}").json()
    real_cfg = RunConfig.model_validate(real["parameters"]["config"])  # no typo in prefect.yaml
    assert real_cfg.model.dtype == "bfloat16" and real_cfg.world.build is False
    assert real["parameters"]["config"]["train"]["iav"]["mixed_precision"] == "bf16"
    # the pull step points at this checkout, resolved at deploy time
    assert real["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)


def _test_size_config(store: Path) -> dict:
    world = tiny_test_config(
        n_train_pairs=64,
        n_test_pairs=32,
        pretrain_steps=30,
        n_pretrain_dialogues=400,
        report_samples=4,
        report_max_new_tokens=16,
    )
    return {
        "name": "deploy-test",
        "store": str(store),
        "world": world.model_dump(mode="json"),
        "tokenize": {"max_prompt_length": 48, "max_response_length": 32},
        "refpass": {"k": 16, "pairs_per_shard": 64},
        "train": {
            "iav": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "eval_every": 4},
            "calm": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "rank": 4, "eval_every": 4},
        },
        "sweep": {"alphas": [0, 1], "n_prompts": 6, "max_new_tokens": 8, "batch_size": 4},
        "evaluate": {"target_kls": []},  # no α calibration here (tested on its own)
    }


def _post_retrying_503(url: str, json: dict) -> httpx.Response:
    """POST as Prefect's own client does: a 503 (the server's SQLite busy under load; its
    transaction was rolled back) is retried with backoff, any other answer returned."""
    for attempt in range(6):
        response = httpx.post(url, json=json, timeout=30)
        if response.status_code != 503:
            return response
        time.sleep(0.5 * 2**attempt)
    return response


def test_tiny_run_from_the_ui_endpoint(server, deployed, tmp_path):
    """POST /api/deployments/{id}/create_flow_run (what the UI's Run button sends), picked up by
    the worker, run to COMPLETED; its artifacts, summary view and MLflow runs are in the store."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    api = server["api"]
    created = _post_retrying_503(
        f"{api}/deployments/{deployed['tiny']['id']}/create_flow_run",
        # `overrides` apply on top of `config`, as `alignheads run --set` does
        json={"parameters": {"config": _test_size_config(store), "overrides": ["sweep.n_prompts=4"]}},
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    deadline = time.monotonic() + 300
    while True:
        state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, f"run still {state['type']} after 300 s"
        time.sleep(1)
    worker_log = _tail(server["root"] / "worker.log", 6000)
    assert state["type"] == "COMPLETED", f"{state}\n{worker_log}"

    stages = ("world", "data", "tokenize", "refpass", "train", "generate", "evaluate", "report")
    found = {s: sorted(p for p in (store / s).iterdir() if (p / MANIFEST).is_file()) for s in stages}
    assert {s: len(paths) for s, paths in found.items()} == {
        "world": 1,
        "data": 1,
        "tokenize": 1,
        "refpass": 1,
        "train": 2,
        "generate": 4,
        "evaluate": 1,
        "report": 1,
    }
    for stage in ("data", "tokenize", "refpass", "evaluate", "report"):
        verify_artifact(found[stage][0], stage)
    summary = run_query(store, "SELECT head, alpha, n FROM summary ORDER BY head, alpha").to_pylist()
    assert summary == [{"head": h, "alpha": a, "n": 4} for h in ("calm", "iav") for a in (0.0, 1.0)]

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("deploy-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["prefect.flow_run_id"] == run_id and parent.info.status == "FINISHED"
    assert parent.data.params["world.n_train_pairs"] == "64" and parent.data.params["refpass.k"] == "16"
    children = sorted(
        r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    )
    assert children == [
        "eval-calm-alpha-0",
        "eval-calm-alpha-1",
        "eval-iav-alpha-0",
        "eval-iav-alpha-1",
        "train-calm",
        "train-iav",
    ]


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={user_data}",
        "--window-size=1280,1600",
        "--virtual-time-budget=15000",  # lets the single-page app fetch and draw the form
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, timeout=120, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_ui_custom_run_form_in_headless_chromium(server, deployed, tmp_path):
    """The Prefect UI's custom-run page of a deployment draws the typed parameters as a form."""
    ui = server["ui"]
    page = f"{ui}/deployments/deployment/{deployed['tiny']['id']}/run"
    dom = _chromium("--dump-dom", page, user_data=tmp_path / "chrome").stdout.decode(errors="replace")
    for text in (
        "Parameters",
        "Run name; also the MLflow experiment name",  # RunConfig.name's description
        "N Train Pairs",  # a nested section's field (WorldConfig.n_train_pairs)
        "Top-k reference log-probs kept per response token",
        "Values of the dial α to generate at",
    ):
        assert text in dom, text

    shot = tmp_path / "form.png"
    _chromium(f"--screenshot={shot}", page, user_data=tmp_path / "chrome")
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1280, 1600)


def test_a_failed_deployment_run_says_why_in_its_state_and_under_watch(server, deployed, tmp_path):
    """`prefect deployment run … --watch` on a stage given a key that names nothing: the run ends
    Failed with the one-line reason as its state message (the UI shows it), and `--watch` prints
    that reason before the final state (issue 21, item 9)."""
    done = subprocess.run(
        [PREFECT, "deployment", "run", "alignheads-train/train", "-p", 'refpass_key="deadbeef"',
         "-p", f"store={tmp_path / 'store'}", "--watch", "--watch-timeout", "240"],
        cwd=REPO, env=server["env"], capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Flow run finished in state 'Failed'" in out, out[-3000:]
    reason = "MissingArtifactError: refpass_key='deadbeef': no complete refpass artifact in the store"
    # the run's own event, just before the final state: `alignheads.flow-run.failed * <run>: <reason>`
    events = " ".join(out.split())  # rich wraps long lines
    assert "alignheads.flow-run.failed" in events and f": {reason}" in events, out[-3000:]
    assert events.index("alignheads.flow-run.failed") < events.index("prefect.flow-run.Failed")
    found = httpx.post(
        f"{server['api']}/flow_runs/filter",
        json={"deployments": {"id": {"any_": [deployed["train"]["id"]]}}, "sort": "START_TIME_DESC"},
        timeout=30,
    ).json()
    assert found and found[0]["state"]["type"] == "FAILED"
    assert found[0]["state"]["message"].startswith(reason), found[0]["state"]
