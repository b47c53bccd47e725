"""The pipeline flow end to end on the test-size tiny world: world -> data -> tokenize.

One Prefect test harness for the session (starting one costs ~20 s); one first run shared by
the module; later runs show what is cached and what is recomputed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignheads.cli import main
from alignheads.config import RunConfig, load_config
from alignheads.flows.pipeline import pipeline
from alignheads.storage.manifest import verify_artifact
from alignheads.storage.query import run_query
from alignheads.tasks.ingest import BadRowError
from alignheads.world.build import tiny_test_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A run config YAML for the test-size world, as a user would write one."""
    root = tmp_path_factory.mktemp("pipeline")
    raw = {
        "name": "tiny-test",
        "store": str(root / "store"),
        "world": tiny_test_config().model_dump(mode="json"),
        "tokenize": {"max_prompt_length": 64, "max_response_length": 48},
    }
    path = root / "tiny-test.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def first_run(prefect_harness, config_file):
    cfg = load_config(config_file)
    return cfg, pipeline(config=cfg)


def _statuses(outcomes):
    return {stage: out["status"] for stage, out in outcomes.items()}


def test_first_run_builds_every_stage(first_run):
    cfg, outcomes = first_run
    assert _statuses(outcomes) == {"world": "computed", "data": "computed", "tokenize": "computed"}
    world = tiny_test_config()
    n_pairs = world.n_train_pairs + world.n_test_pairs
    assert outcomes["data"]["tables"] == {"pairs": n_pairs, "rejects": 0}
    assert outcomes["tokenize"]["tables"] == {"tokenized": n_pairs}
    for stage, out in outcomes.items():
        path = Path(out["path"])
        assert path == cfg.store / stage / out["key"]
        verify_artifact(path, stage)  # every shard and file matches its checksum
    # the world's build report travels in the manifest (its properties are tested in tests/world)
    assert outcomes["world"]["info"]["pair_accuracy"] == 1.0


def test_tables_are_queryable(first_run):
    cfg, _ = first_run
    counts = run_query(cfg.store, "SELECT split, count(*) AS n FROM pairs GROUP BY split ORDER BY split")
    world = tiny_test_config()
    assert counts.to_pylist() == [
        {"split": "test", "n": world.n_test_pairs},
        {"split": "train", "n": world.n_train_pairs},
    ]
    joined = run_query(
        cfg.store,
        "SELECT count(*) AS n, min(t.chosen_len) AS min_len, max(t.prompt_len) AS max_prompt "
        "FROM tokenized t JOIN pairs p USING (id)",
    ).to_pylist()[0]
    assert joined["n"] == world.n_train_pairs + world.n_test_pairs
    assert joined["min_len"] >= 2 and joined["max_prompt"] <= 64


def test_second_run_recomputes_nothing(first_run, capsys):
    cfg, outcomes = first_run
    again = pipeline(config=cfg)
    assert _statuses(again) == {"world": "cached", "data": "cached", "tokenize": "cached"}
    assert {s: o["key"] for s, o in again.items()} == {s: o["key"] for s, o in outcomes.items()}
    from alignheads.report import print_run_summary

    print_run_summary(cfg, again)
    assert "Nothing recomputed" in capsys.readouterr().out


def test_changing_token_limits_reruns_only_tokenize(first_run):
    cfg, outcomes = first_run
    shorter = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"max_prompt_length": 8})})
    out = pipeline(config=shorter)
    assert _statuses(out) == {"world": "cached", "data": "cached", "tokenize": "computed"}
    assert out["tokenize"]["key"] != outcomes["tokenize"]["key"]
    assert out["tokenize"]["info"]["truncated"]["prompt"] > 0
    rows = run_query(
        cfg.store,
        f"SELECT max(prompt_len) AS m, bool_or(prompt_truncated) AS cut FROM tokenized "
        f"WHERE artifact = '{out['tokenize']['key']}'",
    ).to_pylist()
    assert rows == [{"m": 8, "cut": True}]


def test_artifact_removed_from_store_is_rebuilt(first_run):
    cfg, outcomes = first_run
    shutil.rmtree(outcomes["tokenize"]["path"])
    out = pipeline(config=cfg)
    assert _statuses(out) == {"world": "cached", "data": "cached", "tokenize": "computed"}
    verify_artifact(Path(out["tokenize"]["path"]), "tokenize")


def _bad_data(tmp_path: Path) -> Path:
    rows = [
        {"prompt": "\n\nHuman: What is 2 + 2?\n\nAssistant:", "chosen": " 4.", "rejected": " 5, idiot."},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "", "rejected": " Go away."},
        {"prompt": "\n\nHuman: Colour of the sky?\n\nAssistant:", "chosen": " Blue.", "rejected": " Blue."},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_stop_the_run_naming_file_row_and_field(first_run, tmp_path):
    cfg, _ = first_run
    data = _bad_data(tmp_path)
    bad = RunConfig.model_validate(
        {**cfg.model_dump(), "data": {"train": {"path": str(data)}, "on_bad_rows": "error"}}
    )
    with pytest.raises(BadRowError, match=r"mine\.jsonl: row 1 \(line 2\), field 'chosen': empty string"):
        pipeline(config=bad)


def test_bad_rows_skipped_are_counted_and_queryable(first_run, tmp_path, capsys):
    cfg, _ = first_run
    data = _bad_data(tmp_path)
    skip = RunConfig.model_validate(
        {**cfg.model_dump(), "data": {"train": {"path": str(data)}, "on_bad_rows": "skip"}}
    )
    out = pipeline(config=skip)
    assert out["data"]["info"]["rejects"] == {"train": 2, "test": 0}
    assert out["data"]["info"]["pairs"]["train"] == 1
    from alignheads.report import print_run_summary

    print_run_summary(skip, out)
    assert "2 bad rows skipped" in capsys.readouterr().out
    rejects = run_query(
        cfg.store,
        f"SELECT row, field, reason FROM rejects WHERE artifact = '{out['data']['key']}' ORDER BY row",
    ).to_pylist()
    assert rejects == [
        {"row": 1, "field": "chosen", "reason": "empty string"},
        {"row": 2, "field": "rejected", "reason": "identical to 'chosen'"},
    ]


def test_cli_run_and_query(first_run, config_file, capsys):
    cfg, _ = first_run
    assert main(["run", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "Nothing recomputed" in out and str(cfg.store) in out.replace("\n", "")
    assert (
        main(
            ["query", "SELECT count(*) AS n FROM tokenized", "--config", str(config_file), "--format", "json"]
        )
        == 0
    )
    n = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"]
    assert n >= tiny_test_config().n_train_pairs + tiny_test_config().n_test_pairs


def test_console_script_query_and_errors(first_run, config_file):
    """The installed `alignheads` entry point, as a user runs it (no Prefect needed for queries)."""
    exe = Path(sys.executable).parent / "alignheads"
    ok = subprocess.run(
        [
            str(exe),
            "query",
            "SELECT count(*) AS n FROM pairs",
            "--config",
            str(config_file),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "n"
    refused = subprocess.run(
        [str(exe), "query", "COPY pairs TO 'x.csv'", "--config", str(config_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1 and "only read-only SELECT queries" in refused.stderr
    bad_key = subprocess.run(
        [str(exe), "run", "--config", str(config_file), "--set", "tokenize.max_prompt_lenght=3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad_key.returncode == 2 and "tokenize.max_prompt_lenght: unknown key" in bad_key.stderr


def test_world_verb_reuses_the_pipeline_world(first_run, config_file, capsys):
    assert main(["world", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "already in the store, reused" in out
    assert first_run[1]["world"]["key"] in out
