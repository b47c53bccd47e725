"""How a stage becomes a cached Prefect task, and the typed outcome every stage task returns.

Each stage's task is keyed on its artifact key (hash of config slice + input keys + format
version). Prefect's persisted cache answers "already done" across processes; if the artifact
was removed from the store meanwhile, the cache record is refreshed and the stage rebuilds it.
Results are persisted as JSON (`StageResult` is a pydantic model): nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from alignheads.storage.artifacts import ArtifactResult, artifact_dir
from alignheads.storage.manifest import MANIFEST

# Prefect's result records, under the store (so a store carries its own cache)
RESULTS_DIR = ".prefect-results"

Status = Literal["computed", "reused", "cached"]


class StageResult(BaseModel):
    """What a stage task returns: where its artifact is, and how this run got it.

    `status`: ``computed`` (built now), ``reused`` (complete in the store already) or ``cached``
    (Prefect's cache answered without running the task); None inside the task itself.
    """

    stage: str
    key: str
    path: str
    computed: bool
    tables: dict[str, int] = {}  # table name -> rows
    info: dict[str, Any] = {}
    status: Status | None = None

    @classmethod
    def of(cls, result: ArtifactResult) -> StageResult:
        return cls(
            stage=result.stage,
            key=result.key,
            path=str(result.path),
            computed=result.computed,
            tables={name: sum(s.rows for s in shards) for name, shards in result.manifest.tables.items()},
            info=result.manifest.info,
        )

    @property
    def directory(self) -> Path:
        return Path(self.path)

    @property
    def location(self) -> Path:
        """Where the result a user opens is: the artifact directory, and for a train result the
        directory in it that holds the trained method (`<key>/head`, or `<key>/model` for the
        fine-tuned-LM methods: the method's `saved_as`)."""
        if self.stage == "train" and "kind" in self.info:
            from alignheads.models.methods import method

            return self.directory / method(self.info["kind"]).saved_as
        return self.directory


def stage_cache_key(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    """Prefect cache key of a stage's task: the stage's artifact key."""

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        return f"{stage}-{parameters['key']}"

    return key_fn


def method_run_name(stage: str) -> Callable[..., str]:
    """A `task_options` run name for a task over one method's `plan` or `plans`: the stage, the
    method (the plans' `head` or `kind`) and, when the plans have one, each α:
    ``generate-calm-a1.0``, ``generate-iav-a0.0,1.0``, ``calibrate-genarm``."""

    def name(parameters: dict[str, Any]) -> str:
        plans = parameters.get("plans") or [parameters["plan"]]
        method = plans[0].get("head") or plans[0].get("kind")
        alphas = [str(float(plan["alpha"])) for plan in plans if "alpha" in plan]
        return f"{stage}-{method}" + (f"-a{','.join(alphas)}" if alphas else "")

    return name


def task_options(stage: str, run_name: str | Callable[..., str] | None = None) -> dict[str, Any]:
    """`@task(**task_options(stage))`: named after the stage, cached on its artifact key.

    `run_name` names each task run (Prefect's `task_run_name`): a template over the task's
    parameters, e.g. ``"train-{plan[kind]}"`` gives ``train-iav``, or a function of them
    (`method_run_name`); by default a run is named after its stage.
    """
    return {
        "name": stage,
        "task_run_name": run_name or stage,
        "cache_key_fn": stage_cache_key(stage),
        "persist_result": True,
        "result_serializer": "json",
    }


def is_complete(store: Path, stage: str, key: str) -> bool:
    """Whether the artifact's manifest is in the store (it is written last)."""
    return (artifact_dir(store, stage, key) / MANIFEST).is_file()


def run_stage(stage_task: Any, store: Path, present: bool | None = None, **params: Any) -> StageResult:
    """Run one cached stage task; mark whether Prefect's cache, the store, or a fresh build answered.

    A cache record whose artifact left the store must not answer: then the task runs again
    (`present` tells whether the artifact is there; checked from its manifest when None).
    """
    if present is None:
        present = is_complete(store, stage_task.name, params["key"])
    options = stage_task.with_options(result_storage=store / RESULTS_DIR, refresh_cache=not present)
    return with_status(options(store=str(store), return_state=True, **params))


def with_status(state: Any) -> StageResult:
    """A finished stage task's result, marked cached / reused / computed."""
    result: StageResult = state.result()
    if state.name == "Cached":
        return result.model_copy(update={"status": "cached"})
    return result.model_copy(update={"status": "computed" if result.computed else "reused"})


class RunOutcome(BaseModel):
    """What a pipeline (or stage-only) flow run returns: each stage's result, typed.

    `train`, `calibrate` and `accuracy` are keyed by method name; `generate` holds one result per (method, α) in sweep order
    (each result's info names its `head` and `alpha`); `mlflow_run` is the MLflow parent run id
    (None with tracking off).
    """

    world: StageResult | None = None
    data: StageResult | None = None
    tokenize: StageResult | None = None
    refpass: StageResult | None = None
    train: dict[str, StageResult] = {}
    calibrate: dict[str, StageResult] = {}
    generate: list[StageResult] = []
    accuracy: dict[str, StageResult] = {}
    # how many times each method was loaded for its calibration, generations and accuracy
    # (`tasks.method_sweep`: at most once per method; 0 when all were complete)
    model_loads: dict[str, int] = {}
    evaluate: StageResult | None = None
    report: StageResult | None = None
    # the dials (`flows.dials`): per dial its data and training (a GenARM reward LM as
    # "<dial> (genarm)"), the dial set's path, the dial sweep's generations, evaluation, report
    dial_data: dict[str, StageResult] = {}
    dial_train: dict[str, StageResult] = {}
    dial_set: str | None = None
    dial_generate: list[StageResult] = []
    dial_evaluate: StageResult | None = None
    dial_report: StageResult | None = None
    mlflow_run: str | None = None

    def stages(self) -> list[tuple[str, StageResult]]:
        """(display name, result) of every stage that ran, in DAG order."""
        named: list[tuple[str, StageResult | None]] = [
            ("world", self.world),
            ("data", self.data),
            ("tokenize", self.tokenize),
            ("refpass", self.refpass),
        ]
        named += [(f"train {name}", result) for name, result in self.train.items()]
        named += [(f"calibrate {name}", result) for name, result in self.calibrate.items()]
        # α to 4 significant digits: a calibrated α (0.313388) would wrap the 80-column stage table
        named += [(f"generate {g.info['head']} α={g.info['alpha']:.4g}", g) for g in self.generate]
        named += [(f"accuracy {name}", result) for name, result in self.accuracy.items()]
        named += [("evaluate", self.evaluate), ("report", self.report)]
        named += [(f"data dial {name}", result) for name, result in self.dial_data.items()]
        named += [(f"train dial {name}", result) for name, result in self.dial_train.items()]
        named += [(f"dials {g.info['family']} {g.info['alpha_vector']}", g) for g in self.dial_generate]
        named += [("dial evaluate", self.dial_evaluate), ("dial report", self.dial_report)]
        return [(name, result) for name, result in named if result is not None]
