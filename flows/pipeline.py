"""The pipeline flow: world (when configured) -> data -> tokenize -> refpass, as cached Prefect tasks.

Each task is keyed on its stage's artifact key (hash of config slice + input keys + format
version). Prefect's persisted cache answers "already done" across processes; if the artifact
was removed from the store meanwhile, the cache is refreshed and the task rebuilds it.

The reference pass is mapped over its shards: a sub-flow submits one `refpass-shard` task per
shard (cached on the artifact key and the shard index) to the configured task runner (threads,
or Dask via prefect-dask), then the `refpass` task finalizes the artifact. Shards already done
on disk are not recomputed, whichever process computed them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from alignheads.config import RunConfig, RunnerConfig, TrainConfig, WorldConfig, read_config, with_overrides
from alignheads.loading import load_tokenizer, model_location
from alignheads.storage.artifacts import ArtifactResult, artifact_dir
from alignheads.storage.fingerprint import tokenizer_fingerprint
from alignheads.storage.manifest import MANIFEST
from alignheads.storage.store_errors import writing
from alignheads.storage.tables import read_table
from alignheads.storage.tracking import Tracker, flatten, open_tracker
from alignheads.tasks import data as data_stage
from alignheads.tasks import evaluate as evaluate_stage
from alignheads.tasks import generate as generate_stage
from alignheads.tasks import generate_baseline as generate_baseline_stage
from alignheads.tasks import refpass as refpass_stage
from alignheads.tasks import tokenize as tokenize_stage
from alignheads.tasks import train as train_stage
from alignheads.tasks import train_baseline as baseline_stage
from alignheads.tasks import world as world_stage
from alignheads.tasks.reporting.matched_kl import matched_kl_rows, save_matched_kl
from alignheads.tasks.reporting.plots import save_summary_plots
from alignheads.tasks.reporting.printing import summary_markdown

RESULTS_DIR = ".prefect-results"


def stage_cache_key(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    """Prefect cache key of a stage's task: the stage's artifact key."""

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        return f"{stage}-{parameters['key']}"

    return key_fn


def _outcome(result: ArtifactResult) -> dict[str, Any]:
    """JSON-serialisable task result (Prefect persists it; nothing is pickled)."""
    return {
        "stage": result.stage,
        "key": result.key,
        "path": str(result.path),
        "computed": result.computed,
        "tables": {name: sum(s.rows for s in shards) for name, shards in result.manifest.tables.items()},
        "info": result.manifest.info,
    }


def _task_options(stage: str) -> dict[str, Any]:
    return {
        "name": stage,
        "cache_key_fn": stage_cache_key(stage),
        "persist_result": True,
        "result_serializer": "json",
    }


@task(**_task_options("world"))
def world_task(store: str, key: str, world: WorldConfig) -> dict[str, Any]:
    return _outcome(world_stage.run_world(Path(store), world))


@task(**_task_options("data"))
def data_task(store: str, key: str, plan: dict[str, Any], tokenizer_source: dict[str, Any]) -> dict[str, Any]:
    tokenizer = load_tokenizer(**tokenizer_source)
    return _outcome(data_stage.run_data(Path(store), data_stage.DataPlan(**plan), tokenizer))


@task(**_task_options("tokenize"))
def tokenize_task(
    store: str, key: str, plan: dict[str, Any], tokenizer_source: dict[str, Any]
) -> dict[str, Any]:
    tokenizer = load_tokenizer(**tokenizer_source)
    return _outcome(tokenize_stage.run_tokenize(Path(store), tokenize_stage.TokenizePlan(**plan), tokenizer))


def shard_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a refpass shard task: the artifact key and the shard index."""
    return f"refpass-{parameters['key']}-shard-{parameters['index']:05d}"


@task(name="refpass-shard", cache_key_fn=shard_cache_key, persist_result=True, result_serializer="json")
def refpass_shard_task(store: str, key: str, plan: dict[str, Any], index: int) -> dict[str, Any]:
    outcome = refpass_stage.run_refpass_shard(Path(store), refpass_stage.RefPassPlan(**plan), index)
    return {"index": index, "computed": outcome.computed, "info": outcome.record.info}


