"""A user's mistake ends the command in one line; a bug keeps its traceback (issue 18, item 9).

Through the installed console script: a run whose training data has a malformed JSONL line
prints `error: …pairs.jsonl: row 1 (line 2): malformed JSON: …` and Prefect's final-state line,
not the two full tracebacks Prefect's task and flow engines log; `--verbose` (on every verb)
shows them. In process: the console filter drops only user errors' records, on the console only.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignheads import cli
from alignheads.errors import USER_ERRORS
from alignheads.tasks.ingest import BadRowError
from tests.helpers.small_runs import cli_env
from tests.helpers.tiny_models import tiny_tokenizer

GOOD = {"prompt": "w1 w2", "chosen": " w3", "rejected": " w4"}


@pytest.fixture(scope="module")
def api_url(prefect_harness) -> str:
    """The session's Prefect API: the subprocesses talk to it instead of each starting an
    ephemeral server (~15 s per process)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def bad_data_config(tmp_path_factory) -> Path:
    """A run config whose data.train is a JSONL with a malformed second line; the model is a
    directory holding only a tokenizer (the run stops at the data stage, before any model load)."""
    root = tmp_path_factory.mktemp("cli-errors")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    (root / "pairs.jsonl").write_text(json.dumps(GOOD) + "\n" + '{"prompt": "w1", oops\n')
    (root / "test.jsonl").write_text(json.dumps(GOOD) + "\n")
    raw = {
        "name": "cli-errors",
        "store": str(root / "store"),
        "model": {"name_or_path": str(root / "tokenizer")},
        "data": {"train": {"path": "pairs.jsonl"}, "test": {"path": "test.jsonl"}},  # cwd-relative
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_cli(config: Path, api_url: str, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "alignheads"
    return subprocess.run(
        [str(exe), *extra, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=config.parent,
        env=cli_env(api_url, config.parent / "prefect-home"),
        timeout=300,
    )


ERROR_LINE = "error: pairs.jsonl: row 1 (line 2): malformed JSON: "


@pytest.mark.integration
@pytest.mark.slow
def test_malformed_jsonl_line_ends_the_run_in_one_line_without_tracebacks(bad_data_config, api_url):
    done = _run_cli(bad_data_config, api_url, "run")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(ERROR_LINE), done.stderr
    # Prefect's own line with the flow run's final state stays, once; the task's repeat does not
    finals = [line for line in lines if "Finished in state Failed" in line]
    assert len(finals) == 1 and "Flow run" in finals[0] and "BadRowError" in finals[0], done.stderr
    assert "Task run failed with exception" not in done.stderr
    assert "Encountered exception during execution" not in done.stderr
    assert "Flow run failed" not in done.stderr  # the flow's own log of the reason: the API's only
    # a few lines in all: the flow run's start and end, MLflow creating its database, the error
    assert len(lines) <= 8, done.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_verbose_shows_the_tracebacks(bad_data_config, api_url):
    done = _run_cli(bad_data_config, api_url, "run", "--verbose")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("Traceback (most recent call last)") >= 2, done.stderr
    assert "Task run failed with exception" in done.stderr
    # the flow run ends in a Failed state with the one-line reason, logged with its traceback
    assert "Flow run failed: BadRowError: pairs.jsonl: row 1 (line 2): malformed JSON" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(ERROR_LINE), done.stderr


def test_verbose_is_an_option_of_every_verb():
    parser = cli.build_parser()
    verbs = {"run": [], "world": [], "query": ["SELECT 1"], "merge": ["--heads", "h", "--alpha", "1",
             "--out", "o"], "generate": ["a prompt"]}  # fmt: skip
    for verb, rest in verbs.items():
        assert parser.parse_args([verb, *rest]).verbose is False, verb
        assert parser.parse_args([verb, *rest, "--verbose"]).verbose is True, verb
        assert parser.parse_args([verb, *rest, "-v"]).verbose is True, verb
        assert parser.parse_args(["--verbose", verb, *rest]).verbose is True, verb


def test_a_user_error_outside_a_flow_is_one_line_or_a_traceback_with_verbose(tmp_path, capsys):
    args = ["query", "COPY pairs TO 'x.csv'", "--set", f"store={tmp_path}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "only read-only SELECT queries" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli.main([*args, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "QueryError" in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def _record(name: str, msg: str, exc: BaseException | None = None, **extra) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (), exc_info)
    record.__dict__.update(extra)
    return record


def test_the_console_filter_drops_only_user_errors_records():
    quiet = cli.QuietUserErrors(USER_ERRORS)
    user = BadRowError("pairs.jsonl", 1, None, "malformed JSON: x", 2)
    bug = ZeroDivisionError("division by zero")
    # a user error: the task's failure and final state, and the flow's failure, are dropped
    assert not quiet.filter(_record("prefect.task_runs", "Task run failed", user, task_run_id="t1"))
    assert not quiet.filter(_record("prefect.task_runs", "Finished in state Failed('…')", task_run_id="t1"))
    assert not quiet.filter(_record("prefect.flow_runs", "Encountered exception", user, flow_run_id="f"))
    assert quiet.filter(_record("prefect.flow_runs", "Finished in state Failed('…')", flow_run_id="f"))
    # a bug keeps every record, traceback included
    assert quiet.filter(_record("prefect.task_runs", "Task run failed", bug, task_run_id="t2"))
    assert quiet.filter(_record("prefect.task_runs", "Finished in state Failed('…')", task_run_id="t2"))
    assert quiet.filter(_record("prefect.flow_runs", "Encountered exception", bug, flow_run_id="f"))
    # other loggers are never touched, not even about a user error
    assert quiet.filter(_record("prefect.engine", "something", user))
    assert quiet.filter(_record("alignheads.tasks.data", "something", user))


@pytest.mark.integration
def test_prefect_logs_a_bugs_traceback_and_not_a_user_errors(prefect_harness):
    import io

    from prefect import flow, task
    from prefect.logging.handlers import PrefectConsoleHandler

    @task
    def fails(kind: str) -> None:
        if kind == "user":
            raise BadRowError("pairs.jsonl", 1, None, "malformed JSON: x", 2)
        raise ZeroDivisionError("a bug")

    @flow
    def run(kind: str) -> None:
        fails(kind)

    # Prefect's console handler, writing into a buffer here (its stream, and its rich console's
    # file, are fixed when Prefect configures logging: pytest's capture may not see them)
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles
    buffer = io.StringIO()
    streams = [(h.setStream(buffer), h.console.file) for h in consoles]
    for h in consoles:
        h.console.file = buffer
    api = logging.getLogger("prefect.task_runs").handlers
    try:
        with cli.quiet_user_errors_on_console() as quiet:
            assert all(quiet in h.filters for h in consoles)
            assert api and all(quiet not in h.filters for h in api)  # the Prefect API still gets them
            with pytest.raises(BadRowError):
                run("user")
            user_err = buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            with pytest.raises(ZeroDivisionError):
                run("bug")
            bug_err = buffer.getvalue()
    finally:
        for h, (stream, file) in zip(consoles, streams, strict=True):
            h.setStream(stream)
            h.console.file = file
    assert "Traceback" not in user_err and "Task run failed" not in user_err, user_err
    finals = [line for line in user_err.splitlines() if "Finished in state Failed" in line]
    assert len(finals) == 1 and "Flow run" in finals[0], user_err  # the flow run's final state
    assert "Traceback (most recent call last)" in bug_err and "ZeroDivisionError: a bug" in bug_err
    assert "Task run failed with exception: ZeroDivisionError" in bug_err
    # the filter is gone afterwards: in-process callers see Prefect's logging unchanged
    assert not any(isinstance(f, cli.QuietUserErrors) for h in consoles for f in h.filters)
