"""Data stage: read the train and test preference pairs into the `pairs` and `rejects` tables.

Held-out means unseen: a test pair whose prompt is word for word a training prompt is dropped
(`data.train_overlap: drop`, the default) or kept (`keep`); the manifest's info counts them
either way (`overlap`), and the run warns when there are any.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task

from alignheads.config import DataConfig, SourceConfig
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key, file_sha256
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import StageResult, task_options

STAGE = "data"
DATA_VERSION = 2  # 2: test pairs repeating a training prompt are counted (and dropped by default)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataPlan:
    """Everything the data stage reads, resolved, with the artifact key it hashes to."""

    key: str
    sources: dict[str, SourceConfig]
    format: str
    on_bad_rows: str
    train_overlap: str
    config: dict
    inputs: dict[str, str]


def world_sources(world_dir: Path, objective: str | None = None) -> dict[str, SourceConfig]:
    """The tiny world's pair files: its main pairs, or those of one objective (a dial's)."""
    if objective is None:
        return {split: SourceConfig(path=str(Path(world_dir) / f"{split}.jsonl")) for split in SPLITS}
    from alignheads.world.layout import objective_pair_files

    return {split: SourceConfig(path=str(path)) for split, path in objective_pair_files(Path(world_dir), objective).items()}


def source_fingerprint(src: SourceConfig) -> dict:
    """What identifies a source's content: file checksums for local data, id + split + revision for the Hub."""
    path = Path(src.path).expanduser()
    common = {"limit": src.limit, "split": src.split, "subset": src.subset}
    if path.is_file():
        return {**common, "kind": "file", "suffix": path.suffix.lower(), "sha256": file_sha256(path)}
    if path.is_dir():  # a local dataset directory read through `datasets.load_dataset`
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        digests = {p.relative_to(path).as_posix(): file_sha256(p) for p in files}
        return {**common, "kind": "dir", "files": digests}
    # Hub datasets cannot be hashed without downloading; pin `revision` for reproducible keys.
    return {**common, "kind": "hub", "id": src.path, "revision": src.revision}


def plan_data(
    data: DataConfig,
    world_dir: Path | None,
    world_key: str | None,
    tokenizer_fp: str,
    objective: str | None = None,
) -> DataPlan:
    """Resolve the sources (falling back to the world's pairs, or to its pairs of `objective` for
    a dial) and compute the stage's key."""
    fallback = world_sources(world_dir, objective) if world_dir is not None else {}
    sources: dict[str, SourceConfig] = {}
    for split in SPLITS:
        src = getattr(data, split) or fallback.get(split)
        if src is None:
            raise ValueError(f"data.{split} is empty and no tiny world was built to supply it")
        sources[split] = src
    config = {
        "format": data.format,
        "on_bad_rows": data.on_bad_rows,
        "train_overlap": data.train_overlap,
        "sources": {split: source_fingerprint(src) for split, src in sources.items()},
    }
    # The tokenizer renders conversational rows (chat template), so it is an input of this stage.
    inputs = {"tokenizer": tokenizer_fp}
    if world_key is not None and any(getattr(data, s) is None for s in SPLITS):
        inputs["world"] = world_key
    key = artifact_key(STAGE, config, inputs, DATA_VERSION)
    return DataPlan(key, sources, data.format, data.on_bad_rows, data.train_overlap, config, inputs)


def drop_train_overlap(train: pa.Table, test: pa.Table, policy: str) -> tuple[pa.Table, dict[str, Any]]:
    """The test pairs, without those whose prompt is a training prompt when `policy` is 'drop';
    and the counts (`test_pairs_with_train_prompt`, `dropped`, `policy`)."""
    import pyarrow.compute as pc

    seen = pc.is_in(test.column("prompt"), value_set=pa.array(sorted(set(train.column("prompt").to_pylist()))))
    overlapping = int(pc.sum(seen).as_py() or 0)
    kept = test.filter(pc.invert(seen)) if policy == "drop" else test
    return kept, {
        "test_pairs_with_train_prompt": overlapping,
        "dropped": test.num_rows - kept.num_rows,
        "policy": policy,
    }


def run_data(store: Path, plan: DataPlan, tokenizer) -> ArtifactResult:
    """Build the data artifact (tables `pairs` and `rejects`) unless a complete one exists."""
    from alignheads.tasks.ingest import load_pairs

    def build(staging: Path) -> ArtifactContent:
        pairs, rejects, info = {}, [], {"pairs": {}, "rejects": {}}
        for split, src in plan.sources.items():
            p, r = load_pairs(src, split, plan.format, plan.on_bad_rows, tokenizer)
            pairs[split] = p
            rejects.append(r)
            info["rejects"][split] = r.num_rows
        pairs["test"], info["overlap"] = drop_train_overlap(pairs["train"], pairs["test"], plan.train_overlap)
        info["pairs"] = {split: t.num_rows for split, t in pairs.items()}
        tables = {
            "pairs": write_table(pa.concat_tables(pairs.values()), staging, "pairs"),
            "rejects": write_table(pa.concat_tables(rejects), staging, "rejects"),
        }
        return ArtifactContent(tables=tables, info=info)

    return ensure_artifact(store, STAGE, plan.key, DATA_VERSION, plan.config, plan.inputs, build)


@task(**task_options(STAGE))
def data_task(store: str, key: str, plan: dict[str, Any], tokenizer_source: dict[str, Any]) -> StageResult:
    """The data stage as a cached Prefect task; `tokenizer_source` names the run's tokenizer."""
    from alignheads.loading import load_tokenizer

    return StageResult.of(run_data(Path(store), DataPlan(**plan), load_tokenizer(**tokenizer_source)))
