"""The transport seam: run a script, sync a tree. Everything above it is transport-agnostic."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from switchover.errors import ConnectionLost, DiskFull, HostError, Interrupted, TransferError
from switchover.hosts import HostSpec

if TYPE_CHECKING:
    from switchover.transport.progress import ProgressCallback
    from switchover.treediff import TreeDiff


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

    def open_early(self) -> None:
        """Start connecting in the background, so it overlaps local work (a no-op where
        there is no connection); the first command waits for it."""
        ...

    def reconnect(self) -> None:
        """Bring the connection back after it dropped (a no-op where there is none)."""
        ...

    def run(
        self, script: str, *, timeout: float | None = None, input: bytes | None = None
    ) -> Result:
        """Run a sh script; `input` (if given) is its stdin, else stdin is /dev/null."""
        ...

    def sync(
        self,
        src: Path,
        dest: str,
        *,
        link_dest: str | None,
        exclude: Sequence[str],
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        checksum: bool = True,
        only: Sequence[str] | None = None,
    ) -> SyncStats:
        """Make dest a copy of src (unchanged files hard-linked from link_dest).

        `checksum=False` trusts rsync's quick check (size + mtime): only safe when the
        caller corrects its mistakes (quickcheck.py). `only` sends just these relative
        paths again, whatever their size and mtime, into an existing dest.
        """
        ...

    def compare(
        self, src: Path, dest: str, *, exclude: Sequence[str], timeout: float | None = None
    ) -> TreeDiff:
        """What syncing src into dest would change, file by file; writes nothing."""
        ...

    def close(self) -> None: ...

    def can_patch(self) -> bool:
        """Whether sync(only=...) really sends the listed paths (a clone upload needs it)."""
        ...


_abort_generation = 0


def abort_running() -> None:
    """Kill every step in flight at once (a second Ctrl-C). Steps started later run normally,
    so the locks can still be released on the way out."""
    global _abort_generation
    _abort_generation += 1


class StepWatch:
    """What a running step checks while it waits: its abort flag, a second Ctrl-C
    (`abort_running`) and its timeout. `next_wait` raises when the step must end now."""

    POLL = 0.2  # seconds between checks of the abort flags

    def __init__(self, timeout: float | None, host: str, what: str,
                 abort: threading.Event | None) -> None:
        self.timeout, self.host, self.what, self.abort = timeout, host, what, abort
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.generation = _abort_generation

    def next_wait(self) -> float:
        """How long the caller may block before asking again (raises if it must stop)."""
        if self.abort is not None and self.abort.is_set():
            raise Interrupted(f"{self.what} interrupted", host=self.host)
        if _abort_generation != self.generation:
            raise Interrupted(f"{self.what} aborted", host=self.host)
        if self.deadline is None:
            return self.POLL
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HostError(f"{self.what} timed out after {self.timeout:g} s", host=self.host)
        return min(self.POLL, left)


def run_process(
    argv: Sequence[str],
    *,
    timeout: float | None,
    host: str,
    what: str,
    abort: threading.Event | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv in its own session so Ctrl-C reaches us, not the child mid-step.

    The deploy decides what an interrupt means: before the switch it sets `abort` and the
    step is killed at once (nothing live depends on it); after the switch steps run to
    their end. A child killed by the terminal's SIGINT could leave a step half-done.

    `input` is written to the child's stdin as exact bytes: the way secrets travel, since
    anything on a command line is visible to every user of the machine (`ps`).
    """
    # stdin is fed from our own pipe by a writer thread, not by communicate(): a
    # communicate() retried after a poll timeout stops sending input (CPython only
    # registers stdin for writing when input is passed again, and passing it again is an
    # error), so a large input on a slow host would never reach its end and the remote
    # side would wait for EOF forever.
    feed: int | None = None
    stdin: int = subprocess.DEVNULL
    if input is not None:
        stdin, feed = os.pipe()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except BaseException:
        if feed is not None:
            os.close(stdin)
            os.close(feed)
        raise
    if feed is not None:
        os.close(stdin)
        threading.Thread(target=_feed, args=(feed, input or b""), daemon=True).start()
    watch = StepWatch(timeout, host, what, abort)
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=watch.next_wait())
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:  # our own Interrupted/HostError above, or Ctrl-C
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, _text(out), _text(err))


def _feed(fd: int, data: bytes) -> None:
    """Write all of data to the child's stdin, then close it (EOF). A child that exits
    early (or is killed) just ends the write."""
    with contextlib.suppress(BrokenPipeError, OSError), os.fdopen(fd, "wb") as pipe:
        pipe.write(data)


def _text(data: bytes) -> str:
    """Decode like text-mode pipes did: UTF-8, bad bytes replaced, universal newlines."""
    return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


def _kill_group(proc: subprocess.Popen[Any]) -> None:
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


PARTIAL_DIR = ".switchover-partial"
# rsync exit codes that mean the link or the remote side went away, not a local mistake.
RSYNC_NETWORK_CODES = frozenset({10, 12, 30, 35, 255})
_NO_SPACE = ("no space left on device", "disk quota exceeded")


