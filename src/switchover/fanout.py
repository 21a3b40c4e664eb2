"""Run one function per host in parallel and collect a result or an error for each."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

from switchover.errors import Interrupted

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Outcome(Generic[R]):
    value: R | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fan_out(
    items: Sequence[T],
    fn: Callable[[T], R],
    parallel: int,
    cancel: threading.Event | None = None,
    *,
    run_all: bool = False,
) -> list[Outcome[R]]:
    """Wait for every item (never stop at the first failure): the caller decides from the
    whole picture.

    On Ctrl-C with a cancel flag: the flag is set, running steps finish (workers stop at
    their next step boundary), and the results are returned; the caller checks the flag.
    With `run_all` the items not yet started run all the same (a phase that must not stop
    halfway). A second Ctrl-C while waiting propagates at once.
    """

    def guarded(item: T) -> Outcome[R]:
        if cancel is not None and cancel.is_set() and not run_all:
            return Outcome(error=Interrupted("interrupted"))
        try:
            return Outcome(value=fn(item))
        except Exception as e:
            return Outcome(error=e)

    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items))))
    futures = [pool.submit(guarded, item) for item in items]
    try:
        wait(futures)
    except KeyboardInterrupt:
        if cancel is None:
            raise
        cancel.set()
        wait(futures)
    finally:
        # A second Ctrl-C: items not yet started never start (with run_all too).
        pool.shutdown(wait=False, cancel_futures=True)
    return [f.result() for f in futures]
