"""Where a built world keeps its pair files: a module of paths only, so that planning a run over a
world (`tasks.data`) need not import the world's builder and, with it, torch and transformers."""

from __future__ import annotations

from pathlib import Path

from alignheads.world.reward import OBJECTIVES

OBJECTIVES_DIR = "objectives"
SPLITS: tuple[str, ...] = ("train", "test")


def objective_pair_files(world_dir: Path, objective: str) -> dict[str, Path]:
    """Split -> the pair file of ``objective`` in a built world (raises ValueError if unknown)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    return {split: Path(world_dir) / OBJECTIVES_DIR / objective / f"{split}.jsonl" for split in SPLITS}
