"""The pipeline flow end to end on the test-size tiny world: world -> data -> tokenize -> refpass
-> train -> generate -> evaluate -> report.

One Prefect test harness for the session (starting one costs ~20 s); one first run shared by
the module; later runs show what is cached and what is recomputed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignheads.cli import main
from alignheads.config import RunConfig, load_config
from alignheads.flows.pipeline import pipeline
from alignheads.storage.manifest import verify_artifact
from alignheads.storage.query import run_query
from alignheads.storage.sharded_artifact import shard_path
from alignheads.storage.tables import read_table
from alignheads.tasks.ingest import BadRowError
from alignheads.tasks.report import report_files
from alignheads.world.build import tiny_test_config
from tests.helpers.small_runs import subflow_names

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A run config YAML for the test-size world, as a user would write one."""
    root = tmp_path_factory.mktemp("pipeline")
    raw = {
        "name": "tiny-test",
        "store": str(root / "store"),
        "world": tiny_test_config().model_dump(mode="json"),
        "tokenize": {"max_prompt_length": 64, "max_response_length": 48},
        "refpass": {"k": 32, "pairs_per_shard": 128},  # 3 shards
        "runner": {"max_workers": 2},  # 2 shards (or generations) at a time
        "train": {
            "iav": {"lr": 1e-2, "batch_size": 16, "epochs": 2, "eval_every": 8, "checkpoint_every": 8},
            "calm": {"lr": 1e-2, "batch_size": 16, "epochs": 2, "rank": 8, "eval_every": 8},
        },
        "sweep": {"alphas": [0, 1], "n_prompts": 8, "max_new_tokens": 16, "batch_size": 8},
        "evaluate": {"target_kls": []},  # no α calibration here (tested on its own)
    }
    path = root / "tiny-test.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def first_run(prefect_harness, config_file):
    cfg = load_config(config_file)
    return cfg, pipeline(config=cfg)


STAGES = (
    "world",
    "data",
    "tokenize",
    "refpass",
    "train iav",
    "train calm",
    "generate iav α=0",
    "generate iav α=1",
    "generate calm α=0",
    "generate calm α=1",
    "accuracy iav",
    "accuracy calm",
    "evaluate",
    "report",
)
SWEEP = ("generate calm α=0", "generate calm α=1", "accuracy calm", "evaluate", "report")
NO_TRAINING = {"iav": {"enabled": False}, "calm": {"enabled": False}}


def _statuses(outcome) -> dict[str, str]:
    return {name: result.status for name, result in outcome.stages()}


def _all(status: str, changes: dict[str, str] | None = None) -> dict[str, str]:
    return {stage: (changes or {}).get(stage, status) for stage in STAGES}


def _generations(outcome) -> dict[str, object]:
    return {name: result for name, result in outcome.stages() if name.startswith("generate ")}


def test_first_run_builds_every_stage(first_run):
    cfg, outcomes = first_run
    assert _statuses(outcomes) == _all("computed")
    world = tiny_test_config()
    n_pairs = world.n_train_pairs + world.n_test_pairs
    assert outcomes.data.tables == {"pairs": n_pairs, "rejects": 0}
    assert outcomes.tokenize.tables == {"tokenized": n_pairs}
    assert outcomes.refpass.tables == {"refcache": 2 * n_pairs}
    assert outcomes.refpass.info["shards"] == 3
    for _, out in outcomes.stages():
        path = Path(out.path)
        assert path == cfg.store / out.stage / out.key
        verify_artifact(path, out.stage)  # every shard and file matches its checksum
    # the world's build report travels in the manifest (its properties are tested in tests/world)
    assert outcomes.world.info["pair_accuracy"] == 1.0
    # each method is loaded once for its generations and its held-out accuracy
    assert outcomes.model_loads == {"iav": 1, "calm": 1}


