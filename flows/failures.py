"""How a flow run ends on a mistake the user must fix: in a Failed state whose message is that
mistake in one line (``MissingArtifactError: tokenize_key='deadbeef…': no complete tokenize
artifact …``), which the Prefect UI shows on the run; the same line is logged (with the
traceback) and sent as an event of the run before the final state, so `prefect deployment run
--watch` prints it before "Flow run finished in state 'Failed'".

`USER_ERRORS` is the one list of such errors (`alignheads.errors` re-exports it for the command
line). Any other exception is a bug: it propagates, and Prefect records it with its traceback.
Called in-process, a flow still raises the user's error itself (the Failed state carries it).
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from alignheads.config import ConfigError
from alignheads.models.head_errors import HeadFormatError, HeadMismatchError
from alignheads.storage.manifest import ArtifactError
from alignheads.storage.query import QueryError
from alignheads.tasks.ingest import DataError

__all__ = ["USER_ERRORS", "failed_state", "one_line", "user_errors_fail_in_one_line"]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ArtifactError,
    QueryError,
    DataError,
    HeadFormatError,
    HeadMismatchError,
    FileNotFoundError,  # a missing input, e.g. the stage flows' MissingArtifactError
)

F = TypeVar("F", bound=Callable[..., Any])


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (a message of several lines joined with "; ")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines).replace(":;", ":")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def failed_state(exc: BaseException) -> Any:
    """The Failed state a flow returns for a user's error: its one line as the message, and the
    error as the state's data. Before the state is set, the line is logged (with the traceback)
    and sent as the event `alignheads.flow-run.failed` of this flow run, whose resource name
    carries it: `--watch` prints a run's events (its logs may come too late), so it shows
    ``alignheads.flow-run.failed * <run name>: <reason>`` just before the Failed state."""
    from prefect import get_run_logger
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.runtime import flow_run
    from prefect.states import Failed

    message = one_line(exc)
    logger = get_run_logger()
    # with its traceback for the API and `--verbose`; the command line's console filter
    # (`cli.QuietUserErrors`) keeps a user error's record off the terminal otherwise
    logger.error("Flow run failed: %s", message, exc_info=exc)
    for handler in logging.getLogger(logger.logger.name).handlers:
        if isinstance(handler, APILogHandler):
            handler.flush()
    run_id = flow_run.get_id()
    if run_id:
        emit_event(
            event="alignheads.flow-run.failed",
            resource={
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.name": f"{flow_run.get_name()}: {message}",
            },
            payload={"reason": message},
        )
        EventsWorker.drain_all(timeout=5)  # sent before the final state's own event
    return Failed(message=message, data=exc)


def user_errors_fail_in_one_line(fn: F) -> F:
    """Decorate a flow's function (under ``@flow``): a user error ends the run in
    `failed_state`; everything else is left to Prefect."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            return failed_state(exc)

    # the signature with its annotations resolved in `fn`'s module: Prefect builds the parameters'
    # form and their validation from it, and would resolve names in this module otherwise
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    run.__annotations__ = typing.get_type_hints(fn)
    return run  # type: ignore[return-value]
