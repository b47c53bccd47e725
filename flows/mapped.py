"""The mapped parts of the DAG: the reference pass's shards, the methods' sweeps (one task per
method: its calibration, its generations at all of its α and its held-out accuracy, over one load
of the method) and the dial sweep's generations (one task per dial family, all of its α vectors),
each a sub-flow that submits one cached task per item to the run's task runner (threads, or Dask
via prefect-dask). Items already complete on disk are not recomputed, whichever process made them;
when every item is complete, their tasks are submitted from the calling flow itself: no sub-flow
run (about a second of Prefect's start-up and shut-down each) and no task runner (a Dask cluster)
is started for work that is only read back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from alignheads.config import RunConfig, RunnerConfig
from alignheads.tasks.cached import RESULTS_DIR, StageResult, is_complete, run_stage
from alignheads.tasks.dial_generate import STAGE as DIALGEN_STAGE
from alignheads.tasks.dial_generate import DialGeneratePlan, dial_generate_task
from alignheads.tasks.generate import sweep_key
from alignheads.tasks.method_sweep import MethodSweepPlan, MethodSweepResult, is_swept, method_sweep_task
from alignheads.tasks.refpass import RefPassPlan, refpass_artifact, refpass_shard_task, refpass_task


def task_runner(cfg: RunnerConfig):
    """The task runner a method's or a dial family's work is submitted to: threads, worker
    processes (`ProcessPoolTaskRunner`, spawned, one interpreter each, so two sweeps' Python never
    waits on one lock; each task loads its own model anyway), or Dask (an existing cluster at
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
    if cfg.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=cfg.max_workers)
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


def shard_runner(cfg: RunnerConfig):
    """The task runner of the reference pass's shards: threads when `cfg` asks for processes, since
    the shards of one process share its one loaded reference model (`reference.load_reference`)
    and a worker process would load its own and pay its start-up; else :func:`task_runner`."""
    if cfg.kind == "processes":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    return task_runner(cfg)


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


def reference_pass(cfg: RunConfig, plan: RefPassPlan) -> StageResult:
    """Map the shards not yet done over the configured runner, then finalize (a cached stage)."""
    store = cfg.store
    artifact = refpass_artifact(store, plan)
    present = artifact.looks_complete()
    if not present:
        artifact.prepare()  # reopens a complete artifact with a damaged shard
        refresh = [not artifact.looks_done(i) for i in range(plan.n_shards)]
        refpass_shards.with_options(task_runner=shard_runner(cfg.runner))(
            store=str(store), key=plan.key, plan=asdict(plan), refresh=refresh
        )
    return run_stage(refpass_task, store, present=present, key=plan.key, plan=asdict(plan))


def _grouped_results(
    stage_task: Any, store: str, groups: list[list[dict[str, Any]]], refresh: list[bool], key_of, name_of
) -> list[StageResult]:
    """Submit `stage_task` once per group of plans (``key=key_of(plans)``, run named
    ``name_of(plans)``) to the running flow's task runner; returns every plan's result, in order.
    `refresh[i]` makes group i ignore a cache record."""
    results = Path(store) / RESULTS_DIR
    futures = [
        stage_task.with_options(result_storage=results, refresh_cache=fresh, task_run_name=name_of(plans)).submit(
            store=store, key=key_of(plans), plans=plans
        )
        for plans, fresh in zip(groups, refresh, strict=True)
    ]
    for future in futures:
        future.wait()
    out: list[StageResult] = []
    for future in futures:
        state = future.state
        cached = state.name == "Cached"
        for result in state.result():
            status = "cached" if cached else ("computed" if result.computed else "reused")
            out.append(result.model_copy(update={"status": status}))
    return out


@flow(name="dial-generations")
def dial_generations_flow(store: str, grids: list[list[dict[str, Any]]], refresh: list[bool]) -> list[StageResult]:
    """Submit one dial generation task per family (its whole α-vector grid, sampled in one pass over
    the dials loaded once) to the running flow's task runner; every (family, vector) result, in order."""
    return _grouped_results(
        dial_generate_task, store, grids, refresh,
        key_of=lambda plans: sweep_key([DialGeneratePlan(**p) for p in plans]),
        name_of=lambda plans: f"dialgen-{plans[0]['family']}",
    )  # fmt: skip