def _search_runs(uri: str, experiment: str, filter_string: str) -> list:
    """MLflow runs of one experiment matching a filter, through a client bound to `uri`
    (`mlflow.set_tracking_uri` would set MLFLOW_TRACKING_URI for every later test)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], filter_string)


def test_heads_are_trained_and_tracked_in_mlflow(first_run):
    """Both heads learn the world's preference; MLflow holds a parent run with the flattened
    config and one child run per head with TRL-named metrics and the head as an artifact."""
    from mlflow.tracking import MlflowClient

    from alignheads.models import read_head_file

    cfg, outcomes = first_run
    for kind in ("iav", "calm"):
        info = outcomes.train[kind].info
        assert info["steps"] == 2 * (tiny_test_config().n_train_pairs // 16)
        assert info["eval"]["eval/rewards/accuracies"] >= 0.8, (kind, info["eval"])
        head = read_head_file(Path(outcomes.train[kind].path) / "head")
        assert head.head_type == kind
    uri = f"sqlite:///{cfg.store / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent_id = outcomes.mlflow_run
    parent = client.get_run(parent_id)
    assert parent.data.params["train.iav.lr"] == "0.01" and parent.data.params["name"] == "tiny-test"
    assert parent.data.metrics["iav/eval_accuracy"] >= 0.8
    loads = {k: v for k, v in parent.data.metrics.items() if k.endswith("model_loads")}
    assert loads == {"model_loads": 2.0, "iav/model_loads": 1.0, "calm/model_loads": 1.0}
    children = _search_runs(
        uri, "tiny-test", f"tags.mlflow.parentRunId = '{parent_id}' AND attributes.run_name LIKE 'train-%'"
    )
    assert sorted(r.info.run_name for r in children) == ["train-calm", "train-iav"]
    for run in children:
        kind = run.data.params["head"]
        names = set(run.data.metrics)
        assert {
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
        } <= names
        assert {"logps/chosen", "logps/rejected", "l2", "eval/rewards/accuracies"} <= names
        assert ("kl" in names) == (kind == "iav") and ("strength/mean" in names) == (kind == "calm")
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) == 2 * (tiny_test_config().n_train_pairs // 16)
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "head")]
        assert sorted(artifacts) == ["head/head_config.json", "head/head_model.safetensors"]


def test_sweep_is_evaluated_and_reported(first_run):
    """Generations per (head, α) with common random numbers, scored and summarised; the
    summary view, the plots and the MLflow child runs per (head, α) exist."""

    cfg, outcomes = first_run
    summary = run_query(
        cfg.store, "SELECT head, alpha, n, win_rate, kl FROM summary ORDER BY head, alpha"
    ).to_pylist()
    assert [(r["head"], r["alpha"], r["n"]) for r in summary] == [
        ("calm", 0.0, 8),
        ("calm", 1.0, 8),
        ("iav", 0.0, 8),
        ("iav", 1.0, 8),
    ]
    assert summary[0]["win_rate"] is None and 0.0 <= summary[1]["win_rate"] <= 1.0
    assert summary[0]["kl"] == 0.0 and summary[1]["kl"] > 0.0  # CALM at α = 0 is the base model
    seeds = run_query(
        cfg.store, "SELECT count(DISTINCT seed) AS n FROM generations GROUP BY prompt_id, sample_index"
    ).column("n")
    assert set(seeds.to_pylist()) == {1}  # the same seed at every α and for both heads
    plots = {n: p for n, p in report_files(outcomes.report).items() if p.suffix == ".png"}
    assert set(plots) == {"reward_vs_alpha", "reward_vs_kl", "win_rate_vs_alpha"}
    for path in plots.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verify_artifact(outcomes.report.directory, "report")  # the report is an artifact like the others
    assert outcomes.report.info["summary"] == read_table(outcomes.evaluate.directory, "summary").to_pylist()
    parent = outcomes.mlflow_run
    evals = _search_runs(
        f"sqlite:///{cfg.store / 'mlflow.db'}",
        "tiny-test",
        f"tags.mlflow.parentRunId = '{parent}' AND params.head = 'iav'",
    )
    assert sorted(r.info.run_name for r in evals) == ["eval-iav-alpha-0", "eval-iav-alpha-1", "train-iav"]
    # per-α metrics of the child runs are the summary's numbers
    by_alpha = {r["alpha"]: r for r in summary if r["head"] == "iav"}
    for run in evals:
        if run.info.run_name.startswith("eval-"):
            row = by_alpha[float(run.data.params["alpha"])]
            assert run.data.metrics["n"] == row["n"] and run.data.metrics["kl"] == pytest.approx(row["kl"])
            assert {"reward", "distinct_1", "length"} <= set(run.data.metrics)
    # the parent run: the validated pairs as its input dataset, the evaluate tables as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.store / 'mlflow.db'}")
    inputs = client.get_run(parent).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [
        ("tiny-test-pairs", outcomes.data.key[:36])
    ]
    assert json.loads(inputs[0].dataset.profile)["num_rows"] == sum(outcomes.data.tables.values())
    logged = {a.path for a in client.list_artifacts(parent, "evaluate")}
    assert "evaluate/manifest.json" in logged
    assert {a.path for a in client.list_artifacts(parent, "plots")} >= {
        f"plots/{Path(p).name}" for p in plots.values()
    }


def test_adding_an_alpha_generates_only_that_alpha(first_run):
    cfg, _ = first_run
    more = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"alphas": [0, 1, 0.5]})})
    state = pipeline(config=more, return_state=True)
    out = state.result()
    assert subflow_names(state) == ["method-sweeps"]  # work to do: the sweeps' sub-flow on the runner
    new = {"generate iav α=0.5": "computed", "generate calm α=0.5": "computed"}
    new |= {"accuracy iav": "computed", "accuracy calm": "computed"}  # now at α = 0.5 too
    # one sweep task per method (all its α in one batched pass): it ran, found α = 0 and 1 built
    reused = {f"generate {m} α={a}": "reused" for m in ("iav", "calm") for a in (0, 1)}
    assert _statuses(out) == _all("cached", {"evaluate": "computed", "report": "computed"}) | reused | new
    assert out.model_loads == {"iav": 1, "calm": 1}  # one load per method for the new α and accuracy


def test_changing_a_training_setting_reruns_only_that_head(first_run):
    cfg, outcomes = first_run
    calm = cfg.train.calm.model_copy(update={"lr": 1e-3})
    out = pipeline(config=cfg.model_copy(update={"train": cfg.train.model_copy(update={"calm": calm})}))
    assert _statuses(out) == _all("cached", {"train calm": "computed", **dict.fromkeys(SWEEP, "computed")})
    assert out.train["calm"].key != outcomes.train["calm"].key


def test_tables_are_queryable(first_run):
    cfg, _ = first_run
    counts = run_query(cfg.store, "SELECT split, count(*) AS n FROM pairs GROUP BY split ORDER BY split")
    world = tiny_test_config()
    assert counts.to_pylist() == [
        {"split": "test", "n": world.n_test_pairs},
        {"split": "train", "n": world.n_train_pairs},
    ]
    joined = run_query(
        cfg.store,
        "SELECT count(*) AS n, min(t.chosen_len) AS min_len, max(t.prompt_len) AS max_prompt "
        "FROM tokenized t JOIN pairs p USING (id)",
    ).to_pylist()[0]
    assert joined["n"] == world.n_train_pairs + world.n_test_pairs
    assert joined["min_len"] >= 2 and joined["max_prompt"] <= 64


def test_second_run_recomputes_nothing(first_run, capsys):
    cfg, outcomes = first_run
    state = pipeline(config=cfg, return_state=True)
    again = state.result()
    assert _statuses(again) == _all("cached")
    # nothing to compute: the sweeps' tasks answer from the pipeline's own flow run, no sub-flow
    assert subflow_names(state) == []
    assert {s: o.key for s, o in again.stages()} == {s: o.key for s, o in outcomes.stages()}
    assert again.model_loads == {"iav": 0, "calm": 0}
    from alignheads.tasks.reporting.printing import print_run_summary

    print_run_summary(cfg, again)
    printed = capsys.readouterr().out
    assert "Nothing recomputed" in printed
    # the id printed is the run this (cached) flow run logged to, not the run of the results
    assert again.mlflow_run != outcomes.mlflow_run
    flat = "".join(printed.split())  # rich wraps and pads the titles
    assert f"MLflowrunid:{again.mlflow_run}" in flat
    assert f"computedinMLflowrun{outcomes.mlflow_run}" in flat


def test_a_cached_rerun_from_the_command_line_loads_no_model_library(first_run, config_file, tmp_path):
    """`alignheads run` on a store where every stage is complete plans, reads its results back and
    logs its MLflow run, without importing torch or transformers (their import alone is 3-4 s of
    the re-run's start-up; issue 20). `runner.torch_threads` is in no key (nothing is recomputed)
    and is pinned without importing torch: through the environment torch would read."""
    import os

    from prefect.settings import PREFECT_API_URL

    probe = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print('threads:', os.environ.get('OMP_NUM_THREADS'), 'loaded:',"
        " sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)))\n"
        "from alignheads.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(config_file)!r}, '--set', 'runner.torch_threads=3']))\n"
    )
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Nothing recomputed" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "threads: 3 loaded: []"


def test_refcache_sums_match_the_model(first_run):
    """The reference pass on the tiny world: the view answers, summed log-probs match the model."""
    import torch

    from alignheads.models.losses import sequence_logprobs
    from alignheads.models.reference import load_reference, pack_batch

    cfg, outcomes = first_run
    key = outcomes.refpass.key
    rows = run_query(
        cfg.store,
        "SELECT r.side, r.seq_logprob, t.prompt_ids, t.chosen_ids, t.rejected_ids FROM refcache r "
        f"JOIN tokenized t USING (id) WHERE r.artifact = '{key}' "
        f"AND t.artifact = '{outcomes.tokenize.key}' ORDER BY r.pair_index, r.side LIMIT 6",
    ).to_pylist()
    prompts = [r["prompt_ids"] for r in rows]
    responses = [r[f"{r['side']}_ids"] for r in rows]
    batch = pack_batch(prompts, responses, pad_id=0)
    mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        mask[b, len(p) : len(p) + len(r)] = True
    model = load_reference(str(Path(outcomes.world.path) / "model"), device="cpu").model
    with torch.inference_mode():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = sequence_logprobs(logits, batch.input_ids, mask).tolist()
    assert [r["seq_logprob"] for r in rows] == pytest.approx(want, abs=1e-4)
    # the tiny world's model prefers chosen over rejected on most training pairs
    acc = run_query(
        cfg.store,
        "SELECT avg((m > 0)::INT) AS acc FROM (SELECT pair_index, "
        "sum(CASE side WHEN 'chosen' THEN seq_logprob ELSE -seq_logprob END) AS m "
        f"FROM refcache WHERE artifact = '{key}' GROUP BY pair_index)",
    ).to_pylist()[0]["acc"]
    assert acc > 0.5


def test_sweeps_in_two_worker_processes_sample_what_threads_sample(first_run):
    """`runner.kind: processes`: the methods' sweeps run in two spawned worker processes, which
    report their task runs to the run's own Prefect API, and sample bit for bit what the thread
    runner sampled; the reference pass's shards stay on threads (one loaded model)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from alignheads.flows.mapped import shard_runner, task_runner

    cfg, outcomes = first_run
    gens = {name: Path(result.path) for name, result in _generations(outcomes).items()}
    threads_gens = {name: read_table(p, "generations") for name, p in gens.items()}
    for p in gens.values():
        shutil.rmtree(p)
    runner = cfg.runner.model_copy(update={"kind": "processes", "max_workers": 2})
    assert isinstance(task_runner(runner), ProcessPoolTaskRunner)
    assert isinstance(shard_runner(runner), ThreadPoolTaskRunner)
    state = pipeline(config=cfg.model_copy(update={"runner": runner}), return_state=True)
    after = _generations(state.result())
    assert {name: after[name].status for name in gens} == dict.fromkeys(gens, "computed")
    for name, p in gens.items():
        assert read_table(p, "generations").equals(threads_gens[name]), name  # every column, every bit
    # the workers' task runs are in the run's API, under its method-sweeps sub-flow
    parent = FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        (sweeps,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sweeps.id])))
    assert sorted((t.name, t.state.type.value) for t in tasks) == [("sweep-calm", "COMPLETED"), ("sweep-iav", "COMPLETED")]


