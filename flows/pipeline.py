"""The pipeline flow: the DAG of cached stage tasks, and the compositions the stage flows share.

    world ─┐ (embedded default only)
    data ──┴─> tokenize ─> reference pass (mapped over shards) ─> train (every enabled method)
              ─> per method, over one load of it (mapped over methods): α calibration to target
                 KLs ─> α-sweep generation (all α batched) ─> held-out accuracy
              ─> evaluate ─> report
    and with `dials.enabled`, per dial data ─> tokenize ─> reference pass ─> train, then the dial
    sweep over α vectors ─> dial evaluate ─> dial report (`flows.dials`): on a cold run beside
    the methods' part, as a sub-flow in a thread (`flows.beside`), else after it

Each stage's task, plan and cache key live in its module under `alignheads.tasks`; this module
only wires them together (and `flows.tracking` logs what they did).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from alignheads.config import RunConfig, SweepConfig, TrainConfig, read_config, with_overrides
from alignheads.flows.beside import beside
from alignheads.flows.dials import run_dials
from alignheads.flows.failures import user_errors_fail_in_one_line
from alignheads.flows.inputs import RunInputs, reference_cache, run_inputs, train_one
from alignheads.flows.mapped import method_sweeps
from alignheads.flows.tracking import RunTracking, logged, tracked
from alignheads.flows.tuned import find_search, tuned_line, with_tuned
from alignheads.loading import library_progress_bars_off
from alignheads.models.methods import enabled_methods
from alignheads.runtime import pin_torch_threads
from alignheads.storage.store_errors import writing
from alignheads.storage.tracking import flatten
from alignheads.tasks import calibrate as calibrate_stage
from alignheads.tasks import evaluate as evaluate_stage
from alignheads.tasks import method_sweep
from alignheads.tasks import report as report_stage
from alignheads.tasks import train as train_stage
from alignheads.tasks.cached import RunOutcome, is_complete, run_stage
from alignheads.tasks.ingest import check_sources
from alignheads.tasks.prompts import save_prompt_set, sweep_prompt_sets


@flow(name="alignheads-pipeline", log_prints=True)
@user_errors_fail_in_one_line
def pipeline(
    config: RunConfig | None = None, overrides: list[str] | None = None, tuned: str | None = None
) -> RunOutcome:
    """Run the alignheads pipeline on one run config; returns each stage's artifact and status.

    Args:
        config: The run config; empty runs the embedded default (configs/tiny.yaml, shipped with
            the package).
        overrides: `key.path=value` settings applied on top of `config`, as `alignheads run --set`
            does (values are YAML), e.g. ["store=/data/run1", "sweep.alphas=[0, 1, 2]"].
        tuned: Train every method a search tuned with its best trial's settings (reusing that
            trial's training): a search key in the store, or "latest"; empty keeps the config's.
    """
    config = config if config is not None else read_config()
    cfg = (with_overrides(config, overrides) if overrides else config).resolved()
    pin_torch_threads(cfg.runner.torch_threads)
    if tuned:
        cfg = with_tuned(cfg, tuned)
        get_run_logger().info(tuned_line(find_search(cfg.store, tuned)))
    with writing(cfg.store, cfg.store.parent):  # a read-only or full disk: one clear line
        cfg.store.mkdir(parents=True, exist_ok=True)
    with tracked(cfg, flatten(cfg), "pipeline") as run, library_progress_bars_off():
        outcome = run_pipeline(cfg, run)
        run.headline(outcome)
        run.finish(outcome)
    return logged(outcome.model_copy(update={"mlflow_run": run.run_id}), get_run_logger().info)


def run_pipeline(cfg: RunConfig, run: RunTracking) -> RunOutcome:
    """Every stage of `cfg`, in DAG order (inside a flow run).

    The dials part needs only the run's inputs and data. When a method is still to be trained (a
    cold run), it runs beside the methods' training and sweeps, as the sub-flow `alignheads-dials`
    (`flows.beside`); otherwise (a re-run, where the methods' part is mostly read back) after
    them, in this flow, which starts no sub-flow for work that is only read back."""
    outcome, inputs = prepare_inputs(cfg, run)
    model_source = inputs.model_source
    plans = method_plans(cfg.train, outcome.refpass.path, model_source)
    dials = partial(run_dials, cfg, inputs, outcome.data.path, run, outcome) if cfg.dials.enabled else None
    training = any(not is_complete(cfg.store, train_stage.STAGE, plan.key) for plan in plans.values())
    with beside(dials, "alignheads-dials") if dials is not None and training else nullcontext():
        train_methods(cfg.store, plans, run, outcome)
        if plans:
            sweep_and_report(cfg, plans, outcome.data.path, model_source, run, outcome)
    if dials is not None and not training:
        dials()
    return outcome


def prepare_inputs(cfg: RunConfig, run: RunTracking) -> tuple[RunOutcome, RunInputs]:
    """The stages every method's training reads (world, data, tokenize, reference pass), cached;
    returns the outcome so far and the run's inputs (`inputs.model_source`: what train,
    calibrate and generate load)."""
    check_sources(cfg)  # a missing data or prompts file fails now, not after the world is built
    outcome = RunOutcome()
    inputs = run_inputs(cfg, outcome)
    outcome.data, outcome.tokenize, outcome.refpass = reference_cache(cfg, cfg.data, inputs)
    run.pairs_dataset(cfg, outcome.data)
    return outcome, inputs


def method_plans(
    train: TrainConfig, refpass_path: str | Path, model_source: dict[str, Any]
) -> dict[str, train_stage.TrainPlan]:
    """The train plan of every enabled method over the reference cache, by method name."""
    return {
        entry.name: train_stage.plan_train(entry.name, settings, refpass_path, model_source)
        for entry, settings in enabled_methods(train)
    }


def train_methods(
    store: Path, plans: dict[str, train_stage.TrainPlan], run: RunTracking, outcome: RunOutcome
) -> None:
    """Train every planned method, each a cached stage in an MLflow child run; records each
    result in `outcome.train`."""
    for name, plan in plans.items():
        outcome.train[name] = train_one(store, plan, run)


def sweep_and_report(
    cfg: RunConfig,
    plans: dict[str, train_stage.TrainPlan],
    data_path: str | Path | None,
    model_source: dict[str, Any],
    run: RunTracking,
    outcome: RunOutcome,
) -> None:
    """Per method, over one load of it (one task per method, mapped over the runner): α
    calibration to the target KLs on the calibration prompts, α-sweep generation at the sweep's α
    and its calibrated α (all α batched), and its held-out accuracy; then the evaluation and the
    report. Records each result in `outcome` and logs the model loads."""
    sweep: SweepConfig = cfg.sweep
    targets = cfg.evaluate.target_kls
    n_calibration = cfg.evaluate.calibration_prompts if targets else 0
    prompts, calibration_prompts, counts = sweep_prompt_sets(
        data_path, sweep, n_calibration, cfg.data.train_overlap
    )
    if counts["dropped_train_prompts"]:
        get_run_logger().warning(
            "%d sweep prompts left out: they are training prompts (data.train_overlap: drop)",
            counts["dropped_train_prompts"],
        )
    prompts_path = save_prompt_set(cfg.store, prompts)
    calibration_path = save_prompt_set(cfg.store, calibration_prompts) if n_calibration else None
    splans = [
        method_sweep.plan_method_sweep(
            outcome.train[name].path,
            list(sweep.alphas),
            prompts_path,
            sweep,
            model_source,
            calibrate=calibrate_stage.plan_calibrate(
                outcome.train[name].path, calibration_path, sweep, cfg.evaluate, model_source
            )
            if calibration_path
            else None,
            train_plan=asdict(plan),
        )
        for name, plan in plans.items()
    ]
    for name, swept in zip(plans, method_sweeps(cfg, splans), strict=True):
        if swept.calibrate is not None:
            outcome.calibrate[name] = swept.calibrate
        outcome.generate += swept.generate
        outcome.accuracy[name] = swept.accuracy
        outcome.model_loads[name] = swept.loads
    get_run_logger().info(method_sweep.loads_line(outcome.model_loads))
    eplan = evaluate_stage.plan_evaluate(
        [g.path for g in outcome.generate],
        cfg.evaluate.reward,
        run_id=run.run_id or "",
        accuracy_paths=[result.path for result in outcome.accuracy.values()],
        calibration={name: result.info["targets"] for name, result in outcome.calibrate.items()},
        statistics=evaluate_stage.statistics_settings(cfg.evaluate, sweep.seed),
        reward_revision=cfg.evaluate.reward_revision,
        reward_batch_size=cfg.evaluate.batch_size,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    outcome.evaluate = run_stage(evaluate_stage.evaluate_task, cfg.store, key=eplan.key, plan=asdict(eplan))
    rplan = report_stage.plan_report(outcome.evaluate.path, [g.path for g in outcome.generate])
    outcome.report = run_stage(report_stage.report_task, cfg.store, key=rplan.key, plan=asdict(rplan))
    run.report(cfg, outcome)
