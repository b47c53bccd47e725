"""The tune flow (`alignheads tune`): a grid or random search over training settings, every
method with the same number of trials, each trial scored on validation prompts.

    world/data/tokenize/refpass (as the pipeline: `pipeline.prepare_inputs`)
      ─> train every trial (mapped over the run's task runner; each an ordinary cached train artifact)
      ─> per trial, over one load of it (mapped): calibrate α to `space.target_kl` on the
         validation prompts ─> generate at the calibrated α on them ─> evaluate (one per trial)
      ─> the search's result (`flows.tuned`: `<store>/search/<key>/`, table `trials`)

The validation prompts are the prompt source's next `space.validation_prompts` after the sweep's
evaluation and calibration prompts (`tasks.prompts.validation_prompt_set`), so a search never
sees the prompts the comparison is reported on. A trial's score is its validation reward at the
calibrated α (with its bootstrap interval). Every stage is cached, so rerunning the same search
recomputes nothing, down to the search's own artifact, keyed by the trials' train and evaluate
keys; `flows.tuned.with_tuned` reads its best trials back into a run config.

MLflow: the search is a parent run (the run config's params, plus the space as `tune.*`); each
trial is a child run `trial-<method>-<i>` with its settings as params (`train.<method>.<key>`),
its validation scores as metrics (`val_reward`, `val_reward_lo`, `val_reward_hi`, `val_kl`,
`val_alpha`, `eval_accuracy`) and, when it was trained now, its training history and, for a head
(IAV, CALM), the head as the run's MLflow model, registered as `<name>-<method>` like the
pipeline's heads (`RunTracking.trained`). The best trial of each method is tagged
`alignheads.best=true`, and its registered version gets the alias `best`: a search's best is the
validation-reward best, not the registry's held-out-accuracy rule. Every search run logs its
trials' child runs (they are the search's report in the MLflow compare view), computed or cached,
and tags the parent run `alignheads.search` with the search artifact's key.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from alignheads.config import (
    RunConfig,
    SearchSpace,
    TrainConfig,
    load_search_space,
    read_config,
    space_trials,
    with_overrides,
)
from alignheads.flows.failures import user_errors_fail_in_one_line
from alignheads.flows.mapped import method_sweeps, task_runner, workers_report_here
from alignheads.flows.pipeline import prepare_inputs
from alignheads.flows.tracking import ChildRun, RunTracking, tracked
from alignheads.flows.tuned import save_search
from alignheads.loading import library_progress_bars_off
from alignheads.models.methods import METHODS, Method
from alignheads.runtime import pin_torch_threads
from alignheads.storage import model_registry
from alignheads.storage.store_errors import writing
from alignheads.storage.tables import read_table
from alignheads.storage.tracking import flatten
from alignheads.tasks import calibrate as calibrate_stage
from alignheads.tasks import evaluate as evaluate_stage
from alignheads.tasks import method_sweep
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
    """What the tune flow returns: the shared stages, every trial, the validation prompt set, the
    search's own artifact (`flows.tuned`; its `path`) and the MLflow parent run."""

    inputs: RunOutcome
    trials: list[Trial]
    target_kl: float
    validation_prompts: str
    search: StageResult | None = None
    mlflow_run: str | None = None

    def best(self) -> dict[str, Trial]:
        return {t.method: t for t in self.trials if t.best}


def trial_settings(train: TrainConfig, method: str, values: dict[str, Any]):
    """The method's `train.<method>` section with the trial's values (validated, enabled)."""
    base = getattr(train, method)
    return type(base).model_validate(base.model_dump(mode="json") | values | {"enabled": True})