def test_refpass_and_sweep_identical_on_a_two_worker_dask_cluster_and_resumes_one_shard(first_run):
    """`runner.kind: dask` (a local cluster of 2 workers) maps the reference-pass shards and the
    sweep's generations and produces the same tables as the thread runner did."""
    cfg, outcomes = first_run
    path = Path(outcomes.refpass.path)
    threads_table = read_table(path, "refcache")
    gens = {name: Path(result.path) for name, result in _generations(outcomes).items()}
    threads_gens = {name: read_table(p, "generations") for name, p in gens.items()}
    shutil.rmtree(path)
    for p in gens.values():
        shutil.rmtree(p)
    runner = cfg.runner.model_copy(update={"kind": "dask", "max_workers": 2})
    out = pipeline(config=cfg.model_copy(update={"runner": runner}))
    assert out.refpass.status == "computed" and out.refpass.key == outcomes.refpass.key
    assert read_table(path, "refcache").equals(threads_table)
    stats = ["kl_mean", "kl_sum", "strength_mean", "strength_max", "utilisation", "align_norm_mean"]
    before_gens, after_gens = _generations(outcomes), _generations(out)
    for name, p in gens.items():
        assert after_gens[name].status == "computed" and after_gens[name].key == before_gens[name].key
        again, before = read_table(p, "generations"), threads_gens[name]
        assert again.drop_columns(stats).equals(before.drop_columns(stats))  # same tokens, same text
        for col in stats:  # float statistics: equal up to rounding
            want = [x for x in before.column(col).to_pylist() if x is not None]
            got = [x for x in again.column(col).to_pylist() if x is not None]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (name, col)
    # a damaged shard of the complete cache: only that shard is recomputed
    shards = [path / shard_path("refcache", i) for i in range(3)]
    stamps = [p.stat().st_mtime_ns for p in shards]
    with open(shards[1], "r+b") as fh:
        fh.truncate(shards[1].stat().st_size // 2)
    again = pipeline(config=cfg)
    assert again.refpass.status == "computed"
    assert [p.stat().st_mtime_ns == s for p, s in zip(shards, stamps, strict=True)] == [True, False, True]
    verify_artifact(path, "refpass")
    assert read_table(path, "refcache").equals(threads_table)


def test_changing_token_limits_reruns_tokenize_and_refpass(first_run):
    cfg, outcomes = first_run
    shorter = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"max_prompt_length": 8})})
    out = pipeline(config=shorter)
    assert _statuses(out) == _all("computed", {"world": "cached", "data": "cached"})
    assert out.refpass.key != outcomes.refpass.key
    assert out.tokenize.key != outcomes.tokenize.key
    assert out.tokenize.info["truncated"]["prompt"] > 0
    rows = run_query(
        cfg.store,
        f"SELECT max(prompt_len) AS m, bool_or(prompt_truncated) AS cut FROM tokenized "
        f"WHERE artifact = '{out.tokenize.key}'",
    ).to_pylist()
    assert rows == [{"m": 8, "cut": True}]