@task(**_task_options("refpass"))
def refpass_task(store: str, key: str, plan: dict[str, Any]) -> dict[str, Any]:
    # Every shard is normally done by now; any that is not (or fails its checksum) is computed here.
    return _outcome(refpass_stage.run_refpass(Path(store), refpass_stage.RefPassPlan(**plan)))


@flow(name="refpass-shards")
def refpass_shards(store: str, key: str, plan: dict[str, Any], refresh: list[bool]) -> list[dict[str, Any]]:
    """Submit one shard task per shard to this flow's task runner; `refresh[i]` makes shard i
    ignore a Prefect cache record (its files are missing or damaged on disk)."""
    results = Path(store) / RESULTS_DIR
    futures = [
        refpass_shard_task.with_options(result_storage=results, refresh_cache=fresh).submit(
            store=store, key=key, plan=plan, index=index
        )
        for index, fresh in enumerate(refresh)
    ]
    return [f.result() for f in futures]


def task_runner(cfg: RunnerConfig):
    """The task runner mapped work is submitted to: threads, or Dask (an existing cluster at
    `dask_address`, else a local one in this process with `max_workers` workers of one thread
    each; its scheduler talks in-process, and its HTTP servers bind to 127.0.0.1 on free ports)."""
    if cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": cfg.max_workers,
                "threads_per_worker": 1,
                "processes": False,
                # dashboard_address=None does not disable it here (it binds 0.0.0.0:8787)
                "dashboard_address": "127.0.0.1:0",
                "worker_dashboard_address": "127.0.0.1:0",
            }
        )
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


def _run_refpass(cfg: RunConfig, store: Path, plan: refpass_stage.RefPassPlan) -> dict[str, Any]:
    """Map the shards not yet done over the configured runner, then finalize (cached stage)."""
    artifact = refpass_stage.refpass_artifact(store, plan)
    present = artifact.looks_complete()
    if not present:
        artifact.prepare()  # reopens a complete artifact with a damaged shard
        refresh = [not artifact.looks_done(i) for i in range(plan.n_shards)]
        refpass_shards.with_options(task_runner=task_runner(cfg.runner))(
            store=str(store), key=plan.key, plan=plan.__dict__, refresh=refresh
        )
    return _run_stage(refpass_task, store, present=present, key=plan.key, plan=plan.__dict__)


def _run_stage(stage_task, store: Path, present: bool | None = None, **params: Any) -> dict[str, Any]:
    """Run one cached stage; mark whether Prefect's cache, the store, or a fresh build answered."""
    # A cache record whose artifact was removed from the store must not answer: refresh it.
    if present is None:
        present = (artifact_dir(store, stage_task.name, params["key"]) / MANIFEST).is_file()
    options = stage_task.with_options(result_storage=store / RESULTS_DIR, refresh_cache=not present)
    return _with_status(options(store=str(store), return_state=True, **params))


def _with_status(state: Any) -> dict[str, Any]:
    """A finished stage task's outcome, marked cached (Prefect's cache answered), reused (the
    artifact was complete in the store) or computed."""
    outcome = dict(state.result())
    if state.name == "Cached":
        outcome["status"] = "cached"
    else:
        outcome["status"] = "computed" if outcome["computed"] else "reused"
    return outcome


@task(**_task_options("train"))
def train_task(store: str, key: str, plan: dict[str, Any], tracking: dict[str, str] | None) -> dict[str, Any]:
    log = _metric_logger(tracking)
    return _outcome(train_stage.run_train(Path(store), train_stage.TrainPlan(**plan), log=log))


