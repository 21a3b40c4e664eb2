"""When a deploy lock may be taken over, and the heartbeat that keeps a live one fresh.

A lock is stale only when its owner is provably gone:
- it was taken on this machine (same host name, same boot and PID namespace where we can
  tell) and its process no longer runs (a reused pid is told apart by its start time);
- or it was taken elsewhere and its heartbeat, rewritten by the running deploy every ~30 s
  and timed by the host's own clock, is older than `lock_timeout`.
A lock without a heartbeat (made by an older switchover) is never judged by age. A live
owner's lock is never taken, however old it is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# How often a lock holder rewrites its heartbeat. Tests shorten it through the environment
# (an internal knob, not a documented setting).
HEARTBEAT_ENV = "SWITCHOVER_LOCK_HEARTBEAT"
DEFAULT_HEARTBEAT = 30.0
DEFAULT_LOCK_TIMEOUT = 300.0


def heartbeat_interval() -> float:
    try:
        value = float(os.environ.get(HEARTBEAT_ENV, ""))
    except ValueError:
        return DEFAULT_HEARTBEAT
    return value if value > 0 else DEFAULT_HEARTBEAT


@dataclass(frozen=True)
class LockPolicy:
    """What a host handle needs to judge and take over stale locks, and to report it."""

    timeout: float = DEFAULT_LOCK_TIMEOUT
    app: str = ""
    env: str = ""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_id() -> str | None:
    """This boot and PID namespace: two containers with one host name differ here."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}:{pidns}" if boot else None


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), to tell a reused pid apart."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def identity() -> dict[str, Any]:
    """Extra owner fields recorded in the lock so a later deploy can judge it."""
    out: dict[str, Any] = {}
    mid = machine_id()
    if mid:
        out["machine"] = mid
    start = process_start(os.getpid())
    if start:
        out["pid_start"] = start
    return out


def pid_alive(pid: int, start: str | None = None) -> bool:
    """True if `pid` runs here (and, if its start time was recorded, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it is just not ours
    stat = _read(f"/proc/{pid}/stat")
    if stat is not None:
        state = stat[stat.rfind(")") + 2 :].split()[:1]
        if state == ["Z"]:
            return False  # died, not yet reaped
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def same_machine(owner: Mapping[str, Any]) -> bool:
    if owner.get("origin") != socket.gethostname():
        return False
    theirs, ours = owner.get("machine"), machine_id()
    return theirs is None or ours is None or theirs == ours


def stale_reason(owner: Mapping[str, Any] | None, heartbeat_age: int | None,
                 lock_timeout: float) -> str | None:
    """Why this lock's owner is provably gone, or None if it may still be alive."""
    owner = owner or {}
    pid = owner.get("pid")
    if owner and same_machine(owner) and isinstance(pid, int):
        start = owner.get("pid_start")
        if pid_alive(pid, start if isinstance(start, str) else None):
            return None  # a live owner's lock is never taken, however quiet it is
        return f"its process {pid} on this machine ({owner.get('origin')}) no longer runs"
    if heartbeat_age is not None and heartbeat_age > lock_timeout:
        return (f"no heartbeat for {heartbeat_age} s (lock_timeout is {lock_timeout:g} s)")
    return None


class Heartbeat:
    """Call `beat` every `interval` seconds in a daemon thread until stopped.

    A failed beat is ignored: a missed heartbeat or two only matters after lock_timeout.
    """

    def __init__(self, beat: Callable[[], object], interval: float) -> None:
        self._beat = beat
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):
                self._beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
