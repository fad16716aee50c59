"""Run a function ahead of its consumer on worker threads, in input order, a bounded window ahead.

Two stages use it: planning looks up image sizes and headers in object storage ahead of the
planner (each lookup is a network round trip), and decoding runs ahead of the encoders. The
window keeps memory bounded: a stream of millions of records is never held at once.
"""

from __future__ import annotations

import concurrent.futures as futures
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

Tag = TypeVar("Tag")
Arg = TypeVar("Arg")
Result = TypeVar("Result")


def bounded_map(fn: Callable[[Arg], Result], tagged_args: Iterable[tuple[Tag, Arg]],
                executor: futures.Executor | None, window: int) -> Iterator[tuple[Tag, Result]]:
    """(tag, fn(arg)) for each (tag, arg), in input order, with at most ``window`` calls in flight.

    Without an executor the calls run inline, one at a time. An exception raised by a call is
    raised here, in order, when its result is due.
    """
    if executor is None:
        for tag, arg in tagged_args:
            yield tag, fn(arg)
        return
    pending: deque = deque()
    for tag, arg in tagged_args:
        pending.append((tag, executor.submit(fn, arg)))
        if len(pending) >= window:
            done_tag, future = pending.popleft()
            yield done_tag, future.result()
    while pending:
        done_tag, future = pending.popleft()
        yield done_tag, future.result()
