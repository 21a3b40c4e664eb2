"""fan_out under Ctrl-C: a first one stops at step boundaries (or not, with run_all), a
second one propagates and no item starts after it."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from switchover.errors import Interrupted
from switchover.fanout import fan_out

_timers: list[threading.Timer] = []


def _interrupts_at(*seconds: float) -> None:
    """KeyboardInterrupt in the main thread at each of these times from now (as Ctrl-C)."""
    def raise_interrupt(signum, frame):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, raise_interrupt)
    main = threading.main_thread().ident
    assert main is not None
    for t in seconds:  # to the main thread itself: that wakes it from its wait
        _timers.append(threading.Timer(t, signal.pthread_kill, (main, signal.SIGALRM)))
        _timers[-1].start()


@pytest.fixture(autouse=True)
def _restore_sigalrm():
    old = signal.getsignal(signal.SIGALRM)
    yield
    while _timers:  # none may fire once the default action (exit) is back
        _timers.pop().join()
    signal.signal(signal.SIGALRM, old)


STEP = 1.0  # seconds per item: both interrupts land well inside the first one


def _slow(started: list[int]):
    def step(i: int) -> int:
        started.append(i)
        time.sleep(STEP)
        return i
    return step


@pytest.mark.parametrize("run_all", [False, True])
def test_a_first_interrupt_sets_the_flag(run_all):
    started: list[int] = []
    cancel = threading.Event()
    _interrupts_at(0.1)
    outcomes = fan_out(range(2), _slow(started), 1, cancel, run_all=run_all)
    assert cancel.is_set()
    if run_all:  # every item still runs
        assert started == [0, 1] and all(o.ok for o in outcomes)
    else:  # the one in flight finishes; the others never start
        assert started == [0] and outcomes[0].value == 0
        assert all(isinstance(o.error, Interrupted) for o in outcomes[1:])


def test_a_second_interrupt_propagates_and_nothing_more_starts_even_with_run_all():
    started: list[int] = []
    cancel = threading.Event()
    _interrupts_at(0.1, 0.2)
    with pytest.raises(KeyboardInterrupt):
        fan_out(range(3), _slow(started), 1, cancel, run_all=True)
    time.sleep(STEP * 1.5)  # the next item would have started by now, had it been left queued
    assert started == [0]