def test_artifact_removed_from_store_is_rebuilt(first_run):
    cfg, outcomes = first_run
    shutil.rmtree(outcomes.tokenize.path)
    out = pipeline(config=cfg)
    # same tokenize key, so the reference cache (still complete on disk) stays valid
    assert _statuses(out) == _all("cached", {"tokenize": "computed"})
    verify_artifact(Path(out.tokenize.path), "tokenize")


def _bad_data(tmp_path: Path) -> Path:
    rows = [
        {"prompt": "\n\nHuman: What is 2 + 2?\n\nAssistant:", "chosen": " 4.", "rejected": " 5, idiot."},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "", "rejected": " Go away."},
        {"prompt": "\n\nHuman: Colour of the sky?\n\nAssistant:", "chosen": " Blue.", "rejected": " Blue."},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_stop_the_run_naming_file_row_and_field(first_run, tmp_path):
    cfg, _ = first_run
    data = _bad_data(tmp_path)
    bad = RunConfig.model_validate(
        {
            **cfg.model_dump(),
            "data": {"train": {"path": str(data)}, "on_bad_rows": "error"},
            "train": NO_TRAINING,
        }
    )
    with pytest.raises(BadRowError, match=r"mine\.jsonl: row 1 \(line 2\), field 'chosen': empty string"):
        pipeline(config=bad)


