"""World stage: build (or reuse) the tiny world in the store."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from alignheads.config import WorldConfig
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.tasks.cached import StageResult, task_options

STAGE = "world"
WORLD_VERSION = 3  # 3: per-objective pairs in objectives/ (2: test prompts distinct, unseen in train)


def world_config_slice(cfg: WorldConfig) -> dict:
    """The settings that decide the world's content (`build` only says whether to use it)."""
    return cfg.model_dump(mode="json", exclude={"build"})


def world_key(cfg: WorldConfig) -> str:
    return artifact_key(STAGE, world_config_slice(cfg), {}, WORLD_VERSION)


def run_world(store: Path, cfg: WorldConfig, progress: bool = True) -> ArtifactResult:
    """Build the world into `<store>/world/<key>/` unless a complete one is there already."""
    from alignheads.world.build import build_world

    def build(staging: Path) -> ArtifactContent:
        return ArtifactContent(info=build_world(staging, cfg, progress=progress))

    return ensure_artifact(store, STAGE, world_key(cfg), WORLD_VERSION, world_config_slice(cfg), {}, build)


@task(**task_options(STAGE))
def world_task(store: str, key: str, world: WorldConfig) -> StageResult:
    """The world stage as a cached Prefect task (`key` = `world_key(world)`)."""
    return StageResult.of(run_world(Path(store), world))
