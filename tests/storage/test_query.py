"""DuckDB over the store: views from complete manifests only, an artifact column, read-only lock-down."""

from __future__ import annotations

import pyarrow as pa
import pytest

from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
from alignheads.storage.query import QueryError, check_read_only, run_query
from alignheads.storage.tables import write_table


def _make(store, stage, key, tables):
    def build(staging):
        return ArtifactContent(tables={n: write_table(t, staging, n) for n, t in tables.items()})

    return ensure_artifact(store, stage, key, 1, {}, {}, build)


@pytest.fixture()
def store(tmp_path):
    pairs1 = pa.table({"id": ["a", "b"], "split": ["train", "test"], "prompt": ["p1", "p2"]})
    pairs2 = pa.table({"id": ["c"], "split": ["train"], "prompt": ["p3"]})
    _make(tmp_path, "data", "k1", {"pairs": pairs1, "rejects": pa.table({"row": pa.array([], pa.int64())})})
    _make(tmp_path, "data", "k2", {"pairs": pairs2})
    # a killed run's leftovers: shards in a staging dir and a dir with no manifest
    (tmp_path / "data" / ".k3.tmp-1").mkdir()
    write_table(pairs2, tmp_path / "data" / ".k3.tmp-1", "pairs")
    write_table(pairs2, tmp_path / "data" / "k4", "pairs")
    return tmp_path


def test_views_union_complete_artifacts_with_artifact_column(store):
    t = run_query(store, "SELECT artifact, count(*) AS n FROM pairs GROUP BY artifact ORDER BY artifact")
    assert t.to_pylist() == [{"artifact": "k1", "n": 2}, {"artifact": "k2", "n": 1}]
    assert run_query(store, "SELECT count(*) AS n FROM rejects").to_pylist() == [{"n": 0}]


def test_missing_view_lists_the_available_ones(store):
    with pytest.raises(QueryError, match="views in this store: pairs, rejects"):
        run_query(store, "SELECT * FROM summary")


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 1) TO 'out.csv'",
        "ATTACH 'x.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE t AS SELECT 1",
        "SET enable_external_access=true",
        "SELECT 1; DROP VIEW pairs",
    ],
)
def test_writes_and_settings_are_refused(sql):
    with pytest.raises(QueryError, match="only read-only SELECT"):
        check_read_only(sql)


def test_files_outside_the_store_cannot_be_read(store, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(QueryError, match="disabled by configuration|Permission"):
        run_query(store, f"SELECT * FROM read_csv('{outside}')")


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(QueryError, match="does not exist"):
        run_query(tmp_path / "nope", "SELECT 1")


def test_train_metrics_view_names_the_method_of_each_artifact(tmp_path):
    metrics = pa.table({"step": [1, 2], "name": ["loss", "loss"], "value": [0.7, 0.6]})
    for key, kind in (("t1", "iav"), ("t2", "dpo-dera")):

        def build(staging, kind=kind):
            return ArtifactContent(
                tables={"train_metrics": write_table(metrics, staging, "train_metrics")}, info={"kind": kind}
            )

        ensure_artifact(tmp_path, "train", key, 1, {}, {}, build)
    rows = run_query(
        tmp_path, "SELECT artifact, method, count(*) AS n FROM train_metrics GROUP BY ALL ORDER BY artifact"
    ).to_pylist()
    assert rows == [
        {"artifact": "t1", "method": "iav", "n": 2},
        {"artifact": "t2", "method": "dpo-dera", "n": 2},
    ]
    assert run_query(tmp_path, "SELECT * FROM train_metrics LIMIT 1").column_names == [
        "artifact", "method", "step", "name", "value"
    ]  # fmt: skip