def section_method(section: str) -> Method:
    """The registry entry owning `train.<section>` (a search names sections: `dpo` is `dpo-dera`)."""
    return next(m for m in METHODS.values() if m.section == section)


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
    space: SearchSpace | None = None, config: RunConfig | None = None, overrides: list[str] | None = None
) -> TuneOutcome:
    """Search training settings: train every trial of `space`, score each on validation prompts
    (reward at the α calibrated to `space.target_kl`), tag the best per method in MLflow.

    Args:
        space: The search space: for each method, the values to try of its settings; grid or
            random, trials per method, seed, target KL, validation prompts. Empty uses the
            embedded default's (configs/spaces/tiny.yaml).
        config: The run config; empty uses the embedded default (configs/tiny.yaml).
        overrides: `key.path=value` settings applied on top of `config`, as `--set` does.
    """
    space = space if space is not None else load_search_space()
    config = config if config is not None else read_config()
    cfg = (with_overrides(config, overrides) if overrides else config).resolved()
    pin_torch_threads(cfg.runner.torch_threads)
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
    inputs, run_inputs = prepare_inputs(cfg, run)
    model_source = run_inputs.model_source
    store = cfg.store
    # the validation prompts first: a source too small for them fails before any training
    n_calibration = cfg.evaluate.calibration_prompts if cfg.evaluate.target_kls else 0
    validation = validation_prompt_set(
        inputs.data.path, cfg.sweep, n_calibration, space.validation_prompts, cfg.data.train_overlap
    )
    validation_path = save_prompt_set(store, validation)
    order = [(method, i, values) for method, items in trials.items() for i, values in enumerate(items)]
    sections = [trial_settings(cfg.train, method, values) for method, _, values in order]
    plans = [
        train_stage.plan_train(section_method(method).name, settings, inputs.refpass.path, model_source)
        for (method, _, _), settings in zip(order, sections, strict=True)
    ]
    refresh = [not is_complete(store, train_stage.STAGE, p.key) for p in plans]
    with workers_report_here(cfg.runner):
        trained = train_trials.with_options(task_runner=task_runner(cfg.runner))(
            store=str(store), plans=[asdict(p) for p in plans], refresh=refresh
        )

    target = cfg.evaluate.model_copy(update={"target_kls": [space.target_kl]})
    splans = [
        method_sweep.plan_method_sweep(
            t.path,
            # only the calibrated α: at α = 0 every trial of every method is the base LM itself,
            # the same samples again for each trial (the trial's score does not pair with them)
            [],
            validation_path,
            cfg.sweep,
            model_source,
            calibrate=calibrate_stage.plan_calibrate(t.path, validation_path, cfg.sweep, target, model_source),
        )
        for t in trained
    ]
    swept = method_sweeps(cfg, splans)
    loads = {f"{method}[{i}]": result.loads for (method, i, _), result in zip(order, swept, strict=True)}
    get_run_logger().info(method_sweep.loads_line(loads))

    out = []
    statistics = evaluate_stage.statistics_settings(cfg.evaluate, cfg.sweep.seed)
    for (method, i, values), t, result in zip(order, trained, swept, strict=True):
        c, gens = result.calibrate, result.generate
        eplan = evaluate_stage.plan_evaluate(
            [g.path for g in gens],
            cfg.evaluate.reward,
            run_id=run.run_id or "",
            calibration={section_method(method).name: c.info["targets"]},  # by the name it generates as
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
                method=method,
                index=i,
                settings=values,
                train=t,
                calibrate=c,
                generate=gens,
                evaluate=evaluated,
                eval_accuracy=accuracy,
                **{k: score.get(k) for k in ("alpha", "kl", "reward", "reward_lo", "reward_hi", "converged")},
            )  # fmt: skip
        )
    for method in trials:
        scored = [t for t in out if t.method == method and t.reward is not None]
        if scored:
            max(scored, key=lambda t: t.reward).best = True
    info = {
        "target_kl": space.target_kl,
        "validation_prompts": str(validation_path),
        "methods": list(trials),
        "best": {
            t.method: best_record(t, s.model_dump(mode="json"))
            for t, s in zip(out, sections, strict=True)
            if t.best
        },
    }
    search = save_search(store, search_rows(out), info)
    log_trials(run, out, plans, search)
    outcome = TuneOutcome(
        inputs=inputs,
        trials=out,
        target_kl=space.target_kl,
        validation_prompts=str(validation_path),
        search=search,
    )
    logger = get_run_logger()
    for line in trials_table(outcome).splitlines():
        logger.info(line)
    return outcome


def search_rows(trials: list[Trial]) -> list[dict[str, Any]]:
    """The search artifact's `trials` rows (`flows.tuned.TRIALS_SCHEMA`), in the search's order."""
    scores = ("reward", "reward_lo", "reward_hi", "alpha", "kl", "converged", "eval_accuracy", "best")
    return [
        {"method": t.method, "trial": t.index, "settings": json.dumps(t.settings), "train_key": t.train.key,
         "evaluate_key": t.evaluate.key} | {k: getattr(t, k) for k in scores}
        for t in trials
    ]  # fmt: skip


