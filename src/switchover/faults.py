"""A test hook for fault injection: pause the tool at a named step so a test can kill it there.

Set SWITCHOVER_TEST_PAUSE_AT to a step name (or several, comma-separated; `step@host` for one
host only) and, optionally, SWITCHOVER_TEST_PAUSE_MARKER to a file path. When a deploy reaches
that step it writes "<step> <host> <pid>" to the marker file and sleeps (at most
SWITCHOVER_TEST_PAUSE_SECONDS, default 60), so the test can SIGKILL it at exactly that point.
Unset, it does nothing.
It is a test hook only: nothing in normal operation sets these variables.

Steps, in deploy order: after_lock, after_begin, after_upload, after_finalize, before_switch,
during_switch (the detached switch step runs on the host), after_hooks, after_health,
before_rollback_switch, during_rollback (the detached rollback step runs on the host),
after_rollback_hooks, before_finish (success recorded + unlocked in one round trip),
before_unlock (the unlock on every other way out).
"""

from __future__ import annotations

import os
import time

PAUSE_AT = "SWITCHOVER_TEST_PAUSE_AT"
PAUSE_MARKER = "SWITCHOVER_TEST_PAUSE_MARKER"
PAUSE_SECONDS = "SWITCHOVER_TEST_PAUSE_SECONDS"


def pausing(step: str, host: str = "") -> bool:
    """True if the environment asks to pause at `step` (on every host, or `step@host`)."""
    asked = os.environ.get(PAUSE_AT, "").split(",")
    return step in asked or (bool(host) and f"{step}@{host}" in asked)


def pause(step: str, host: str = "") -> None:
    """If asked to by the environment, mark and sleep at `step` (see the module docstring)."""
    if not pausing(step, host):
        return
    marker = os.environ.get(PAUSE_MARKER)
    if marker:
        with open(marker, "a") as f:
            f.write(f"{step} {host} {os.getpid()}\n")
    try:
        seconds = float(os.environ.get(PAUSE_SECONDS, "60"))
    except ValueError:
        seconds = 60.0
    time.sleep(max(0.0, min(seconds, 600.0)))