def _mapped(cfg: RunConfig, subflow: Any, **params: Any) -> Any:
    """`subflow(**params)` as a sub-flow on the configured runner when an item is to be built
    (`params["refresh"]` names one); else its function in the calling flow, whose task runner then
    answers the tasks: they only read their results back."""
    if any(params["refresh"]):
        with workers_report_here(cfg.runner):
            return subflow.with_options(task_runner=task_runner(cfg.runner))(**params)
    return subflow.fn(**params)


@contextmanager
def workers_report_here(cfg: RunnerConfig) -> Iterator[None]:
    """Worker processes report their task runs to this run's Prefect API. With no API configured,
    the run's temporary server lives in this process, and a worker process that does not know its
    address would start a temporary server of its own (seconds each, and its task runs would not
    reach the run's server); the address is handed to the workers through the settings they get."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if cfg.kind != "processes" or get_current_settings().api.url:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running:
        yield
        return
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def dial_generations(cfg: RunConfig, plans: list[DialGeneratePlan]) -> list[StageResult]:
    """Every (family, α vector) generation of the dial sweep, cached, one task per family mapped
    over the configured runner; results in the order of `plans`."""
    by_family: dict[str, list[DialGeneratePlan]] = {}
    for plan in plans:
        by_family.setdefault(plan.family, []).append(plan)
    grids = list(by_family.values())
    refresh = [not all(is_complete(cfg.store, DIALGEN_STAGE, p.key) for p in group) for group in grids]
    grids_json = [[asdict(p) for p in group] for group in grids]
    results = _mapped(cfg, dial_generations_flow, store=str(cfg.store), grids=grids_json, refresh=refresh)
    by_key = {r.key: r for r in results}
    return [by_key[p.key] for p in plans]


@flow(name="method-sweeps")
def method_sweeps_flow(store: str, plans: list[dict[str, Any]], refresh: list[bool]) -> list[MethodSweepResult]:
    """Submit one sweep task per method (calibrate, generate at every α, held-out accuracy, over
    one load of the method) to the running flow's task runner; results in order. `refresh[i]`
    makes method i ignore a cache record."""
    results = Path(store) / RESULTS_DIR
    futures = [
        method_sweep_task.with_options(result_storage=results, refresh_cache=fresh).submit(
            store=store, key=plan["key"], plan=plan
        )
        for plan, fresh in zip(plans, refresh, strict=True)
    ]
    for future in futures:
        future.wait()
    return [_with_statuses(future.state) for future in futures]


def _with_statuses(state: Any) -> MethodSweepResult:
    """A finished sweep task's result with each stage marked cached / reused / computed; a result
    Prefect's cache answered loaded nothing in this run."""
    result: MethodSweepResult = state.result()
    cached = state.name == "Cached"

    def mark(r: StageResult) -> StageResult:
        return r.model_copy(update={"status": "cached" if cached else ("computed" if r.computed else "reused")})

    return result.model_copy(
        update={
            "calibrate": mark(result.calibrate) if result.calibrate else None,
            "generate": [mark(g) for g in result.generate],
            "accuracy": mark(result.accuracy) if result.accuracy else None,
            "loads": 0 if cached else result.loads,
        }
    )


def method_sweeps(cfg: RunConfig, plans: list[MethodSweepPlan]) -> list[MethodSweepResult]:
    """Every method's sweep (`tasks.method_sweep`), cached, mapped over the configured runner;
    results in the order of `plans`. A cache record whose artifacts left the store must not
    answer: that method's task is refreshed."""
    if not plans:
        return []
    refresh = [not is_swept(cfg.store, plan) for plan in plans]
    return _mapped(cfg, method_sweeps_flow, store=str(cfg.store), plans=[asdict(p) for p in plans], refresh=refresh)
