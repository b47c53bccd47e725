"""The mapped parts of the DAG: the reference pass's shards, the sweep's generations (one task
per method, all of its α) and the dial sweep's (one task per dial family, all of its α vectors), each a sub-flow that submits one cached task per item to the run's task runner (threads, or Dask
via prefect-dask). Items already complete on disk are not recomputed, whichever process made them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from alignheads.config import RunConfig, RunnerConfig
from alignheads.tasks.cached import RESULTS_DIR, StageResult, is_complete, run_stage, with_status
from alignheads.tasks.calibrate import STAGE as CALIBRATE_STAGE
from alignheads.tasks.calibrate import CalibratePlan, calibrate_task
from alignheads.tasks.dial_generate import STAGE as DIALGEN_STAGE
from alignheads.tasks.dial_generate import DialGeneratePlan, dial_generate_task
from alignheads.tasks.generate import STAGE as GENERATE_STAGE
from alignheads.tasks.generate import GeneratePlan, generate_task, sweep_key
from alignheads.tasks.refpass import RefPassPlan, refpass_artifact, refpass_shard_task, refpass_task


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
        refpass_shards.with_options(task_runner=task_runner(cfg.runner))(
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


@flow(name="sweep-generations")
def sweep_generations(store: str, sweeps: list[list[dict[str, Any]]], refresh: list[bool]) -> list[StageResult]:
    """Submit one generation task per method (all of its α plans, sampled in one pass over the model loaded once)
    to this flow's task runner (threads or Dask); returns every (method, α) result, in the order
    of `sweeps`. `refresh[i]` makes method i ignore a cache record."""
    return _grouped_results(
        generate_task, store, sweeps, refresh,
        key_of=lambda plans: sweep_key([GeneratePlan(**p) for p in plans]),
        name_of=lambda plans: f"generate-{plans[0]['head']}",
    )  # fmt: skip


@flow(name="dial-generations")
def dial_generations_flow(store: str, grids: list[list[dict[str, Any]]], refresh: list[bool]) -> list[StageResult]:
    """Submit one dial generation task per family (its whole α-vector grid, sampled in one pass over
    the dials loaded once) to this flow's task runner; every (family, vector) result, in order."""
    return _grouped_results(
        dial_generate_task, store, grids, refresh,
        key_of=lambda plans: sweep_key([DialGeneratePlan(**p) for p in plans]),
        name_of=lambda plans: f"dialgen-{plans[0]['family']}",
    )  # fmt: skip


def dial_generations(cfg: RunConfig, plans: list[DialGeneratePlan]) -> list[StageResult]:
    """Every (family, α vector) generation of the dial sweep, cached, one task per family mapped
    over the configured runner; results in the order of `plans`."""
    by_family: dict[str, list[DialGeneratePlan]] = {}
    for plan in plans:
        by_family.setdefault(plan.family, []).append(plan)
    grids = list(by_family.values())
    refresh = [not all(is_complete(cfg.store, DIALGEN_STAGE, p.key) for p in group) for group in grids]
    results = dial_generations_flow.with_options(task_runner=task_runner(cfg.runner))(
        store=str(cfg.store), grids=[[asdict(p) for p in group] for group in grids], refresh=refresh
    )
    by_key = {r.key: r for r in results}
    return [by_key[p.key] for p in plans]


def generations(cfg: RunConfig, plans: list[GeneratePlan]) -> list[StageResult]:
    """Every (method, α) generation of the sweep, cached, one task per method mapped over the
    configured runner; results in the order of `plans`. A cache record whose artifacts left the
    store must not answer: that method's task is refreshed."""
    by_method: dict[tuple[str, str], list[GeneratePlan]] = {}
    for plan in plans:  # one task per trained artifact (a search trains a method several times)
        by_method.setdefault((plan.head, plan.head_key), []).append(plan)
    sweeps = list(by_method.values())
    refresh = [not all(is_complete(cfg.store, GENERATE_STAGE, p.key) for p in group) for group in sweeps]
    results = sweep_generations.with_options(task_runner=task_runner(cfg.runner))(
        store=str(cfg.store), sweeps=[[asdict(p) for p in group] for group in sweeps], refresh=refresh
    )
    by_key = {r.key: r for r in results}
    return [by_key[p.key] for p in plans]


@flow(name="calibrations")
def calibrate_methods(store: str, plans: list[dict[str, Any]], refresh: list[bool]) -> list[StageResult]:
    """Submit one calibration task per method to this flow's task runner; results in order."""
    results = Path(store) / RESULTS_DIR
    futures = [
        calibrate_task.with_options(
            result_storage=results, refresh_cache=fresh, task_run_name=f"calibrate-{plan['head']}"
        ).submit(store=store, key=plan["key"], plan=plan)
        for plan, fresh in zip(plans, refresh, strict=True)
    ]
    for future in futures:
        future.wait()
    return [with_status(future.state) for future in futures]


def calibrations(cfg: RunConfig, plans: list[CalibratePlan]) -> list[StageResult]:
    """Every method's α calibration, cached, mapped over the configured runner."""
    if not plans:
        return []
    refresh = [not is_complete(cfg.store, CALIBRATE_STAGE, plan.key) for plan in plans]
    return calibrate_methods.with_options(task_runner=task_runner(cfg.runner))(
        store=str(cfg.store), plans=[asdict(plan) for plan in plans], refresh=refresh
    )
