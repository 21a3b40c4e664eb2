"""The transport seam: run a script, sync a tree. Everything above it is transport-agnostic."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from switchover.errors import HostError, Interrupted
from switchover.hosts import HostSpec


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def message(self) -> str:
        """The most useful one-line reason from the output, for error messages."""
        for text in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
            if lines:
                return lines[-1]
        return f"exit status {self.rc}"


@dataclass(frozen=True)
class SyncStats:
    files_total: int = 0
    files_transferred: int = 0
    bytes_transferred: int = 0  # size of the file data that was sent
    bytes_sent: int = 0  # what went over the wire, protocol included


class Transport(Protocol):
    host: HostSpec
    abort: threading.Event | None  # when set, the running step is killed at once

    def connect(self) -> None: ...

    def run(self, script: str, *, timeout: float | None = None) -> Result: ...

    def sync(
        self,
        src: Path,
        dest: str,
        *,
        link_dest: str | None,
        exclude: Sequence[str],
        timeout: float | None = None,
    ) -> SyncStats: ...

    def close(self) -> None: ...


def run_process(
    argv: Sequence[str],
    *,
    timeout: float | None,
    host: str,
    what: str,
    abort: threading.Event | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv in its own session so Ctrl-C reaches us, not the child mid-step.

    The deploy decides what an interrupt means: before the switch it sets `abort` and the
    step is killed at once (nothing live depends on it); after the switch steps run to
    their end. A child killed by the terminal's SIGINT could leave a step half-done.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if abort is not None and abort.is_set():
                raise Interrupted(f"{what} interrupted", host=host)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise HostError(f"{what} timed out after {timeout:g} s", host=host)
            wait = 0.2 if abort is not None else None  # poll the abort flag
            if left is not None:
                wait = left if wait is None else min(wait, left)
            try:
                out, err = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:  # our own Interrupted/HostError above, or Ctrl-C
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the child's process group and reap it, without waiting for EOF on its pipes.

    Over a ControlMaster the master holds copies of our pipe fds until the remote side
    ends, so reading to EOF after a kill could wait as long as the remote command runs.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


_STAT_PATTERNS = {
    "files_total": re.compile(r"^Number of files: ([\d,.]+)", re.M),
    "files_transferred": re.compile(r"^Number of regular files transferred: ([\d,.]+)", re.M),
    "bytes_transferred": re.compile(r"^Total transferred file size: ([\d,.]+)", re.M),
    "bytes_sent": re.compile(r"^Total bytes sent: ([\d,.]+)", re.M),
}


def parse_rsync_stats(output: str) -> SyncStats:
    values: dict[str, int] = {}
    for key, pattern in _STAT_PATTERNS.items():
        m = pattern.search(output)
        if m:
            values[key] = int(re.sub(r"[,.]", "", m.group(1)))
    return SyncStats(**values)


def rsync_args(src: Path, link_dest: str | None, exclude: Sequence[str]) -> list[str]:
    """The rsync options shared by both transports (destination appended by the caller)."""
    # --checksum: rsync's quick check (size + mtime) would hard-link the *old* copy of a
    # file whose content changed but whose size did not, whenever mtimes are pinned
    # (reproducible builds, `git archive`, SOURCE_DATE_EPOCH) or fall in one second.
    args = ["rsync", "-a", "--checksum", "--delete", "--stats", "--timeout=60"]
    if link_dest:
        # Unchanged files become hard links to the live release's copies: not sent, not stored.
        args.append(f"--link-dest={link_dest}")
    args += [f"--exclude={pattern}" for pattern in exclude]
    args.append(str(src).rstrip("/") + "/")
    return args
