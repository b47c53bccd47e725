"""Sharded artifacts: per-shard done-records, resume after a crash or SIGKILL, damaged shards
recomputed alone, no reuse across plans, one writer per shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignheads.storage.manifest import ArtifactError, verify_artifact
from alignheads.storage.query import run_query
from alignheads.storage.sharded_artifact import (
    SHARD_INFO_KEY,
    ShardData,
    build_sharded,
    shard_path,
)
from alignheads.storage.tables import read_table
from tests.helpers.toy_shards import CONFIG, N_SHARDS, artifact, make_shard, summarize

ROOT = Path(__file__).resolve().parents[2]


def reference_table(tmp_path: Path) -> pa.Table:
    """The table an uninterrupted build produces."""
    build = build_sharded(artifact(tmp_path / "clean"), make_shard, summarize)
    return read_table(build.result.path, "t")


def test_uninterrupted_build_then_reuse(tmp_path):
    art = artifact(tmp_path)
    build = build_sharded(art, make_shard, summarize)
    assert build.computed_shards == list(range(N_SHARDS)) and build.result.computed
    assert build.result.path == tmp_path / "stage" / "k1"
    manifest = verify_artifact(build.result.path, "stage", 1)
    assert [s.path for s in manifest.tables["t"]] == [shard_path("t", i) for i in range(N_SHARDS)]
    assert manifest.info["rows"] == 3 * N_SHARDS
    assert [i["index"] for i in manifest.info[SHARD_INFO_KEY]] == list(range(N_SHARDS))
    assert read_table(build.result.path, "t").column("v").to_pylist() == [
        i * 10 + j for i in range(N_SHARDS) for j in range(3)
    ]
    assert not art.work_dir.exists() and not art.records_dir.exists()
    again = build_sharded(artifact(tmp_path), make_shard, summarize)
    assert again.computed_shards == [] and not again.result.computed
    assert art.looks_complete() and art.missing() == []
    # the view shows the finished table, with its artifact key
    assert run_query(tmp_path, "SELECT count(*) AS n, min(artifact) AS a FROM t").to_pylist() == [
        {"n": 3 * N_SHARDS, "a": "k1"}
    ]


def test_crash_midway_resumes_with_only_the_missing_shards(tmp_path):
    store = tmp_path / "store"

    def crashing(index: int) -> ShardData:
        if index == 2:
            raise RuntimeError("killed")
        return make_shard(index)

    with pytest.raises(RuntimeError, match="killed"):
        build_sharded(artifact(store), crashing, summarize)
    art = artifact(store)
    assert not art.final_dir.exists()  # nothing visible to readers
    assert art.missing() == [2, 3, 4]
    assert run_query(store, "SELECT 1").num_rows == 1 and "t" not in _views(store)
    build = build_sharded(art, make_shard, summarize)
    assert build.computed_shards == [2, 3, 4]
    assert read_table(build.result.path, "t").equals(reference_table(tmp_path))


def _views(store: Path) -> set[str]:
    rows = run_query(store, "SELECT view_name FROM duckdb_views() WHERE NOT internal").to_pylist()
    return {r["view_name"] for r in rows}


CHILD = textwrap.dedent(
    """
    import os, signal
    from tests.helpers.toy_shards import artifact, make_shard, summarize
    from pathlib import Path
    import alignheads.storage.atomic as atomic
    from alignheads.storage.sharded_artifact import build_sharded

    real_replace = os.replace
    def replace(src, dst):
        # die in the middle of writing shard 2: its temp file is on disk, not yet renamed
        if str(dst).endswith("part-00002.parquet"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    atomic.os.replace = replace
    build_sharded(artifact(Path({store!r})), make_shard, summarize)
    """
)


def test_sigkill_during_a_shard_then_resume(tmp_path):
    store = tmp_path / "store"
    script = CHILD.format(store=str(store))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    art = artifact(store)
    leftovers = [p.name for p in art.work_dir.rglob(".*tmp-*")]
    assert leftovers, "the killed writer should have left a temp file"
    assert art.missing() == [2, 3, 4]
    build = build_sharded(art, make_shard, summarize)
    assert build.computed_shards == [2, 3, 4]
    assert read_table(build.result.path, "t").equals(reference_table(tmp_path))
    assert not [p for p in build.result.path.rglob("*") if p.name.startswith(".")]  # temp files gone


def test_partial_shard_failing_its_checksum_is_recomputed(tmp_path):
    art = artifact(tmp_path)
    art.prepare()
    for i in range(3):
        art.ensure_shard(i, lambda i=i: make_shard(i))
    damaged = art.work_dir / shard_path("t", 1)
    damaged.write_bytes(damaged.read_bytes()[:-20])  # truncated
    (art.records_dir / "00002.json").write_text("{not json")
    assert not art.looks_done(1) and art.looks_done(0)
    assert art.missing() == [1, 2, 3, 4]
    build = build_sharded(art, make_shard, summarize)
    assert build.computed_shards == [1, 2, 3, 4]
    assert read_table(build.result.path, "t").equals(reference_table(tmp_path))


def test_complete_artifact_with_a_damaged_shard_rebuilds_only_that_shard(tmp_path):
    first = build_sharded(artifact(tmp_path), make_shard, summarize).result
    bad = first.path / shard_path("u", 3)
    with open(bad, "r+b") as fh:  # truncate it
        fh.truncate(bad.stat().st_size // 2)
    art = artifact(tmp_path)
    assert not art.looks_complete()
    build = build_sharded(art, make_shard, summarize)
    assert build.computed_shards == [3]
    verify_artifact(build.result.path, "stage", 1)
    assert read_table(build.result.path, "t").equals(reference_table(tmp_path))
    aside = [p.name for p in (tmp_path / "stage").iterdir() if p.name.startswith(".corrupt-k1-u-part-00003")]
    assert len(aside) == 1  # the damaged file is kept for inspection, outside the artifact


def test_partial_build_under_another_plan_is_refused(tmp_path):
    art = artifact(tmp_path)
    art.prepare()
    art.ensure_shard(0, lambda: make_shard(0))
    other = artifact(tmp_path, config={"rows": 4})  # same key, other settings: must not mix
    with pytest.raises(ArtifactError, match=r"other settings \(differs in: config\)"):
        other.ensure_shard(1, lambda: make_shard(1))
    with pytest.raises(ArtifactError, match="other settings"):
        build_sharded(artifact(tmp_path, n_shards=6), make_shard)


def test_complete_artifact_of_another_plan_is_not_reused(tmp_path):
    build_sharded(artifact(tmp_path, config={"rows": 4}), make_shard, summarize)
    calls = []

    def counting(index: int) -> ShardData:
        calls.append(index)
        return make_shard(index)

    build = build_sharded(artifact(tmp_path), counting, summarize)
    assert calls == list(range(N_SHARDS)) and build.result.computed
    assert build.result.manifest.config == CONFIG
    assert any(p.name.startswith(".corrupt-k1-") for p in (tmp_path / "stage").iterdir())


def test_finalize_names_the_missing_shards(tmp_path):
    art = artifact(tmp_path)
    art.prepare()
    art.ensure_shard(1, lambda: make_shard(1))
    with pytest.raises(ArtifactError, match=r"4 of 5 shards not done \(0, 2, 3, 4\)"):
        art.finalize(summarize)
    with pytest.raises(IndexError):
        art.ensure_shard(5, lambda: make_shard(5))


def test_one_writer_per_shard_under_threads(tmp_path):
    calls: list[int] = []
    lock = threading.Lock()

    def slow(index: int) -> ShardData:
        with lock:
            calls.append(index)
        time.sleep(0.05)
        return make_shard(index)

    art = artifact(tmp_path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(
            pool.map(lambda i: art.ensure_shard(i % N_SHARDS, lambda: slow(i % N_SHARDS)), range(12))
        )
    assert sorted(calls) == list(range(N_SHARDS))  # each shard computed exactly once
    assert sum(o.computed for o in outcomes) == N_SHARDS
    result = art.finalize(summarize)
    assert read_table(result.path, "t").equals(reference_table(tmp_path))
    # a late caller after finalize gets the shard from the complete artifact
    late = art.ensure_shard(2, lambda: pytest.fail("must not recompute"))
    assert not late.computed and late.record.tables["t"].path == shard_path("t", 2)


def test_records_vouch_for_files(tmp_path):
    art = artifact(tmp_path)
    art.prepare()
    outcome = art.ensure_shard(0, lambda: make_shard(0))
    raw = json.loads((art.records_dir / "00000.json").read_text())
    assert raw["tables"]["t"]["rows"] == 3 and raw["info"] == {"index": 0, "rows": 3}
    assert pq.read_table(art.work_dir / outcome.record.tables["t"].path).num_rows == 3
    os.remove(art.work_dir / outcome.record.tables["u"].path)
    assert art.done_record(0) is None and not (art.records_dir / "00000.json").exists()
