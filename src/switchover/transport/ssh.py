"""Run on a host over the OpenSSH client, one multiplexed connection per host.

The first step opens a ControlMaster; every later command and the rsync upload ride on it,
so a deploy costs one TCP connection and one authentication per host.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from switchover.errors import ConnectionLost, DiskFull, HostError, Interrupted
from switchover.hosts import HostSpec
from switchover.transport.base import (
    Result,
    StepWatch,
    SyncStats,
    _kill_group,
    _text,
    parse_rsync_stats,
    rsh_status,
    rsync_args,
    rsync_failure,
    run_process,
    unwaited_rsh,
)
from switchover.transport.mux import (
    MuxUnavailable,
    master_socket,
    run_session,
    terminate_master,
)
from switchover.transport.progress import (
    ProgressCallback,
    run_rsync,
)

if TYPE_CHECKING:
    from switchover.treediff import TreeDiff

SSH_CONNECTION_FAILED = 255


@dataclass(frozen=True)
class SshOptions:
    ssh_config: Path | None = None
    identity_file: Path | None = None
    connect_timeout: int = 10
    # A dropped link must not hang a deploy forever: 3 missed keepalives 5 s apart end it.
    alive_interval: int = 5
    alive_count: int = 3
    persist: int = 120


def describe_ssh_failure(stderr: str) -> str:
    """Turn OpenSSH's stderr into a reason an operator can act on."""
    text = stderr.strip()
    low = text.lower()
    if "remote host identification has changed" in low:
        return "the host key has CHANGED (possible man-in-the-middle, or a rebuilt host): " \
            "check it and update known_hosts"
    if "host key verification failed" in low or "no ed25519 host key is known" in low or (
        "host key for" in low and "not known" in low
    ):
        return "host key verification failed: the host key is unknown or does not match " \
            "known_hosts (add it with ssh-keyscan after checking its fingerprint)"
    if "permission denied" in low:
        return "authentication failed (permission denied): check the user and key"
    if "could not resolve hostname" in low:
        return "could not resolve the host name"
    if "connection refused" in low:
        return "connection refused (is sshd running, is the port right?)"
    if "timed out" in low:
        return "connection timed out"
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Warning:")]
    return lines[-1] if lines else "ssh failed"


