"""The tune flow (`alignheads tune`): a grid or random search over training settings, every
method with the same number of trials, each trial scored on validation prompts.

    world/data/tokenize/refpass (as the pipeline: `pipeline.prepare_inputs`)
      ─> train every trial (mapped over the run's task runner; each an ordinary cached train artifact)
      ─> calibrate α to `space.target_kl` on the validation prompts (mapped)
      ─> generate at α = 0 and the calibrated α on them (mapped) ─> evaluate (one per trial)

The validation prompts are the prompt source's next `space.validation_prompts` after the sweep's
evaluation and calibration prompts (`tasks.prompts.validation_prompt_set`), so a search never
sees the prompts the comparison is reported on. A trial's score is its validation reward at the
calibrated α (with its bootstrap interval). Every stage is cached, so rerunning the same search
recomputes nothing.

MLflow: the search is a parent run (the run config's params, plus the space as `tune.*`); each
trial is a child run `trial-<method>-<i>` with its settings as params (`train.<method>.<key>`),
its validation scores as metrics (`val_reward`, `val_reward_lo`, `val_reward_hi`, `val_kl`,
`val_alpha`, `eval_accuracy`) and, when it was trained now, its training history. The best trial
of each method is tagged `alignheads.best=true`. Every search run logs its trials' child runs
(they are the search's report in the MLflow compare view), computed or cached.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from alignheads.config import RunConfig, SearchSpace, TrainConfig, read_config, space_trials, with_overrides
from alignheads.flows.failures import user_errors_fail_in_one_line
from alignheads.flows.mapped import calibrations, generations, task_runner
from alignheads.flows.pipeline import prepare_inputs
from alignheads.flows.tracking import RunTracking, tracked
from alignheads.loading import library_progress_bars_off
from alignheads.storage.store_errors import writing
from alignheads.storage.tables import read_table
from alignheads.storage.tracking import flatten
from alignheads.tasks import calibrate as calibrate_stage
from alignheads.tasks import evaluate as evaluate_stage
from alignheads.tasks import generate as generate_stage
from alignheads.tasks import train as train_stage
from alignheads.tasks.cached import RESULTS_DIR, RunOutcome, StageResult, is_complete, run_stage, with_status
from alignheads.tasks.prompts import save_prompt_set, validation_prompt_set

BEST_TAG = "alignheads.best"


class Trial(BaseModel):
    """One trial of a search: its settings, its stages' results and its validation score."""

    method: str
    index: int
    settings: dict[str, Any]
    train: StageResult
    calibrate: StageResult
    generate: list[StageResult]
    evaluate: StageResult
    alpha: float | None = None
    kl: float | None = None
    reward: float | None = None
    reward_lo: float | None = None
    reward_hi: float | None = None
    converged: bool | None = None
    eval_accuracy: float | None = None
    best: bool = False
    mlflow_run: str | None = None

    def stages(self) -> list[StageResult]:
        return [self.train, self.calibrate, *self.generate, self.evaluate]


class TuneOutcome(BaseModel):
    """What the tune flow returns: the shared stages, every trial, the validation prompt set and
    the MLflow parent run."""

    inputs: RunOutcome
    trials: list[Trial]
    target_kl: float
    validation_prompts: str
    mlflow_run: str | None = None

    def best(self) -> dict[str, Trial]:
        return {t.method: t for t in self.trials if t.best}


def trial_settings(train: TrainConfig, method: str, values: dict[str, Any]):
    """The method's `train.<method>` section with the trial's values (validated, enabled)."""
    base = getattr(train, method)
    return type(base).model_validate(base.model_dump(mode="json") | values | {"enabled": True})


