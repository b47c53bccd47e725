"""A toy sharded artifact: five deterministic shards of two small tables, its plan and summary."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from alignheads.storage.sharded_artifact import ShardData, ShardedArtifact

N_SHARDS = 5
CONFIG = {"rows": 3}


def make_shard(index: int) -> ShardData:
    """Deterministic content of shard `index` (two tables)."""
    return ShardData(
        tables={
            "t": pa.table({"shard": [index] * 3, "v": [index * 10 + j for j in range(3)]}),
            "u": pa.table({"shard": [index]}),
        },
        info={"index": index, "rows": 3},
    )


def artifact(store: Path, config: dict | None = None, n_shards: int = N_SHARDS) -> ShardedArtifact:
    return ShardedArtifact(store, "stage", "k1", 1, config or CONFIG, {"up": "x"}, n_shards, ("t", "u"))


def summarize(records):
    return {"rows": sum(r.info["rows"] for r in records)}
