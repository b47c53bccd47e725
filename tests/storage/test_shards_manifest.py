"""Shard writer, manifest and verified reader: atomic writes, row counts, checksums, format checks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignheads.storage.atomic import atomic_path
from alignheads.storage.manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    ArtifactError,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from alignheads.storage.tables import ShardWriter, read_table, write_table


def _table(n: int, start: int = 0) -> pa.Table:
    rows = range(start, start + n)
    return pa.table({"i": pa.array(rows, pa.int64()), "s": pa.array([f"row{k}" for k in rows], pa.string())})


def _artifact(tmp_path, rows=10, per_shard=4):
    shards = write_table(_table(rows), tmp_path, "t", rows_per_shard=per_shard)
    (tmp_path / "extra.txt").write_text("hello")
    from alignheads.storage.manifest import describe_files

    files = describe_files(tmp_path, exclude=(MANIFEST, *[s.path for s in shards]))
    write_manifest(
        tmp_path,
        stage="s",
        key="k",
        stage_version=3,
        config={"a": 1},
        inputs={},
        tables={"t": shards},
        files=files,
    )
    return shards


def test_shard_writer_splits_rows_exactly(tmp_path):
    writer = ShardWriter(tmp_path, "t", _table(0).schema, rows_per_shard=4)
    writer.write(_table(3))
    writer.write(_table(6, start=3))
    shards = writer.close()
    assert [s.rows for s in shards] == [4, 4, 1]
    assert [s.path for s in shards] == [f"t/part-0000{i}.parquet" for i in range(3)]
    back = pa.concat_tables(pq.read_table(tmp_path / s.path) for s in shards)
    assert back.column("i").to_pylist() == list(range(9))
    # no temp files left behind
    assert not [p for p in tmp_path.rglob(".*")]


def test_empty_table_keeps_schema_in_one_shard(tmp_path):
    shards = write_table(_table(0), tmp_path, "t")
    assert [s.rows for s in shards] == [0]
    assert pq.read_table(tmp_path / shards[0].path).schema.names == ["i", "s"]


def test_schema_mismatch_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, "t", _table(0).schema)
    with pytest.raises(ValueError, match="schema"):
        writer.write(pa.table({"x": [1]}))


def test_manifest_round_trip_and_verified_read(tmp_path):
    shards = _artifact(tmp_path)
    m = verify_artifact(tmp_path, "s", 3)
    assert m.tables["t"] == shards and m.format == MANIFEST_FORMAT
    assert [f.path for f in m.files] == ["extra.txt"]
    assert read_table(tmp_path, "t").column("i").to_pylist() == list(range(10))


def test_corrupt_shard_names_the_file(tmp_path):
    shards = _artifact(tmp_path)
    victim = tmp_path / shards[1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"part-00001\.parquet: checksum mismatch"):
        read_table(tmp_path, "t")


def test_truncated_shard_with_forged_checksum_is_unreadable(tmp_path):
    shards = _artifact(tmp_path)
    victim = tmp_path / shards[0].path
    victim.write_bytes(victim.read_bytes()[:50])
    raw = json.loads((tmp_path / MANIFEST).read_text())
    from alignheads.storage.fingerprint import file_sha256

    raw["tables"]["t"][0]["sha256"] = file_sha256(victim)
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="not a readable Parquet file"):
        verify_artifact(tmp_path)


def test_missing_shard_and_changed_file_are_reported(tmp_path):
    shards = _artifact(tmp_path)
    (tmp_path / "extra.txt").write_text("HELLO")
    with pytest.raises(ArtifactError, match="extra.txt: checksum mismatch"):
        verify_artifact(tmp_path)
    (tmp_path / shards[2].path).unlink()
    with pytest.raises(ArtifactError, match="part-00002.parquet: shard listed in the manifest is missing"):
        verify_artifact(tmp_path)


def test_manifest_format_and_stage_version_are_checked(tmp_path):
    _artifact(tmp_path)
    with pytest.raises(ArtifactError, match="format version 3, this version of alignheads reads 4"):
        read_manifest(tmp_path, "s", 4)
    with pytest.raises(ArtifactError, match="for stage 's', expected 'other'"):
        read_manifest(tmp_path, "other")
    raw = json.loads((tmp_path / MANIFEST).read_text())
    raw["format"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="manifest format 99"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        read_manifest(tmp_path)


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