def _metric_logger(tracking: dict[str, str] | None) -> Callable[[dict[str, float], int], None] | None:
    """A training loop's `log(metrics, step)` into the MLflow run `tracking` names, or None."""
    if tracking is None:
        return None
    tracker, run_id = Tracker(tracking["uri"], tracking["experiment_id"]), tracking["run_id"]

    def log(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(run_id, metrics, step)

    return log


@task(**_task_options("generate"))
def generate_task(store: str, key: str, plan: dict[str, Any], train_plan: dict[str, Any]) -> dict[str, Any]:
    gplan = generate_stage.GeneratePlan(**plan)
    outcome = _outcome(generate_stage.run_generate(Path(store), gplan))
    # held-out preference accuracy of the implicit reward at this α (cached with the task)
    tplan = train_stage.TrainPlan(**train_plan)
    acc = train_stage.preference_accuracy_by_alpha(tplan, gplan.head_path, [gplan.alpha])
    outcome["preference_accuracy"] = acc[repr(float(gplan.alpha))]
    return outcome


@task(**_task_options("baseline"))
def baseline_task(
    store: str, key: str, plan: dict[str, Any], tracking: dict[str, str] | None
) -> dict[str, Any]:
    log = _metric_logger(tracking)
    return _outcome(baseline_stage.run_baseline(Path(store), baseline_stage.BaselinePlan(**plan), log=log))


# the same stage (and artifact directory) as the heads' generations; another builder
@task(**_task_options("generate"))
def generate_baseline_task(
    store: str, key: str, plan: dict[str, Any], baseline_plan: dict[str, Any]
) -> dict[str, Any]:
    gplan = generate_stage.GeneratePlan(**plan)
    outcome = _outcome(generate_baseline_stage.run_baseline_generate(Path(store), gplan))
    bplan = baseline_stage.BaselinePlan(**baseline_plan)
    model_dir = Path(gplan.train_path) / baseline_stage.MODEL_SUBDIR
    acc = baseline_stage.preference_accuracy_by_alpha(bplan, model_dir, [gplan.alpha])
    outcome["preference_accuracy"] = acc[repr(float(gplan.alpha))]
    return outcome


# which task builds a generation artifact: a head's, or a baseline's (same stage and store layout)
GENERATION_TASKS = {"head": generate_task, "baseline": generate_baseline_task}


@flow(name="sweep-generations")
def sweep_generations(store: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Submit one generation task per (method, α) to this flow's task runner (threads or Dask) and
    return their outcomes in order. A job is ``{"builder": "head" | "baseline", "refresh": bool,
    "params": the task's parameters}``; `refresh` makes it ignore a Prefect cache record."""
    results = Path(store) / RESULTS_DIR
    futures = [
        GENERATION_TASKS[job["builder"]]
        .with_options(result_storage=results, refresh_cache=job["refresh"])
        .submit(store=store, **job["params"])
        for job in jobs
    ]
    for future in futures:
        future.wait()
    return [_with_status(future.state) for future in futures]


@task(**_task_options("evaluate"))
def evaluate_task(store: str, key: str, plan: dict[str, Any]) -> dict[str, Any]:
    eplan = evaluate_stage.EvaluatePlan(**{**plan, "generation_paths": tuple(plan["generation_paths"])})
    return _outcome(evaluate_stage.run_evaluate(Path(store), eplan))


@flow(name="alignheads-pipeline", log_prints=True)
def pipeline(
    config: RunConfig = read_config(),  # noqa: B008 (the embedded default, configs/tiny.yaml: the UI's form)
    overrides: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the alignheads pipeline on one run config; returns each stage's artifact and status.

    Args:
        config: The run config (defaults: configs/tiny.yaml, the embedded default).
        overrides: `key.path=value` settings applied on top of `config`, as `alignheads run --set`
            does (values are YAML), e.g. ["store=/data/run1", "sweep.alphas=[0, 1, 2]"].
    """
    cfg = (with_overrides(config, overrides) if overrides else config).resolved()
    with writing(cfg.store, cfg.store.parent):  # a read-only or full disk: one clear line
        cfg.store.mkdir(parents=True, exist_ok=True)
    with tracked(cfg, flatten(cfg), "pipeline") as (tracker, parent_run):
        outcomes = _pipeline(cfg, tracker, parent_run)
        if tracker is None:
            return outcomes
        tracker.log_metrics(parent_run, _summary_metrics(outcomes), 0)
    for outcome in outcomes.values():
        outcome["mlflow_run"] = parent_run
    return outcomes


@contextlib.contextmanager
def tracked(
    cfg: RunConfig, params: dict[str, str], default_name: str
) -> Iterator[tuple[Tracker | None, str | None]]:
    """This flow run as an MLflow parent run (experiment = the config's name; params: flattened),
    ended FAILED if the body raises; ``(None, None)`` when tracking is off."""
    if not cfg.tracking.enabled:
        yield None, None
        return
    tracker = open_tracker(cfg.store, cfg.name, cfg.tracking.uri)
    tags = {"prefect.flow_run_id": str(flow_run.id), "alignheads.store": str(cfg.store)}
    parent = tracker.start_run(flow_run.name or default_name, params, tags=tags)
    try:
        yield tracker, parent
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent)


def logged(outcomes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Log each artifact's status and path; returns `outcomes`."""
    logger = get_run_logger()
    for name, outcome in outcomes.items():
        logger.info("%s: %s %s", name, outcome["status"], outcome["path"])
    return outcomes


def _summary_metrics(outcomes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The parent run's headline numbers: each head's held-out preference accuracy at α = 1."""
    out = {}
    for name, outcome in outcomes.items():
        acc = (
            outcome["info"].get("eval", {}).get("eval/rewards/accuracies")
            if name.startswith("train-")
            else None
        )
        if acc is not None:
            out[f"{name.removeprefix('train-')}/eval_accuracy"] = acc
    return out


def _run_training(
    store: Path,
    plan: train_stage.TrainPlan | baseline_stage.BaselinePlan,
    tracker: Tracker | None,
    parent_run: str | None,
    stage_task: Any = None,
    logged_subdir: str | None = train_stage.HEAD_SUBDIR,
):
    """Train one head (or, with `stage_task=baseline_task`, a baseline) as a cached stage, in an
    MLflow child run of the pipeline's run; `logged_subdir` of the artifact is logged to MLflow."""
    stage_task = stage_task or train_task
    tracking, child = None, None
    if tracker is not None:
        params = flatten(plan.train) | {"head": plan.kind, "artifact": plan.key}
        child = tracker.start_run(f"train-{plan.kind}", params, parent=parent_run, tags={"head": plan.kind})
        tracking = {"uri": tracker.uri, "experiment_id": tracker.experiment_id, "run_id": child}
    try:
        outcome = _run_stage(stage_task, store, key=plan.key, plan=asdict(plan), tracking=tracking)
    except BaseException:
        if tracker is not None:
            tracker.end_run(child, "FAILED")
        raise
    if tracker is not None:
        info = outcome["info"]
        if outcome["status"] != "computed":  # the metrics were logged by the run that trained it
            tracker.log_metrics(child, info.get("final", {}) | info.get("eval", {}), info.get("steps", 0))
        if logged_subdir is not None:
            tracker.log_artifacts(child, [Path(outcome["path"]) / logged_subdir], "head")
        tracker.end_run(child)
    return outcome


def _run_sweep(
    cfg: RunConfig,
    outcomes: dict[str, dict[str, Any]],
    train_plans: dict[str, train_stage.TrainPlan],
    model_source: dict[str, Any],
    tracker: Tracker | None,
    parent_run: str | None,
    baselines: dict[str, baseline_stage.BaselinePlan] | None = None,
) -> dict[str, dict[str, Any]]:
    """α-sweep generation per (head, α) and per (baseline, α) (each cached), then evaluation
    and the report."""
    store = cfg.store
    prompts = generate_stage.prompt_set(outcomes["data"]["path"], cfg.sweep)
    jobs: dict[str, dict[str, Any]] = {}
    for kind, tplan in train_plans.items():
        train_path = outcomes[f"train-{kind}"]["path"]
        for alpha in cfg.sweep.alphas:
            gplan = generate_stage.plan_generate(train_path, alpha, prompts, cfg.sweep, model_source)
            params = {"key": gplan.key, "plan": asdict(gplan), "train_plan": asdict(tplan)}
            jobs[f"generate-{kind}-{alpha:g}"] = {"builder": "head", "params": params}
    for kind, bplan in (baselines or {}).items():
        baseline_path = outcomes[f"train-{kind}"]["path"]
        for alpha in cfg.sweep.alphas:
            gplan = generate_baseline_stage.plan_baseline_generate(
                baseline_path, alpha, prompts, cfg.sweep, model_source
            )
            params = {"key": gplan.key, "plan": asdict(gplan), "baseline_plan": asdict(bplan)}
            jobs[f"generate-{kind}-{alpha:g}"] = {"builder": "baseline", "params": params}
    for job in jobs.values():  # a cache record whose artifact left the store must not answer
        job["refresh"] = not (artifact_dir(store, "generate", job["params"]["key"]) / MANIFEST).is_file()
    done = sweep_generations.with_options(task_runner=task_runner(cfg.runner))(
        store=str(store), jobs=list(jobs.values())
    )
    sweep: dict[str, dict[str, Any]] = dict(zip(jobs, done, strict=True))
    accuracy: dict[str, dict[str, float]] = {}
    for job, out in zip(jobs.values(), done, strict=True):
        plan = job["params"]["plan"]
        accuracy.setdefault(plan["head"], {})[repr(float(plan["alpha"]))] = out["preference_accuracy"]
    eplan = evaluate_stage.plan_evaluate(
        [out["path"] for out in sweep.values()],
        cfg.evaluate.reward,
        run_id=parent_run or "",
        preference_accuracy=accuracy,
        reward_revision=cfg.evaluate.reward_revision,
        reward_batch_size=cfg.evaluate.batch_size,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    sweep["evaluate"] = _run_stage(evaluate_task, store, key=eplan.key, plan=asdict(eplan))
    summary = read_table(Path(sweep["evaluate"]["path"]), "summary").to_pylist()
    report_dir = store / "reports" / eplan.key
    plots = save_summary_plots(summary, report_dir)
    sweep["evaluate"]["summary"] = summary
    sweep["evaluate"]["plots"] = {name: str(path) for name, path in plots.items()}
    matched = matched_kl_rows(summary, decoding_costs(sweep))
    tables = save_matched_kl(matched, report_dir)
    sweep["evaluate"]["matched_kl"] = matched
    sweep["evaluate"]["matched_kl_files"] = {name: str(path) for name, path in tables.items()}
    _publish_report(cfg, summary, plots, tracker, parent_run)
    if tracker is not None:  # the scores and summary tables (Parquet, with their manifest)
        tracker.log_artifacts(parent_run, [Path(sweep["evaluate"]["path"])], "evaluate")
        tracker.log_artifacts(parent_run, tables.values(), "tables")
    return sweep


def decoding_costs(sweep: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per head: LM forwards per generated token, and the measured ms per generated token of its
    fastest generation artifact (the one least slowed by other load on the machine; None where
    an artifact predates these records)."""
    rates: dict[str, list[float | None]] = {}
    forwards: dict[str, int | None] = {}
    for name, out in sweep.items():
        if not name.startswith("generate-"):
            continue
        info = out["info"]
        seconds, tokens = info.get("decode_seconds"), info.get("generated_tokens")
        rates.setdefault(info["head"], []).append(1000 * seconds / tokens if seconds and tokens else None)
        forwards[info["head"]] = info.get("lm_forwards_per_token")
    return {
        head: {
            "lm_forwards_per_token": forwards[head],
            "ms_per_token": None if None in per_token else min(per_token),
        }
        for head, per_token in rates.items()
    }


def _publish_report(cfg: RunConfig, summary: list[dict], plots: dict[str, Path], tracker, parent_run) -> None:
    """The summary as Prefect table + markdown artifacts; plots and per-(head, α) child runs in MLflow."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    slug = "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in summary]
    create_table_artifact(key=f"{slug}-summary", table=rows, description="alignheads α-sweep summary")
    create_markdown_artifact(
        key=f"{slug}-report", markdown=summary_markdown(summary), description="α-sweep report"
    )
    if tracker is None:
        return
    tracker.log_artifacts(parent_run, plots.values(), "plots")
    for row in summary:
        name = f"eval-{row['head']}-alpha-{row['alpha']:g}"
        child = tracker.start_run(name, {"head": row["head"], "alpha": str(row["alpha"])}, parent=parent_run)
        numbers = {
            k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        tracker.log_metrics(child, {k: v for k, v in numbers.items() if k != "alpha" and v == v}, 0)
        tracker.end_run(child)


def _log_pairs_dataset(tracker: Tracker, run_id: str, cfg: RunConfig, data: dict[str, Any]) -> None:
    """The validated preference pairs as the parent run's input dataset (digest = data key)."""
    pairs = read_table(Path(data["path"]), "pairs")
    source = cfg.data.train.path if cfg.data.train is not None else None
    tracker.log_dataset(
        run_id,
        name=f"{cfg.name}-pairs",
        digest=data["key"],
        source=str(source or data["path"]),
        schema={"columns": [{"name": f.name, "type": str(f.type)} for f in pairs.schema]},
        profile={"num_rows": pairs.num_rows, "splits": data["info"].get("pairs", {})},
    )


def _pipeline(cfg: RunConfig, tracker: Tracker | None, parent_run: str | None) -> dict[str, dict[str, Any]]:
    store = cfg.store
    logger = get_run_logger()
    outcomes: dict[str, dict[str, Any]] = {}

    world_dir = None
    if cfg.needs_world:
        if not cfg.world.build:
            raise ValueError("model or data come from the tiny world, but world.build is false")
        outcomes["world"] = _run_stage(
            world_task, store, key=world_stage.world_key(cfg.world), world=cfg.world
        )
        world_dir = Path(outcomes["world"]["path"])

    model_path, revision = model_location(cfg.model, world_dir)
    tokenizer_source = {
        "name_or_path": model_path,
        "revision": revision,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    tok_fp = tokenizer_fingerprint(load_tokenizer(**tokenizer_source))

    world_key = outcomes.get("world", {}).get("key")
    dplan = data_stage.plan_data(cfg.data, world_dir, world_key, tok_fp)
    outcomes["data"] = _run_stage(
        data_task, store, key=dplan.key, plan=dplan.__dict__, tokenizer_source=tokenizer_source
    )
    if tracker is not None:
        _log_pairs_dataset(tracker, parent_run, cfg, outcomes["data"])
    rejected = sum(outcomes["data"]["info"].get("rejects", {}).values())
    if rejected:
        logger.warning("%d bad rows skipped and recorded in the rejects table", rejected)

    tplan = tokenize_stage.plan_tokenize(
        cfg.tokenize, outcomes["data"]["key"], outcomes["data"]["path"], tok_fp
    )
    outcomes["tokenize"] = _run_stage(
        tokenize_task, store, key=tplan.key, plan=tplan.__dict__, tokenizer_source=tokenizer_source
    )
    rplan = refpass_stage.plan_refpass(
        cfg.refpass, cfg.model, model_path, outcomes["tokenize"]["path"], tok_fp
    )
    outcomes["refpass"] = _run_refpass(cfg, store, rplan)

    model_source = tokenizer_source | {"dtype": cfg.model.dtype}
    train_plans, baselines, trained = _train_methods(
        store, cfg.train, outcomes["refpass"]["path"], model_source, tracker, parent_run
    )
    outcomes.update(trained)
    if train_plans or baselines:
        outcomes.update(_run_sweep(cfg, outcomes, train_plans, model_source, tracker, parent_run, baselines))
    return logged(outcomes)


def _train_methods(
    store: Path,
    train: TrainConfig,
    refpass_path: str | Path,
    model_source: dict[str, Any],
    tracker: Tracker | None,
    parent_run: str | None,
) -> tuple[dict[str, train_stage.TrainPlan], dict[str, baseline_stage.BaselinePlan], dict[str, dict]]:
    """Train every enabled head and baseline over the reference cache, each a cached stage in an
    MLflow child run: (head plans, baseline plans, outcomes named `train-<kind>`)."""
    heads, baselines, outcomes = {}, {}, {}
    for kind in train_stage.CONFIG_CLASSES:
        head_cfg = getattr(train, kind)
        if head_cfg.enabled:
            heads[kind] = train_stage.plan_train(kind, head_cfg, refpass_path, model_source)
            outcomes[f"train-{kind}"] = _run_training(store, heads[kind], tracker, parent_run)
    for kind, (section, _) in baseline_stage.SECTIONS.items():
        base_cfg = getattr(train, section)
        if base_cfg.enabled:
            baselines[kind] = baseline_stage.plan_baseline(kind, base_cfg, refpass_path, model_source)
            outcomes[f"train-{kind}"] = _run_training(
                store, baselines[kind], tracker, parent_run, baseline_task, None
            )
    return heads, baselines, outcomes