class SshTransport:
    def __init__(self, host: HostSpec, options: SshOptions) -> None:
        self.host = host
        self.options = options
        # Short path: a ControlPath socket must fit in sun_path (108 bytes).
        self._control_dir = tempfile.mkdtemp(prefix="swo-", dir="/tmp")
        self._connected = False
        self._deferred = False  # connect() asked for; the first command opens the master
        self._opening: _Opening | None = None  # a master being opened in the background
        self._cap_first = False  # the next command is the first over an early master
        self._closed = False
        self._lock = threading.Lock()  # _opening: the waiting command vs close()
        self.abort: threading.Event | None = None

    def _base_args(self) -> list[str]:
        o = self.options
        args = ["ssh"]
        if o.ssh_config:
            args += ["-F", str(o.ssh_config)]
        if o.identity_file:
            args += ["-i", str(o.identity_file), "-o", "IdentitiesOnly=yes"]
        if self.host.port:
            args += ["-p", str(self.host.port)]
        # Host keys are left to OpenSSH's own checking (and the user's ssh_config): BatchMode
        # turns "ask" into a refusal, so an unknown or changed key is never silently accepted.
        args += [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={o.connect_timeout}",
            "-o", f"ServerAliveInterval={o.alive_interval}",
            "-o", f"ServerAliveCountMax={o.alive_count}",
            "-o", f"ControlPath={self._control_dir}/%C",
        ]
        return args

    def _command_args(self) -> list[str]:
        # ControlMaster=no: use the master if it is there, else connect directly.
        return [*self._base_args(), "-o", "ControlMaster=no"]

    def connect(self) -> None:
        """Get ready to connect. The master connection is opened by the first command
        (see `run`): that saves an ssh process and a round trip per host. Connection
        errors (refused, host key, auth) surface there as HostError, as they would here."""
        if not self._connected:
            self._deferred = True

    def open_early(self) -> None:
        """Start opening the master connection in the background and return at once: the
        TCP and key exchange and the login overlap local work (the artifact scan). The
        first command waits for it, bounded like the first command that opens a master
        (see `run`), and reports its failure the same way."""
        self._begin_opening(FIRST_COMMAND_LIMIT, early=True)

    def _begin_opening(self, login_limit: float, early: bool) -> None:
        with self._lock:
            if self._closed:
                raise Interrupted("the connection was closed", host=self.host.name)
            if not self._connected and self._opening is None:
                self._opening = self._start_master(login_limit, early)

    def _start_master(self, login_limit: float, early: bool) -> _Opening:
        """`ssh -M -N -f`: it goes to the background once logged in; its exit says how."""
        deadline = time.monotonic() + self.options.connect_timeout + login_limit
        # The forked master keeps the stderr it was given: a file, not a pipe, or a read
        # would wait for the master to exit.
        err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by _end_opening)
        try:
            proc = subprocess.Popen(
                [*self._base_args(), "-o", "ControlMaster=yes",
                 "-o", f"ControlPersist={self.options.persist}",
                 "-f", "-N", "--", self.host.destination],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )
        except OSError as e:  # no ssh here, or no process to spare: this host's failure
            err.close()
            return _Opening(None, None, deadline, early, f"cannot run ssh: {e.strerror or e}")
        except BaseException:
            err.close()
            raise
        return _Opening(proc, err, deadline, early)

    def _finish_opening(self) -> None:
        """Wait for the master `open_early` started. Cut off by its deadline, an abort or a
        second Ctrl-C, as a command would be; a transport closed meanwhile runs nothing."""
        opening = self._opening
        if opening is None:
            return
        proc = opening.proc
        try:
            if proc is not None:
                watch = StepWatch(max(0.0, opening.deadline - time.monotonic()),
                                  self.host.name, "connecting", self.abort)
                while not _exited(proc, watch.next_wait()):
                    pass
        except HostError:
            self._end_opening(opening)
            raise HostError("could not connect: timed out", host=self.host.name) from None
        except BaseException:
            self._end_opening(opening)
            raise
        stderr = self._end_opening(opening)
        if self._closed:
            raise Interrupted("connecting interrupted: the connection was closed",
                              host=self.host.name)
        if opening.failure is not None:
            raise HostError(f"could not connect: {opening.failure}", host=self.host.name)
        if proc is not None and proc.returncode != 0:
            raise HostError(f"could not connect: {describe_ssh_failure(stderr)}",
                            host=self.host.name)
        # Logged in, but the master may be gone since (idle longer than ControlPersist
        # while the artifact was unpacked): then the first command opens one, as usual.
        if self._connected and opening.early:
            self._cap_first = True

    def _end_opening(self, opening: _Opening) -> str:
        """Stop a login still in progress, note a master that is up, return ssh's stderr.
        Called by the waiting command and by close(), whichever comes first."""
        with self._lock:
            if self._opening is not opening:
                return ""
            self._opening = None
            if opening.proc is not None and opening.proc.poll() is None:
                _kill_group(opening.proc)  # still logging in: ssh has not gone to the background
            # The master creates its socket before it forks: if it is there, it is ours.
            self._connected = self._connected or bool(os.listdir(self._control_dir))
            if opening.err is None:
                return ""
            with opening.err:
                opening.err.seek(0)
                return opening.err.read()

    def _ensure_master(self) -> None:
        if self._opening is not None:
            self._finish_opening()
        if self._deferred and not self._connected:
            self._open_master()

    def _open_master(self) -> None:
        self._begin_opening(5.0, early=False)
        self._finish_opening()

    def reconnect(self) -> None:
        """Make sure a master connection is up again after the link dropped."""
        if self._connected:
            check = subprocess.call(
                [*self._base_args(), "-O", "check", "--", self.host.destination],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=10,
            )
            if check == 0:
                return
            self._connected = False
        self._open_master()

    def run(self, script: str, *, timeout: float | None = None,
            input: bytes | None = None) -> Result:
        # The remote login shell parses this one string; the script itself is one quoted word.
        # `input` goes over the channel as the script's stdin, never into argv.
        command = "sh -c " + shlex.quote(script)
        if self._closed:  # a worker still going after the deploy ended (second Ctrl-C)
            raise Interrupted("the connection was closed", host=self.host.name)
        if self._opening is not None:
            self._finish_opening()
        if self._deferred and not self._connected:
            return self._run_as_master(command, timeout, input)
        if self._cap_first:
            # The first command after an early login: a host that logs in but hangs opening
            # a session (PAM, a dead home directory) is cut off as `_run_as_master` would.
            self._cap_first = False
            timeout = min(timeout or FIRST_COMMAND_LIMIT, FIRST_COMMAND_LIMIT)
        if self._connected:
            with contextlib.suppress(MuxUnavailable):
                return self._run_over_master(command, timeout, input)
        if self._closed:  # closed while this command waited for the master
            raise Interrupted("the connection was closed", host=self.host.name)
        argv = [*self._command_args(), "--", self.host.destination, command]
        cp = run_process(argv, timeout=timeout, host=self.host.name, what="remote command",
                         abort=self.abort, input=input)
        if cp.returncode == SSH_CONNECTION_FAILED:
            raise ConnectionLost(
                f"connection lost or refused: {describe_ssh_failure(cp.stderr)}",
                host=self.host.name,
            )
        return Result(cp.returncode, cp.stdout, cp.stderr)

    def _run_over_master(self, command: str, timeout: float | None,
                         input: bytes | None) -> Result:
        """Run over our master's socket, without an `ssh` process (see mux.py)."""
        watch = StepWatch(timeout, self.host.name, "remote command", self.abort)
        rc, out, err = run_session(master_socket(self._control_dir), command, watch=watch,
                                   input=input)
        if rc is None:  # what `ssh` reports as exit 255
            raise ConnectionLost("connection lost: the session ended without an exit status",
                                 host=self.host.name)
        return Result(rc, _text(out), _text(err))

    def _run_as_master(self, command: str, timeout: float | None,
                       input: bytes | None) -> Result:
        """Open the master connection with its first command: ssh runs the command in the
        master's own session and, ControlPersist set, stays on in the background after it,
        its stdio on /dev/null (so our pipes still end)."""
        argv = [
            *self._base_args(),
            "-o", "ControlMaster=yes",
            "-o", f"ControlPersist={self.options.persist}",
            "--", self.host.destination, command,
        ]
        # Connecting (TCP, banner: ConnectTimeout; key exchange, login) plus the command,
        # whose first run is a short state read: a host that hangs in login is cut off
        # within FIRST_COMMAND_LIMIT, not after the whole step timeout.
        limit = self.options.connect_timeout + min(timeout or FIRST_COMMAND_LIMIT,
                                                   FIRST_COMMAND_LIMIT)
        try:
            cp = run_process(argv, timeout=limit, host=self.host.name, what="remote command",
                             abort=self.abort, input=input)
        finally:
            if os.listdir(self._control_dir):  # the master's socket: it is up (and ours)
                self._connected, self._deferred = True, False
        if cp.returncode == SSH_CONNECTION_FAILED:
            if not self._connected:
                raise HostError(f"could not connect: {describe_ssh_failure(cp.stderr)}",
                                host=self.host.name)
            raise ConnectionLost(
                f"connection lost: {describe_ssh_failure(cp.stderr)}", host=self.host.name)
        return Result(cp.returncode, cp.stdout, cp.stderr)

    def rsh(self) -> str:
        """The ssh command line rsync should use, as one string for `rsync -e`."""
        return " ".join(shlex.quote(a) for a in self._command_args())

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
        self._ensure_master()  # rsync runs over it; it cannot open it itself
        # -s (protect args): the remote path reaches rsync verbatim, not re-split by a shell.
        # With progress, rsync's stderr goes to a file read as soon as rsync exits: ssh's
        # late status line would be missed there, so that rsync waits for ssh as usual.
        streamed = progress is not None and only is None
        argv = [
            *rsync_args(src, link_dest, exclude, checksum, only is not None),
            "-s",
            "-e", self.rsh() if streamed else unwaited_rsh(self._command_args()),
            f"{self.host.destination}:{dest.rstrip('/')}/",
        ]
        cp = run_rsync(argv, timeout=timeout, host=self.host.name, what='upload',
                       abort=self.abort, progress=progress, only=only)
        rc, stderr = rsh_status(cp.returncode, cp.stderr)
        if rc != 0:
            error = rsync_failure(rc, stderr, self.host.name)
            if rc == SSH_CONNECTION_FAILED and not isinstance(error, DiskFull):
                error = ConnectionLost(f"connection lost during upload (rsync exit 255): "
                                       f"{describe_ssh_failure(stderr)}", host=self.host.name)
            raise error
        return parse_rsync_stats(cp.stdout)

    def compare(
        self, src: Path, dest: str, *, exclude: Sequence[str], timeout: float | None = None
    ) -> TreeDiff:
        from switchover.treediff import rsync_compare  # imports the transports: bind late

        self._ensure_master()

        def rsync(args: list[str]) -> subprocess.CompletedProcess[str]:
            cp = run_process(["rsync", "-s", "-e", self.rsh(), *args], timeout=timeout,
                             host=self.host.name, what="compare", abort=self.abort)
            if cp.returncode == SSH_CONNECTION_FAILED:
                raise HostError(f"connection lost: {describe_ssh_failure(cp.stderr)}",
                                host=self.host.name)
            return cp

        return rsync_compare(rsync, src, f"{self.host.destination}:{dest}", exclude,
                             self.host.name)

    def can_patch(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            opening = self._opening
        if opening is not None:
            # Never waited for (the deploy stopped before its first command): stop a login
            # still in progress; a master that already forked is ended below, over its socket.
            self._end_opening(opening)
        if self._connected:
            # Asking the master over its socket costs no process; `ssh -O exit` costs one
            # ssh start per host (a 50-host deploy on 2 cores pays ~0.1 s of wall for them).
            if not terminate_master(self._control_dir):
                subprocess.call(
                    [*self._base_args(), "-O", "exit", "--", self.host.destination],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=10,
                )
            self._connected = False
        shutil.rmtree(self._control_dir, ignore_errors=True)


def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to `timeout` for proc to exit. Popen.wait(timeout) polls with sleeps of up
    to 50 ms, late by ~25 ms on average: on Linux a pidfd wakes us as the process exits."""
    if proc.poll() is not None:  # exited (and reaped: its pid may be another's by now)
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or already reaped
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        return False
    proc.wait()
    return True


@dataclass
class _Opening:
    """A master connection being opened in the background (`_start_master`)."""

    proc: subprocess.Popen[bytes] | None  # None: ssh could not be started (see failure)
    err: IO[str] | None  # its stderr, a file: the forked master keeps it open
    deadline: float  # time.monotonic() by which login must be done
    early: bool  # open_early(): the first command after it is capped (see run)
    failure: str | None = None


FIRST_COMMAND_LIMIT = 30.0  # seconds, beyond ConnectTimeout, for the master's first command
