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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

from prefect import flow


@contextmanager
def beside(part: Callable[[], None], name: str) -> Iterator[None]:
    """Run ``part()`` as the sub-flow `name` in a thread while the block runs, and wait for it when
    the block ends. Its error is raised then; if the block fails too, the block's error is the one
    raised (after `part` has ended either way, so nothing is left writing to the store)."""

    def body() -> None:
        part()

    subflow = flow(name=name, validate_parameters=False)(body)
    context = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as pool:
        future = pool.submit(context.run, subflow)
        try:
            yield
        finally:
            wait([future])
    future.result()