@flow(name="trial-trainings")
def train_trials(store: str, plans: list[dict[str, Any]], refresh: list[bool]) -> list[StageResult]:
    """Submit one train task per trial to this flow's task runner; results in order."""
    results = Path(store) / RESULTS_DIR
    futures = [
        train_stage.train_task.with_options(result_storage=results, refresh_cache=fresh).submit(
            store=store, key=plan["key"], plan=plan, tracking=None
        )
        for plan, fresh in zip(plans, refresh, strict=True)
    ]
    for future in futures:
        future.wait()
    return [with_status(future.state) for future in futures]


@flow(name="alignheads-tune", log_prints=True)
@user_errors_fail_in_one_line
def tune(
    space: SearchSpace, config: RunConfig | None = None, overrides: list[str] | None = None
) -> TuneOutcome:
    """Search training settings: train every trial of `space`, score each on validation prompts
    (reward at the α calibrated to `space.target_kl`), tag the best per method in MLflow.

    Args:
        space: The search space: for each method, the values to try of its settings; grid or
            random, trials per method, seed, target KL, validation prompts.
        config: The run config; empty uses the embedded default (configs/tiny.yaml).
        overrides: `key.path=value` settings applied on top of `config`, as `--set` does.
    """
    config = config if config is not None else read_config()
    cfg = (with_overrides(config, overrides) if overrides else config).resolved()
    trials = space_trials(space)
    with writing(cfg.store, cfg.store.parent):
        cfg.store.mkdir(parents=True, exist_ok=True)
    params = flatten(cfg) | flatten(space.model_dump(mode="json"), "tune.")
    with tracked(cfg, params, "tune") as run, library_progress_bars_off():
        outcome = run_search(cfg, space, trials, run)
    return outcome.model_copy(update={"mlflow_run": run.run_id})


