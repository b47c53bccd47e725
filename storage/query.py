"""Read-only DuckDB over the store: one view per table name, built from complete manifests only.

Each view is the union of that table's shards across every complete artifact in the store,
with an `artifact` column holding the artifact key (several configs can share one store);
`train_metrics` also has a `method` column, the method its train artifact trained.
Shards not listed in a manifest (a killed run's leftovers) are never seen.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import duckdb
import pyarrow as pa

from alignheads.storage.manifest import MANIFEST, ArtifactError, read_manifest

VIEW_NAMES = (
    "pairs",
    "rejects",
    "tokenized",
    "refcache",
    "train_metrics",
    "generations",
    "scores",
    "summary",
    "calibrated",
    "comparisons",
    "calibration",
    "accuracy",
    "dials",
    "dial_generations",
    "dial_scores",
    "dial_summary",
    "dial_effects",
)
ALLOWED_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


class QueryError(ValueError):
    """A query that is refused (not read-only) or fails; the message says why."""


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def train_methods(store: Path) -> dict[str, str]:
    """{train artifact key: method name} (the manifest's `kind`) of the store's complete train
    artifacts: the `train_metrics` view's `method` column."""
    methods = {}
    for manifest_path in sorted(Path(store).glob(f"train/*/{MANIFEST}")):
        if manifest_path.parent.name.startswith("."):
            continue
        try:
            manifest = read_manifest(manifest_path.parent)
        except ArtifactError:
            continue
        methods[manifest.key] = str(manifest.info.get("kind", ""))
    return methods


def table_shards(store: Path) -> dict[str, dict[str, list[Path]]]:
    """{table name: {artifact key: [shard paths]}} over every complete artifact under `store`."""
    found: dict[str, dict[str, list[Path]]] = defaultdict(dict)
    for manifest_path in sorted(Path(store).glob(f"*/*/{MANIFEST}")):
        directory = manifest_path.parent
        if directory.name.startswith("."):
            continue
        try:
            manifest = read_manifest(directory)
        except ArtifactError:
            continue  # not ours to show; `verify` commands report it
        for name, shards in manifest.tables.items():
            found[name][manifest.key] = [directory / s.path for s in shards]
    return dict(found)


def open_store(store: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views, locked to reading the store's shards."""
    store = Path(store).resolve()
    if not store.is_dir():
        raise QueryError(
            f"store {store} does not exist (run `alignheads run` first, or pass --set store=DIR)"
        )
    con = duckdb.connect(":memory:")
    con.execute("SET autoinstall_known_extensions=false")
    con.execute("SET autoload_known_extensions=false")
    files: list[str] = []
    methods = train_methods(store)
    for name, by_key in sorted(table_shards(store).items()):
        parts = []
        for key, paths in sorted(by_key.items()):
            listed = ", ".join(_sql_str(str(p)) for p in paths)
            # train_metrics: which method each artifact trained, next to its key
            method = f", {_sql_str(methods.get(key, ''))} AS method" if name == "train_metrics" else ""
            parts.append(f"SELECT {_sql_str(key)} AS artifact{method}, * FROM read_parquet([{listed}])")
            files.extend(str(p) for p in paths)
        con.execute(f'CREATE VIEW "{name}" AS ' + " UNION ALL BY NAME ".join(parts))
    # Views read their files lazily, so allow exactly those files, then forbid everything else
    # (other files, extensions, changing these settings back).
    con.execute("SET allowed_paths=[" + ", ".join(_sql_str(f) for f in files) + "]")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    return con


def check_read_only(sql: str) -> None:
    """Refuse anything but SELECT/EXPLAIN statements (no COPY, ATTACH, INSTALL, SET, DDL)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse query: {exc}") from exc
    if not statements:
        raise QueryError("empty query")
    for stmt in statements:
        if stmt.type not in ALLOWED_STATEMENTS:
            kind = stmt.type.name if hasattr(stmt.type, "name") else str(stmt.type)
            raise QueryError(f"only read-only SELECT queries are allowed here (got {kind})")


def run_query(store: Path, sql: str) -> pa.Table:
    """Run a read-only query over the store's views; returns an Arrow table."""
    check_read_only(sql)
    con = open_store(store)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.CatalogException as exc:
        views = [
            r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        ]
        raise QueryError(f"{exc}\nviews in this store: {', '.join(sorted(views)) or '(none yet)'}") from exc
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from exc
    finally:
        con.close()
