"""The dials part of the pipeline: several heads on one backbone, one per objective.

    per dial: data ─> tokenize ─> reference pass ─> train (its head; and a GenARM reward LM)
    ─> dial set ─> dial sweep (one task per family, all α vectors) ─> dial evaluate ─> dial report

Each dial reuses the pipeline's own stages (`pipeline.reference_cache`, the train stage), so its
artifacts are cached and keyed like the run's heads; only the sweep over α vectors, its scoring
and its report are dial stages of their own (`tasks/dial_*.py`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from alignheads.config import RunConfig
from alignheads.flows.inputs import RunInputs, reference_cache, train_one
from alignheads.flows.mapped import dial_generations
from alignheads.flows.tracking import RunTracking
from alignheads.tasks import dial_evaluate as dial_evaluate_stage
from alignheads.tasks import dial_generate as dial_generate_stage
from alignheads.tasks import dial_report as dial_report_stage
from alignheads.tasks import train as train_stage
from alignheads.tasks.cached import RunOutcome, StageResult, run_stage
from alignheads.tasks.dial_set import dial_grid, save_dial_set
from alignheads.tasks.evaluate import statistics_settings
from alignheads.tasks.prompts import save_prompt_set, sweep_prompt_sets, train_prompts
from alignheads.tasks.rewards import reward_spec


def train_dial(
    cfg: RunConfig, kind: str, settings: Any, refpass: StageResult, model_source: dict[str, Any], label: str,
    run: RunTracking,
) -> tuple[train_stage.TrainPlan, StageResult]:  # fmt: skip
    """One dial's training (a head, or its GenARM reward LM) as the cached train stage, in an
    MLflow child run named `train-<label>`."""
    plan = train_stage.plan_train(kind, settings, refpass.path, model_source, label=label)
    return plan, train_one(cfg.store, plan, run)


def train_dials(
    cfg: RunConfig, inputs: RunInputs, model_source: dict[str, Any], run: RunTracking, outcome: RunOutcome
) -> list[dict[str, Any]]:
    """Every dial's reference cache and training (and, with `dials.genarm`, its reward LM),
    recorded in `outcome.dial_train`; returns the dial set's rows (`tasks.dial_set`)."""
    rows = []
    for name, dial in cfg.dials.heads.items():
        objective = cfg.dials.objective_of(name)
        data, _, refpass = reference_cache(cfg, dial.data, inputs, objective)
        outcome.dial_data[name] = data
        plan, result = train_dial(cfg, dial.method, cfg.dial_settings(name), refpass, model_source, f"dial-{name}", run)
        outcome.dial_train[name] = result
        row = {"name": name, "method": dial.method, "objective": objective, "train_key": plan.key,
               "train_path": result.path, "reward_lm_key": None, "reward_lm_path": None}  # fmt: skip
        if cfg.dials.genarm:
            settings = cfg.train.genarm.model_copy(update={"enabled": True})
            plan, result = train_dial(cfg, "genarm", settings, refpass, model_source, f"dial-{name}-genarm", run)
            outcome.dial_train[f"{name} (genarm)"] = result
            row |= {"reward_lm_key": plan.key, "reward_lm_path": result.path}
        rows.append(row)
    return rows


def dial_prompts(cfg: RunConfig, data_path: str | Path | None, dial_data: list[str]) -> list[Any]:
    """The dial sweep's prompts: the sweep's prompt source's first `dials.n_prompts` distinct
    prompts that are no training prompt of the run or of any dial."""
    seen: set[str] = set()
    for path in dial_data:
        seen |= train_prompts(path)
    ahead = cfg.sweep.model_copy(update={"n_prompts": cfg.dials.n_prompts + len(seen)})
    prompts, _, _ = sweep_prompt_sets(data_path, ahead, 0, cfg.data.train_overlap)
    kept = [p for p in prompts if p[1] not in seen] if cfg.data.train_overlap == "drop" else prompts
    dropped = len(prompts) - len(kept)
    if dropped:
        get_run_logger().info("dial sweep: %d prompts left out, they are a dial's training prompts", dropped)
    return kept[: cfg.dials.n_prompts]


def objective_specs(cfg: RunConfig) -> dict[str, dict]:
    """How each dial's objective is scored: the world's term, or the dial's reward model."""
    specs: dict[str, dict] = {}
    for name, dial in cfg.dials.heads.items():
        objective = cfg.dials.objective_of(name)
        if dial.reward is None:
            specs[objective] = {"kind": dial_evaluate_stage.WORLD_OBJECTIVE}
        else:
            specs[objective] = reward_spec(dial.reward, trust_remote_code=cfg.model.trust_remote_code)
    return specs


def run_dials(
    cfg: RunConfig, inputs: RunInputs, data_path: str | Path | None, run: RunTracking, outcome: RunOutcome
) -> None:
    """Train the dials, sweep their α grid (heads; and multi-objective GenARM), evaluate and
    report; records each result in `outcome`."""
    model_source = inputs.model_source
    rows = train_dials(cfg, inputs, model_source, run, outcome)
    dial_set = save_dial_set(cfg.store, rows)
    outcome.dial_set = str(dial_set)
    names = [r["name"] for r in rows]
    sweep = cfg.sweep.model_copy(update={"n_prompts": cfg.dials.n_prompts, "n_samples": cfg.dials.n_samples})
    prompts = dial_prompts(cfg, data_path, [d.path for d in outcome.dial_data.values()])
    prompts_path = save_prompt_set(cfg.store, prompts)
    grid = dial_grid(names, cfg.dials.strengths, cfg.dials.together, cfg.dials.grid)
    families = {"heads": {r["name"]: (r["train_key"], r["train_path"]) for r in rows}}
    if cfg.dials.genarm:
        families["genarm"] = {r["name"]: (r["reward_lm_key"], r["reward_lm_path"]) for r in rows}
    plans = [
        dial_generate_stage.plan_dial_generate(family, dial_set.name, trained, alpha, prompts_path, sweep, model_source)
        for family, trained in families.items()
        for alpha in grid
    ]
    outcome.dial_generate = dial_generations(cfg, plans)
    eplan = dial_evaluate_stage.plan_dial_evaluate(
        [g.path for g in outcome.dial_generate],
        {r["name"]: r["objective"] for r in rows},
        objective_specs(cfg),
        reward_spec(cfg.evaluate.reward, cfg.evaluate.reward_revision, trust_remote_code=cfg.model.trust_remote_code),
        statistics=statistics_settings(cfg.evaluate, sweep.seed),
        run_id=run.run_id or "",
        batch_size=cfg.evaluate.batch_size,
    )
    outcome.dial_evaluate = run_stage(dial_evaluate_stage.dial_evaluate_task, cfg.store, key=eplan.key, plan=asdict(eplan))
    rplan = dial_report_stage.plan_dial_report(outcome.dial_evaluate.path, cfg.dials.together)
    outcome.dial_report = run_stage(dial_report_stage.dial_report_task, cfg.store, key=rplan.key, plan=asdict(rplan))
    run.dial_report(cfg, outcome)
