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


def stage_cache_key(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    """Prefect cache key of a stage's task: the stage's artifact key."""

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        return f"{stage}-{parameters['key']}"

    return key_fn


def task_options(stage: str) -> dict[str, Any]:
    """`@task(**task_options(stage))`: named after the stage, cached on its artifact key."""
    return {
        "name": stage,
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

    `train` is keyed by method name; `generate` holds one result per (method, α) in sweep order
    (each result's info names its `head` and `alpha`); `mlflow_run` is the MLflow parent run id
    (None with tracking off).
    """

    world: StageResult | None = None
    data: StageResult | None = None
    tokenize: StageResult | None = None
    refpass: StageResult | None = None
    train: dict[str, StageResult] = {}
    generate: list[StageResult] = []
    evaluate: StageResult | None = None
    report: StageResult | None = None
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
        named += [(f"generate {g.info['head']} α={g.info['alpha']:g}", g) for g in self.generate]
        named += [("evaluate", self.evaluate), ("report", self.report)]
        return [(name, result) for name, result in named if result is not None]
