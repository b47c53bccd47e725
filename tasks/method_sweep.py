"""One trained method's whole sweep as one task, over one load of the method.

For a method it runs, in order, each a cached stage with its own artifact and key:

1. the calibrate stage (`tasks.calibrate`), when the run has target KLs;
2. the generate stage (`tasks.generate`) at the given α plus the calibrated ones, all α in one
   sampling pass with one α per row;
3. the accuracy stage (`tasks.accuracy`) at the same α, when the run asks for it.

The three share one :class:`~alignheads.tasks.loaded_method.LoadedMethod`: the model is read
from disk at most once per method per run, and not at all when every artifact is complete. The
result counts the loads (`loads`), which the pipeline logs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel

from alignheads.config import SweepConfig
from alignheads.storage.artifacts import artifact_dir
from alignheads.storage.fingerprint import fingerprint
from alignheads.storage.manifest import read_manifest
from alignheads.tasks import accuracy as accuracy_stage
from alignheads.tasks import calibrate as calibrate_stage
from alignheads.tasks import generate as generate_stage
from alignheads.tasks.cached import StageResult, is_complete, task_options
from alignheads.tasks.loaded_method import LoadedMethod
from alignheads.tasks.prompts import prompt_set_identity

__all__ = [
    "MethodSweepPlan",
    "MethodSweepResult",
    "is_swept",
    "loads_line",
    "method_sweep_task",
    "plan_method_sweep",
    "run_method_sweep",
]

STAGE = "sweep"


@dataclass(frozen=True)
class MethodSweepPlan:
    """One method's calibrate → generate → accuracy, resolved (JSON-able).

    `alphas`: the α generated besides the calibrated ones (the sweep's; none: only the calibrated
    α, and α = 0 when there are none); `calibrate`: a `CalibratePlan` as a dict, or None;
    `train_plan`: the method's `TrainPlan` as a dict when its held-out accuracy is wanted, else None.
    `key` hashes the stages' settings and the train key (Prefect's cache key of the task)."""

    key: str
    head: str
    train_path: str
    alphas: list[float]
    prompts_path: str
    sweep: dict
    model: dict
    calibrate: dict | None
    train_plan: dict | None


def plan_method_sweep(
    train_path: str | Path,
    alphas: list[float],
    prompts_path: str | Path,
    sweep: SweepConfig,
    model_source: dict[str, Any],
    calibrate: calibrate_stage.CalibratePlan | None = None,
    train_plan: dict[str, Any] | None = None,
) -> MethodSweepPlan:
    """The sweep of the method trained at `train_path` (`sweep`: the run's `SweepConfig`)."""
    from alignheads.tasks.train import STAGE as TRAIN_STAGE

    manifest = read_manifest(Path(train_path), TRAIN_STAGE)
    head = str(manifest.info.get("kind"))
    values = [float(a) + 0.0 for a in alphas]
    sweep_dict = sweep.model_dump(mode="json")
    key = fingerprint(
        {
            "train": manifest.key,
            "alphas": values,
            "prompts": prompt_set_identity(prompts_path),
            "decoding": sweep.decoding(),
            "dtype": model_source.get("dtype", "float32"),
            "calibrate": calibrate.key if calibrate else None,
            "accuracy": bool(train_plan),
            "versions": [generate_stage.GENERATE_VERSION, accuracy_stage.ACCURACY_VERSION],
        }
    )[:32]
    return MethodSweepPlan(
        key=key,
        head=head,
        train_path=str(train_path),
        alphas=values,
        prompts_path=str(prompts_path),
        sweep=sweep_dict,
        model=dict(model_source),
        calibrate=asdict(calibrate) if calibrate else None,
        train_plan=dict(train_plan) if train_plan else None,
    )


class MethodSweepResult(BaseModel):
    """What one method's sweep gives: each stage's result (`generate` in α order) and how many
    times the method was loaded for them (0: every artifact was complete)."""

    head: str
    calibrate: StageResult | None = None
    generate: list[StageResult] = []
    accuracy: StageResult | None = None
    loads: int = 0

    def results(self) -> list[StageResult]:
        return [r for r in (self.calibrate, *self.generate, self.accuracy) if r is not None]


def generated_alphas(plan: MethodSweepPlan, calibrated: dict[float, float]) -> list[float]:
    """The α generated: the plan's, then the calibrated ones not among them (sorted); α = 0 when
    there are neither."""
    extra = sorted(set(calibrated.values()) - set(plan.alphas))
    return [*plan.alphas, *extra] or [0.0]


def _generate_plans(plan: MethodSweepPlan, alphas: list[float]) -> list[generate_stage.GeneratePlan]:
    sweep = SweepConfig.model_validate(plan.sweep)
    return [generate_stage.plan_generate(plan.train_path, a, plan.prompts_path, sweep, plan.model) for a in alphas]


def _accuracy_plan(plan: MethodSweepPlan, alphas: list[float]) -> accuracy_stage.AccuracyPlan | None:
    return accuracy_stage.plan_accuracy(plan.train_plan, plan.train_path, alphas) if plan.train_plan else None


def is_swept(store: Path, plan: MethodSweepPlan) -> bool:
    """Whether every artifact of the plan is complete in the store (then a cache record may answer)."""
    calibrated: dict[float, float] = {}
    if plan.calibrate:
        cplan = calibrate_stage.CalibratePlan(**plan.calibrate)
        if not is_complete(store, calibrate_stage.STAGE, cplan.key):
            return False
        manifest = read_manifest(artifact_dir(store, calibrate_stage.STAGE, cplan.key), calibrate_stage.STAGE)
        calibrated = calibrate_stage.targets_alphas(manifest.info["targets"])
    alphas = generated_alphas(plan, calibrated)
    if not all(is_complete(store, generate_stage.STAGE, g.key) for g in _generate_plans(plan, alphas)):
        return False
    accuracy = _accuracy_plan(plan, alphas)
    return accuracy is None or is_complete(store, accuracy_stage.STAGE, accuracy.key)


def run_method_sweep(
    store: Path, plan: MethodSweepPlan, device: str = "auto", progress: bool = True
) -> MethodSweepResult:
    """Calibrate, generate and score the method of `plan`, building only the missing artifacts,
    over one lazy load of the method."""
    with LoadedMethod(plan.head, plan.train_path, plan.model, device) as method:
        calibrated: dict[float, float] = {}
        calibration = None
        if plan.calibrate:
            cplan = calibrate_stage.CalibratePlan(**plan.calibrate)
            calibration = StageResult.of(calibrate_stage.run_calibrate(store, cplan, device, progress, method))
            calibrated = calibrate_stage.calibrated_alphas(calibration)
        alphas = generated_alphas(plan, calibrated)
        gplans = _generate_plans(plan, alphas)
        generated = generate_stage.run_generate(store, gplans, device=device, progress=progress, method=method)
        aplan = _accuracy_plan(plan, alphas)
        accuracy = accuracy_stage.run_accuracy(store, aplan, device, method) if aplan else None
        return MethodSweepResult(
            head=plan.head,
            calibrate=calibration,
            generate=[StageResult.of(g) for g in generated],
            accuracy=StageResult.of(accuracy) if accuracy else None,
            loads=method.loads,
        )


def _run_name(parameters: dict[str, Any]) -> str:
    return f"{STAGE}-{parameters['plan']['head']}"


@task(**task_options(STAGE, run_name=_run_name))
def method_sweep_task(store: str, key: str, plan: dict[str, Any]) -> MethodSweepResult:
    """One method's calibrate → generate → accuracy as a cached Prefect task."""
    return run_method_sweep(Path(store), MethodSweepPlan(**plan))


def loads_line(loads: dict[str, int]) -> str:
    """The log line of a run's model loads: ``model loads for the sweeps: iav 1, calm 0 (1 in all)``."""
    each = ", ".join(f"{name} {n}" for name, n in loads.items())
    return f"model loads for the sweeps (calibrate, generate, accuracy): {each} ({sum(loads.values())} in all)"
