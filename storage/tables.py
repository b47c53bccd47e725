"""Parquet shards: atomic writes with row counts and checksums, verified reads."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignheads.storage.atomic import atomic_path
from alignheads.storage.fingerprint import file_sha256
from alignheads.storage.manifest import ArtifactError, ShardInfo, read_manifest, verify_shard


def write_shard(table: pa.Table, directory: Path, relpath: str) -> ShardInfo:
    """Write `table` to `directory/relpath` atomically (temp name, fsync, rename); return its ShardInfo."""
    path = directory / relpath
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return ShardInfo(relpath, table.num_rows, file_sha256(path))


class ShardWriter:
    """Split one table's rows into Parquet shards of at most `rows_per_shard` rows.

    Shards are named `<table>/part-00000.parquet`, ... inside `directory`. `close()` returns
    the ShardInfo list to put in the manifest. An empty table still gets one (empty) shard so
    its schema is on disk.
    """

    def __init__(self, directory: Path, table: str, schema: pa.Schema, rows_per_shard: int = 100_000):
        if rows_per_shard <= 0:
            raise ValueError("rows_per_shard must be positive")
        self.directory = directory
        self.table = table
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.shards: list[ShardInfo] = []

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if not data.schema.equals(self.schema):
            raise ValueError(f"table {self.table!r}: schema {data.schema} differs from {self.schema}")
        batches = data.to_batches() if isinstance(data, pa.Table) else [data]
        for batch in batches:
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
            while self._pending_rows >= self.rows_per_shard:
                self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        head, rest = table.slice(0, rows), table.slice(rows)
        relpath = f"{self.table}/part-{len(self.shards):05d}.parquet"
        self.shards.append(write_shard(head, self.directory, relpath))
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows

    def close(self) -> list[ShardInfo]:
        if self._pending_rows or not self.shards:
            self._flush(self._pending_rows)
        return self.shards


def write_table(
    table: pa.Table, directory: Path, name: str, rows_per_shard: int = 100_000
) -> list[ShardInfo]:
    """Write a whole in-memory table as shards; return their ShardInfo list."""
    writer = ShardWriter(directory, name, table.schema, rows_per_shard)
    writer.write(table)
    return writer.close()


def read_table(directory: Path, name: str, verify: bool = True) -> pa.Table:
    """Read table `name` of a complete artifact, checking each shard against the manifest first."""
    manifest = read_manifest(directory)
    if name not in manifest.tables:
        raise ArtifactError(f"{directory}: artifact has no table {name!r} (has {sorted(manifest.tables)})")
    parts = []
    for shard in manifest.tables[name]:
        if verify:
            verify_shard(directory, shard)
        parts.append(pq.read_table(directory / shard.path))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def read_table_rows(directory: Path, name: str, start: int, stop: int, verify: bool = True) -> pa.Table:
    """Rows `start <= row < stop` of table `name` of a complete artifact.

    Opens only the shards that hold those rows, each checked against the manifest first when
    `verify`. An empty range gives an empty table with the table's schema.
    """
    manifest = read_manifest(directory)
    if name not in manifest.tables:
        raise ArtifactError(f"{directory}: artifact has no table {name!r} (has {sorted(manifest.tables)})")
    shards = manifest.tables[name]
    total = sum(s.rows for s in shards)
    if not 0 <= start <= stop <= total:
        raise ValueError(
            f"{directory}: rows [{start}, {stop}) out of range for table {name!r} ({total} rows)"
        )
    parts, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.rows)
        if lo < hi:
            if verify:
                verify_shard(directory, shard)
            parts.append(pq.read_table(directory / shard.path).slice(lo - offset, hi - lo))
        offset += shard.rows
    if not parts:
        return pq.read_schema(directory / shards[0].path).empty_table()
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]