def run_search(
    cfg: RunConfig, space: SearchSpace, trials: dict[str, list[dict[str, Any]]], run: RunTracking
) -> TuneOutcome:
    """Every trial of `trials`, trained, calibrated, generated and evaluated (inside a flow run)."""
    inputs, model_source = prepare_inputs(cfg, run)
    store = cfg.store
    # the validation prompts first: a source too small for them fails before any training
    n_calibration = cfg.evaluate.calibration_prompts if cfg.evaluate.target_kls else 0
    validation = validation_prompt_set(
        inputs.data.path, cfg.sweep, n_calibration, space.validation_prompts, cfg.data.train_overlap
    )
    validation_path = save_prompt_set(store, validation)
    order = [(method, i, values) for method, items in trials.items() for i, values in enumerate(items)]
    plans = [
        train_stage.plan_train(method, trial_settings(cfg.train, method, values), inputs.refpass.path, model_source)
        for method, _, values in order
    ]
    refresh = [not is_complete(store, train_stage.STAGE, p.key) for p in plans]
    trained = train_trials.with_options(task_runner=task_runner(cfg.runner))(
        store=str(store), plans=[asdict(p) for p in plans], refresh=refresh
    )

    target = cfg.evaluate.model_copy(update={"target_kls": [space.target_kl]})
    cplans = [
        calibrate_stage.plan_calibrate(t.path, validation_path, cfg.sweep, target, model_source) for t in trained
    ]
    calibrated = calibrations(cfg, cplans)
    gen_plans = [
        [
            generate_stage.plan_generate(t.path, alpha, validation_path, cfg.sweep, model_source)
            for alpha in sorted({0.0, *calibrate_stage.calibrated_alphas(c).values()})
        ]
        for t, c in zip(trained, calibrated, strict=True)
    ]
    generated = generations(cfg, [p for group in gen_plans for p in group])
    by_key = {g.key: g for g in generated}

    out = []
    statistics = evaluate_stage.statistics_settings(cfg.evaluate, cfg.sweep.seed)
    for (method, i, values), t, c, group in zip(order, trained, calibrated, gen_plans, strict=True):
        gens = [by_key[p.key] for p in group]
        eplan = evaluate_stage.plan_evaluate(
            [g.path for g in gens],
            cfg.evaluate.reward,
            run_id=run.run_id or "",
            calibration={method: c.info["targets"]},
            statistics=statistics,
            reward_revision=cfg.evaluate.reward_revision,
            reward_batch_size=cfg.evaluate.batch_size,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        evaluated = run_stage(evaluate_stage.evaluate_task, store, key=eplan.key, plan=asdict(eplan))
        rows = read_table(evaluated.directory, "calibrated").to_pylist()
        score = next((r for r in rows if r["target_kl"] == space.target_kl), {})
        accuracy = t.info.get("eval", {}).get("eval/rewards/accuracies")
        out.append(
            Trial(
                method=method, index=i, settings=values, train=t, calibrate=c, generate=gens,
                evaluate=evaluated, eval_accuracy=accuracy,
                **{k: score.get(k) for k in ("alpha", "kl", "reward", "reward_lo", "reward_hi", "converged")},
            )  # fmt: skip
        )
    for method in trials:
        scored = [t for t in out if t.method == method and t.reward is not None]
        if scored:
            max(scored, key=lambda t: t.reward).best = True
    log_trials(run, out)
    outcome = TuneOutcome(
        inputs=inputs, trials=out, target_kl=space.target_kl, validation_prompts=str(validation_path)
    )
    logger = get_run_logger()
    for line in trials_table(outcome).splitlines():
        logger.info(line)
    return outcome


def log_trials(run: RunTracking, trials: list[Trial]) -> None:
    """One MLflow child run per trial under the search's parent run (module docstring)."""
    tracker = run.tracker
    if tracker is None:
        return
    computed = False
    for trial in trials:
        params = {f"train.{trial.method}.{k}": str(v) for k, v in trial.settings.items()}
        params |= {"method": trial.method, "trial": str(trial.index), "train_key": trial.train.key}
        tags = {"head": trial.method, BEST_TAG: str(trial.best).lower()}
        child = tracker.start_run(f"trial-{trial.method}-{trial.index}", params, parent=run.run_id, tags=tags)
        if trial.train.status == "computed":
            tracker.log_history(child, read_table(trial.train.directory, "train_metrics").to_pylist())
        metrics = {
            "val_reward": trial.reward, "val_reward_lo": trial.reward_lo, "val_reward_hi": trial.reward_hi,
            "val_kl": trial.kl, "val_alpha": trial.alpha, "eval_accuracy": trial.eval_accuracy,
            "val_converged": None if trial.converged is None else float(trial.converged),
        }  # fmt: skip
        tracker.log_metrics(child, {k: v for k, v in metrics.items() if v is not None}, step=0)
        tracker.end_run(child)
        trial.mlflow_run = child
        computed = computed or any(s.status == "computed" for s in trial.stages())
    tags = {"alignheads.cached": str(not computed).lower()}
    tags |= {f"{BEST_TAG}.{t.method}": t.mlflow_run for t in trials if t.best and t.mlflow_run}
    tracker.set_tags(run.run_id, tags)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def trials_table(outcome: TuneOutcome) -> str:
    """The trials per method, with their validation scores, the best one marked with `*`."""
    lines = [f"validation reward at the α calibrated to KL {outcome.target_kl:g} (95 % interval):"]
    for method in dict.fromkeys(t.method for t in outcome.trials):
        lines.append(f"{method}:")
        for t in (t for t in outcome.trials if t.method == method):
            settings = " ".join(f"{k}={v}" for k, v in t.settings.items())
            interval = f"[{_number(t.reward_lo)}, {_number(t.reward_hi)}]"
            lines.append(
                f"  {'*' if t.best else ' '} trial {t.index}: {settings}  reward {_number(t.reward)} "
                f"{interval}  α {_number(t.alpha)}  kl {_number(t.kl)}  ({t.train.status}, train {t.train.key})"
            )
    best = outcome.best()
    lines.append("best: " + (", ".join(f"{m} trial {t.index}" for m, t in best.items()) or "none scored"))
    return "\n".join(lines)