def test_bad_rows_skipped_are_counted_and_queryable(first_run, tmp_path, capsys):
    cfg, _ = first_run
    data = _bad_data(tmp_path)
    skip = RunConfig.model_validate(
        {
            **cfg.model_dump(),
            "data": {"train": {"path": str(data)}, "on_bad_rows": "skip"},
            "train": NO_TRAINING,
        }
    )
    out = pipeline(config=skip)
    assert out.data.info["rejects"] == {"train": 2, "test": 0}
    assert out.data.info["pairs"]["train"] == 1
    from alignheads.tasks.reporting.printing import print_run_summary

    print_run_summary(skip, out)
    assert "2 bad rows skipped" in capsys.readouterr().out
    rejects = run_query(
        cfg.store,
        f"SELECT row, field, reason FROM rejects WHERE artifact = '{out.data.key}' ORDER BY row",
    ).to_pylist()
    assert rejects == [
        {"row": 1, "field": "chosen", "reason": "empty string"},
        {"row": 2, "field": "rejected", "reason": "identical to 'chosen'"},
    ]


def test_cli_run_and_query(first_run, config_file, capsys):
    cfg, _ = first_run
    assert main(["run", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "Nothing recomputed" in out and str(cfg.store) in out.replace("\n", "")
    assert (
        main(
            ["query", "SELECT count(*) AS n FROM tokenized", "--config", str(config_file), "--format", "json"]
        )
        == 0
    )
    n = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"]
    assert n >= tiny_test_config().n_train_pairs + tiny_test_config().n_test_pairs


def test_console_script_query_and_errors(first_run, config_file):
    """The installed `alignheads` entry point, as a user runs it (no Prefect needed for queries)."""
    exe = Path(sys.executable).parent / "alignheads"
    ok = subprocess.run(
        [
            str(exe),
            "query",
            "SELECT count(*) AS n FROM pairs",
            "--config",
            str(config_file),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "n"
    refused = subprocess.run(
        [str(exe), "query", "COPY pairs TO 'x.csv'", "--config", str(config_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1 and "only read-only SELECT queries" in refused.stderr
    bad_key = subprocess.run(
        [str(exe), "run", "--config", str(config_file), "--set", "tokenize.max_prompt_lenght=3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad_key.returncode == 2 and "tokenize.max_prompt_lenght: unknown key" in bad_key.stderr


def test_world_verb_reuses_the_pipeline_world(first_run, config_file, capsys):
    assert main(["world", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "already in the store, reused" in out
    assert first_run[1].world.key in out


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_heads_generate_on_the_world_model(first_run, kind):
    """Both heads inside transformers' own generate() on the world's model: sampling, beams,
    left-padded batches; at initialisation every α gives the base model's tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignheads.models import AlignedLM, new_head

    model_dir = Path(first_run[1].world.path) / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["\n\nHuman: What is 2 + 3?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and batch["attention_mask"][1, 0] == 0
    with torch.no_grad():
        base = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    aligned = AlignedLM(model, new_head(kind, model))
    common = {"max_new_tokens": 12, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        for alpha in (0.0, 1.0, -2.0):
            assert torch.equal(aligned.generate(**batch, alpha=alpha, do_sample=False, **common), base)
        torch.manual_seed(0)
        sampled = aligned.generate(**batch, alpha=1.5, do_sample=True, top_p=0.9, **common)
        beams = aligned.generate(**batch, alpha=1.5, num_beams=3, **common)
    assert sampled.shape[0] == 2 and beams.shape[0] == 2
    assert all(len(t) > 0 for t in tok.batch_decode(sampled[:, batch["input_ids"].shape[1] :]))


def test_worker_processes_report_to_the_runs_own_temporary_server(tmp_path):
    """`alignheads run` with no Prefect server and `runner.kind: processes`: the run's one temporary
    server serves the worker processes too (`mapped.workers_report_here`); a worker left to itself
    would start a server of its own."""
    from tests.helpers.small_runs import cli_command, cli_env, small_run, write_config

    raw = small_run(tmp_path / "store", name="workers")
    raw["runner"] = {"kind": "processes", "max_workers": 2}
    env = cli_env("", tmp_path / "prefect")
    env.pop("PREFECT_API_URL")  # no server: the run starts its own
    done = subprocess.run(
        cli_command(write_config(tmp_path / "run.yaml", raw)), env=env, capture_output=True, text=True, timeout=600
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("Starting temporary server") == 1, log[-3000:]
    assert "Task run 'sweep-iav' - Finished in state Completed()" in log
    assert "Task run 'sweep-calm' - Finished in state Completed()" in log