def files_from(paths: Sequence[str]) -> bytes:
    """rsync --files-from=- --from0 input: any byte but NUL may be in a name. Each path
    starts with ./: rsync skips an entry starting with # or ; as a comment, even with
    --from0; and ./ sends the tree's root itself (its mode, owner, times) as an implied
    directory, which "." would not do without copying the whole top level."""
    return b"".join(b"./" + os.fsencode(p) + b"\0" for p in paths)


def rsync_failure(rc: int, stderr: str, host: str, what: str = "upload") -> TransferError:
    """The error for a failed rsync: out of space, connection lost (retryable), or other."""
    low = stderr.lower()
    reason = Result(1, "", stderr).message
    if any(marker in low for marker in _NO_SPACE):
        line = next((ln.strip() for ln in stderr.splitlines()
                     if any(m in ln.lower() for m in _NO_SPACE)), reason)
        return DiskFull(f"{what} failed: no space left on the host ({line})", host=host)
    if rc in RSYNC_NETWORK_CODES:
        return ConnectionLost(f"connection lost during {what} (rsync exit {rc}): {reason}",
                              host=host)
    return TransferError(f"{what} failed (rsync exit {rc}): {reason}", host=host)


RSH_EXIT = "@@switchover:rsh-exit "


def unwaited_rsh(ssh: Sequence[str]) -> str:
    """An `rsync -e` command that runs `ssh` in the background of a shell that exits at once.

    rsync waits for its remote shell in steps of 20 ms (wait_process_with_flush), and ssh
    always exits a moment after rsync's first look: ~20 ms of every upload went there
    (median 62 -> 42 ms for a 3-file rsync over a master). ssh's exit status, which rsync
    would have folded into its own, comes back as a line on stderr (see rsh_status); we
    still read stderr to its end, that is until ssh has exited (so not where rsync's stderr
    goes to a file read when rsync exits: the progress path). Quoting: rsync splits the
    command on spaces and honours quotes as sh does for shlex.quote's output.
    """
    command = " ".join(shlex.quote(a) for a in ssh)
    # (The line starts with a newline: rsync's last message may not end with one.)
    script = (f'exec 3<&0; {{ {command} "$@" <&3 3<&-; r=$?; [ "$r" -eq 0 ] ||'
              f" printf '\\n%s%s\\n' {shlex.quote(RSH_EXIT)} \"$r\" >&2; }} & exit 0")
    return " ".join(shlex.quote(a) for a in ("sh", "-c", script, "sh"))


_RSH_EXIT_LINE = re.compile("\n" + re.escape(RSH_EXIT) + r"([0-9]+)\n")


def rsh_status(rc: int, stderr: str) -> tuple[int, str]:
    """rsync's exit code as it would have been with ssh its own child (see unwaited_rsh),
    and stderr without our line: rsync takes the remote shell's status when its own is 0,
    and the larger of the two when it fails (its cleanup). An rsync killed by a signal
    (ours, at a timeout or an abort) stays killed."""
    child = 0
    m = _RSH_EXIT_LINE.search(stderr)
    if m:
        child = int(m.group(1))
        stderr = stderr[:m.start()] + stderr[m.end():]
    if child and rc >= 0:
        rc = child if rc == 0 else max(rc, child)
    return rc, stderr


def rsync_args(src: Path, link_dest: str | None, exclude: Sequence[str],
               checksum: bool = True, only: bool = False) -> list[str]:
    """The rsync options shared by both transports (destination appended by the caller).

    With `only`, the paths to send come NUL-separated on stdin and are sent whatever their
    size and mtime (--ignore-times): the correction pass after a quick-check upload.
    """
    if only:
        return ["rsync", "-a", "--ignore-times", "--files-from=-", "--from0", "--stats",
                "--timeout=60", f"--partial-dir={PARTIAL_DIR}", str(src).rstrip("/") + "/"]
    args = ["rsync", "-a", "--delete", "--stats", "--timeout=60"]
    if checksum:
        # rsync's quick check (size + mtime) would hard-link the *old* copy of a file whose
        # content changed but whose size did not, whenever mtimes are pinned (reproducible
        # builds, `git archive`, SOURCE_DATE_EPOCH) or fall in one timestamp tick.
        args.insert(2, "--checksum")
    # A retried upload resumes: files already complete in the staging dir are skipped, and a
    # file cut off mid-way is kept in a partial dir (next to it, inside staging) and used as
    # the basis of the next attempt. rsync excludes the partial dir from --delete by itself.
    args.append(f"--partial-dir={PARTIAL_DIR}")
    if link_dest:
        # Unchanged files become hard links to the live release's copies: not sent, not stored.
        args.append(f"--link-dest={link_dest}")
    args += [f"--exclude={pattern}" for pattern in exclude]
    args.append(str(src).rstrip("/") + "/")
    return args