def best_record(trial: Trial, settings: dict[str, Any]) -> dict[str, Any]:
    """A method's best trial as the search artifact's info holds it: index, keys, validation reward,
    the searched `values` and the whole `train.<method>` section (`settings`)."""
    return {
        "trial": trial.index, "train_key": trial.train.key, "evaluate_key": trial.evaluate.key,
        "reward": trial.reward, "values": trial.settings, "settings": settings,
    }  # fmt: skip


def log_trials(
    run: RunTracking, trials: list[Trial], plans: list[train_stage.TrainPlan], search: StageResult
) -> None:
    """One MLflow child run per trial under the search's parent run; a head trained now is logged
    and registered as the pipeline's are; `best` aliases the best trials (module docstring)."""
    tracker = run.tracker
    if tracker is None:
        return
    computed = search.status == "computed"
    for trial, plan in zip(trials, plans, strict=True):
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
        if trial.train.status == "computed":  # its trained files and model; ends the child run
            run.trained(ChildRun(child, None), plan, trial.train)
        else:
            tracker.end_run(child)
        trial.mlflow_run = child
        computed = computed or any(s.status == "computed" for s in trial.stages())
    alias_best_trials(run, [(t, p) for t, p in zip(trials, plans, strict=True) if t.best])
    tags = {"alignheads.cached": str(not computed).lower(), "alignheads.search": search.key}
    tags |= {f"{BEST_TAG}.{t.method}": t.mlflow_run for t in trials if t.best and t.mlflow_run}
    tracker.set_tags(run.run_id, tags)


def alias_best_trials(run: RunTracking, best: list[tuple[Trial, train_stage.TrainPlan]]) -> None:
    """Move the alias `best` of each head method's registered model `<name>-<method>` to the version
    of its best trial (found by its train key, whichever run registered it). A best trial with no
    version (trained with tracking off) or an MLflow failure is a warning, not a failed search."""
    logger = get_run_logger()
    for trial, plan in best:
        if plan.method.saved_as != "head":  # fine-tuned LMs are not registered
            continue
        name = f"{run.name}-{plan.run_label}"  # as `RunTracking.register_head` names it
        try:
            version = model_registry.version_with_tag(
                run.tracker, name, model_registry.TRAIN_KEY_TAG, plan.key
            )
            if version is None:
                logger.warning("MLflow: %s trial %d (train %s) has no version of %s to alias as best",
                               trial.method, trial.index, plan.key, name)  # fmt: skip
                continue
            model_registry.move_alias(run.tracker, name, model_registry.BEST, version)
        except Exception as exc:  # noqa: BLE001 (the search's results are in the store; say so, go on)
            logger.warning(
                "MLflow: the best %s trial was not aliased as %s@best: %s", trial.method, name, exc
            )
            continue
        logger.info("MLflow: %s@best is version %s (%s trial %d, the best validation reward)",
                    name, version, trial.method, trial.index)  # fmt: skip


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def trials_table(outcome: TuneOutcome) -> str:
    """The trials per method, with their validation scores, the best one marked with `*`."""
    lines = [f"validation reward at the α calibrated to KL {outcome.target_kl:g} (95 % interval):"]
    for method in dict.fromkeys(t.method for t in outcome.trials):
        lines.append(f"{method}:")
        for t in (t for t in outcome.trials if t.method == method):
            settings = " ".join(f"{k}={v}" for k, v in t.settings.items()) or "(the run config's settings)"
            interval = f"[{_number(t.reward_lo)}, {_number(t.reward_hi)}]"
            lines.append(
                f"  {'*' if t.best else ' '} trial {t.index}: {settings}  reward {_number(t.reward)} "
                f"{interval}  α {_number(t.alpha)}  kl {_number(t.kl)}  ({t.train.status}, train {t.train.key})"
            )
    best = outcome.best()
    lines.append("best: " + (", ".join(f"{m} trial {t.index}" for m, t in best.items()) or "none scored"))
    return "\n".join(lines)
