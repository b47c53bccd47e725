"""Calibrate stage: for one trained method, the α at which its KL to the base reaches each target.

Input: a train artifact and the calibration prompts (disjoint from the evaluation prompts, so the
choice of α does not reuse the evaluation's noise). The method is loaded once (by
`tasks.method_sweep`, which shares that load with the generations); the sweep's α grid
(α ≥ 0) is sampled on the calibration prompts in one pass, then the safeguarded secant
search of `models.calibration` measures a few more α per target (all targets of a step in one
call) until a measured KL is within `evaluate.calibration_tolerance` of each target.

Output artifact `<store>/calibrate/<key>/`: table `calibration` (one row per measured α: the
method, α, the mean KL over the calibration responses, and the target it was chosen for, if
any) and the manifest's info `targets` ``[{target, alpha, kl, converged, steps}]``. The pipeline
then generates at each chosen α on the evaluation prompts like any sweep point.

Key = hash(train artifact key, calibration prompts, decoding settings, targets, tolerance, steps,
α grid, model dtype, format version).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignheads.config import EvaluateConfig, SweepConfig
from alignheads.models.calibration import calibrate
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import StageResult
from alignheads.tasks.loaded_method import LoadedMethod
from alignheads.tasks.prompts import prompt_set_identity, read_prompt_set

STAGE = "calibrate"
CALIBRATE_VERSION = 1
TABLE = "calibration"

CALIBRATION_SCHEMA = pa.schema(
    [
        ("head", pa.string()),
        ("head_key", pa.string()),
        ("alpha", pa.float64()),
        ("kl", pa.float64()),
        ("n_responses", pa.int64()),
        ("target_kl", pa.float64()),  # the target this α was chosen for (null: a probe only)
    ]
)


@dataclass(frozen=True)
class CalibratePlan:
    """One method's calibration, resolved, with its artifact key (JSON-able)."""

    key: str
    head: str
    head_key: str
    train_path: str
    prompts_path: str  # a `tasks.prompts.save_prompt_set` artifact: the calibration prompts
    sweep: dict
    model: dict
    targets: list[float]
    grid: list[float]
    tolerance: float
    steps: int
    config: dict
    inputs: dict[str, str]


def plan_calibrate(
    train_path: str | Path,
    prompts_path: str | Path,
    sweep: SweepConfig,
    evaluate: EvaluateConfig,
    model_source: dict[str, Any],
) -> CalibratePlan:
    """The calibration of the method trained at `train_path` to `evaluate.target_kls`, on the
    prompt set at `prompts_path` (`tasks.prompts.save_prompt_set`)."""
    from alignheads.tasks.train import STAGE as TRAIN_STAGE

    manifest = read_manifest(Path(train_path), TRAIN_STAGE)
    grid = sorted({0.0, *(float(a) for a in sweep.alphas if a > 0)})
    config = {
        "head": manifest.info.get("kind"),
        "prompts": prompt_set_identity(prompts_path),
        "decoding": sweep.decoding(),
        "dtype": model_source.get("dtype", "float32"),
        "targets": list(evaluate.target_kls),
        "grid": grid,
        "tolerance": evaluate.calibration_tolerance,
        "steps": evaluate.calibration_steps,
    }
    inputs = {TRAIN_STAGE: manifest.key}
    return CalibratePlan(
        key=artifact_key(STAGE, config, inputs, CALIBRATE_VERSION),
        head=str(manifest.info.get("kind")),
        head_key=manifest.key,
        train_path=str(train_path),
        prompts_path=str(prompts_path),
        sweep=sweep.model_dump(mode="json"),
        model=dict(model_source),
        targets=list(evaluate.target_kls),
        grid=grid,
        tolerance=evaluate.calibration_tolerance,
        steps=evaluate.calibration_steps,
        config=config,
        inputs=inputs,
    )


def mean_kl(rows: list[dict[str, Any]]) -> float:
    """The summary's KL of these responses: the mean over responses of each one's mean per-token
    KL to the base (`models.metrics.KL_DEFINITION`); responses without a KL are skipped."""
    values = [r["kl_mean"] for r in rows if r.get("kl_mean") is not None]
    return math.fsum(values) / len(values) if values else math.nan


def run_calibrate(
    store: Path,
    plan: CalibratePlan,
    device: str = "auto",
    progress: bool = True,
    method: LoadedMethod | None = None,
) -> ArtifactResult:
    """Build the calibration artifact unless a complete one exists. `method`: the method already
    loaded by the caller (`tasks.method_sweep` shares one load between stages); by default it is
    loaded here, only if the artifact must be built."""
    sweep = SweepConfig.model_validate(plan.sweep)

    def build(staging: Path) -> ArtifactContent:
        counts: dict[float, int] = {}
        prompts = read_prompt_set(plan.prompts_path)
        loaded = method or LoadedMethod(plan.head, plan.train_path, plan.model, device)
        with loaded.sampler(sweep, progress) as sample:

            def measure(alphas: list[float]) -> list[float]:
                desc = f"calibrate {plan.head} α={', '.join(f'{a:g}' for a in alphas)}"
                rows = sample(prompts, alphas, desc)
                by_alpha: dict[float, list[dict[str, Any]]] = {}
                for row in rows:
                    by_alpha.setdefault(row["alpha"], []).append(row)
                counts.update({a: len(by_alpha[a]) for a in alphas})
                return [mean_kl(by_alpha[a]) for a in alphas]

            found, probes = calibrate(
                measure, plan.targets, plan.grid, tolerance=plan.tolerance, max_steps=plan.steps
            )
        chosen = {c.alpha: c.target for c in found}
        table = pa.Table.from_pylist(
            [
                {
                    "head": plan.head,
                    "head_key": plan.head_key,
                    "alpha": alpha,
                    "kl": kl,
                    "n_responses": counts.get(alpha, 0),
                    "target_kl": chosen.get(alpha),
                }
                for alpha, kl in probes.items()
            ],
            schema=CALIBRATION_SCHEMA,
        )
        info = {"head": plan.head, "targets": [asdict(c) for c in found], "probes": len(probes)}
        return ArtifactContent(tables={TABLE: write_table(table, staging, TABLE)}, info=info)

    return ensure_artifact(store, STAGE, plan.key, CALIBRATE_VERSION, plan.config, plan.inputs, build)


def calibrated_alphas(result: StageResult) -> dict[float, float]:
    """``{target KL: α}`` of a finished calibration."""
    return targets_alphas(result.info["targets"])


def targets_alphas(targets: list[dict[str, Any]]) -> dict[float, float]:
    """``{target KL: α}`` of a calibration manifest's info `targets`."""
    return {float(t["target"]): float(t["alpha"]) for t in targets}
