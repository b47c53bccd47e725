"""Untrusted files and services: pickles are refused unread, remote code stays off, queries cannot
write or reach outside the store, no secret is committed, and every server binds 127.0.0.1."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from alignheads.config import ModelConfig, load_config
from alignheads.models.head_io import HeadFormatError, load_head
from alignheads.storage.query import QueryError, run_query
from tests.helpers.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]


class _Trap:
    """Unpickling this writes a marker file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "head.pt", "weights.pkl"])
def test_pickled_heads_are_refused_unread(tmp_path, name):
    head = tmp_path / "head"
    head.mkdir()
    marker = tmp_path / "executed"
    (head / name).write_bytes(pickle.dumps({"align.weight": _Trap(marker)}))
    for offered in (head, head / name):  # a directory holding it, or the file itself
        with pytest.raises(HeadFormatError) as err:
            load_head(offered, tiny_llama(tied=False))
        assert str(err.value) == (
            f"{head / name}: pickled weights are never loaded (unpickling can run arbitrary code); "
            "a head is a directory with head_config.json and head_model.safetensors"
        )
    assert not marker.exists()


def test_pickle_under_the_safetensors_name_is_not_unpickled(tmp_path):
    from alignheads.models import new_head
    from alignheads.models.head_io import save_head

    model = tiny_llama(tied=False)
    path = save_head(new_head("iav", model), tmp_path / "head", base_model=model)
    marker = tmp_path / "executed"
    torch.save({"align.weight": _Trap(marker)}, path / "head_model.safetensors")
    with pytest.raises(
        HeadFormatError, match=re.escape("head_model.safetensors: not a readable safetensors file")
    ):
        load_head(path, model)
    assert not marker.exists()


def test_remote_code_is_off_unless_the_config_sets_it():
    assert ModelConfig().trust_remote_code is False
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        assert load_config(path).model.trust_remote_code is bool(
            raw.get("model", {}).get("trust_remote_code")
        ), path
        assert raw.get("model", {}).get("trust_remote_code", False) is False, f"{path} turns remote code on"


@pytest.fixture
def store(tmp_path):
    import pyarrow as pa

    from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
    from alignheads.storage.tables import write_table

    ensure_artifact(
        tmp_path / "store",
        "data",
        "k1",
        1,
        {},
        {},
        lambda s: ArtifactContent({"pairs": write_table(pa.table({"id": ["a"]}), s, "pairs")}),
    )
    return tmp_path / "store"


@pytest.mark.parametrize(
    "sql",
    [
        "ATTACH 'other.duckdb' AS o",
        "INSTALL httpfs",
        "LOAD httpfs",
        "COPY pairs TO 'leak.parquet'",
        "EXPORT DATABASE 'dump'",
        "CREATE TABLE t AS SELECT 1",
        "SET enable_external_access = true",
        "SELECT 1; DROP VIEW pairs",
    ],
)
def test_query_cannot_write_attach_copy_or_install(store, sql):
    with pytest.raises(QueryError, match=r"only read-only SELECT queries are allowed here \(got "):
        run_query(store, sql)
    assert sorted(p.name for p in store.iterdir()) == ["data"]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('{store}/../*.parquet')",
        "SELECT current_setting('enable_external_access') AS v FROM (SELECT set_config('x', '1'))",
    ],
)
def test_query_cannot_read_outside_the_store(store, sql):
    with pytest.raises(QueryError):
        run_query(store, sql.format(store=store))


# ------------------------------------------------------------------------------------------ services
# a key named like a credential (`hf_token`, `password`, `api_key`), not `max_new_tokens`
SECRET_KEY = re.compile(
    r"^(.*[_-])?(token|secret|password|passwd|api[_-]?key|credentials?|access[_-]?key)$", re.IGNORECASE
)
SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,})")


def _leaves(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def test_no_secret_or_token_in_prefect_yaml_or_configs():
    files = [ROOT / "prefect.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
    assert len(files) >= 2
    for path in files:
        text = path.read_text()
        assert not SECRET_VALUE.search(text), f"{path}: looks like a credential"
        for key, value in _leaves(yaml.safe_load(text)):
            if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, "", False):
                # only a reference to the environment is allowed, never the value itself
                assert isinstance(value, str) and value.startswith("{{ $"), f"{path}: {key} = {value!r}"


def test_servers_the_project_starts_bind_localhost():
    """The in-process Dask cluster's scheduler and dashboards, and the test harness's Prefect API."""
    from alignheads.config import RunnerConfig
    from alignheads.flows.mapped import task_runner

    runner = task_runner(RunnerConfig(kind="dask", max_workers=2))
    kwargs = runner.cluster_kwargs
    assert kwargs["processes"] is False  # scheduler and workers talk in-process, no TCP listener
    assert kwargs["dashboard_address"].startswith("127.0.0.1:")
    assert kwargs["worker_dashboard_address"].startswith("127.0.0.1:")
    sources = [
        p for d in ("alignheads", "flows", "tasks", "storage", "models") for p in (ROOT / d).rglob("*.py")
    ]
    binds = [p for p in sources if re.search(r"""(host|address)\s*=\s*["']0\.0\.0\.0""", p.read_text())]
    assert binds == []
