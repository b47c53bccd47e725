"""One part of a flow run beside another: a sub-flow in a thread of the running flow.

The pipeline's dials part needs only the run's inputs and its data, not the methods' training or
sweeps, so on a cold run it runs beside them and the second core is not left idle while one
training after another runs on the first. The part is a sub-flow of its own rather than tasks
called from a second thread: Prefect numbers a flow run's task runs per task from counters in
the flow run's context, which two threads calling the same tasks (data, tokenize, train) would
share, while a sub-flow has its own. The thread runs in a copy of the calling thread's context,
so the sub-flow knows its parent flow run and logs to it.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect import flow


@contextmanager
def beside(part: Callable[[], None], name: str) -> Iterator[None]:
    """Run ``part()`` as the sub-flow `name` in a thread while the block runs, and wait for it when
    the block ends; its error is raised then. If the block fails, its error is raised once `part`
    has ended too, so nothing is left writing to the store. An interrupt (Ctrl-C) or exit goes
    through at once: the thread is a daemon and stops with the process, and an artifact it was
    writing is left unfinished in staging, never half-written in place."""

    def body() -> None:
        part()

    subflow = flow(name=name, validate_parameters=False)(body)
    context = contextvars.copy_context()
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            context.run(subflow)
        except BaseException as error:  # handed to the calling thread, which raises it
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield
    except Exception:
        thread.join()
        raise
    thread.join()
    if outcome[0] is not None:
        raise outcome[0]
