"""Run on a host over the OpenSSH client, one multiplexed connection per host.

The first step opens a ControlMaster; every later command and the rsync upload ride on it,
so a deploy costs one TCP connection and one authentication per host.
"""

from __future__ import annotations

import contextlib
import os
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

from switchover.errors import ConnectionLost, DiskFull, HostError
from switchover.hosts import HostSpec
from switchover.transport.base import (
    Result,
    StepWatch,
    SyncStats,
    _text,
    parse_rsync_stats,
    rsync_args,
    rsync_failure,
    run_process,
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
        self._opening: _Opening | None = None  # open_early() started the master
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
        first command waits for it and reports its failure as `_open_master` would."""
        if self._connected or self._opening is not None:
            return
        # The master forks into the background (-f, after login) and keeps its stderr: give
        # it a file, not a pipe, or a read would wait for the master to exit.
        err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by _finish_opening or close)
        try:
            proc = subprocess.Popen(
                [*self._base_args(), "-o", "ControlMaster=yes",
                 "-o", f"ControlPersist={self.options.persist}",
                 "-f", "-N", "--", self.host.destination],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )
        except BaseException:
            err.close()
            raise
        self._opening = _Opening(proc, err, time.monotonic() + self.options.connect_timeout + 5)

    def _finish_opening(self) -> None:
        opening, self._opening = self._opening, None
        if opening is None:
            return
        try:
            try:
                rc = opening.proc.wait(timeout=max(0.0, opening.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                opening.proc.kill()
                opening.proc.wait()
                raise HostError("could not connect: timed out", host=self.host.name) from None
            opening.err.seek(0)
            stderr = opening.err.read()
        finally:
            opening.err.close()
        if rc != 0:
            raise HostError(
                f"could not connect: {describe_ssh_failure(stderr)}", host=self.host.name
            )
        self._connected = True

    def _ensure_master(self) -> None:
        if self._opening is not None:
            self._finish_opening()
        if self._deferred and not self._connected:
            self._open_master()

    def _open_master(self) -> None:
        if not self._connected:
            self.open_early()
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
        if self._opening is not None:
            self._finish_opening()
        if self._deferred and not self._connected:
            return self._run_as_master(command, timeout, input)
        if self._connected:
            with contextlib.suppress(MuxUnavailable):
                return self._run_over_master(command, timeout, input)
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
        argv = [
            *rsync_args(src, link_dest, exclude, checksum, only is not None),
            "-s",
            "-e", self.rsh(),
            f"{self.host.destination}:{dest.rstrip('/')}/",
        ]
        cp = run_rsync(argv, timeout=timeout, host=self.host.name, what='upload',
                       abort=self.abort, progress=progress, only=only)
        if cp.returncode != 0:
            error = rsync_failure(cp.returncode, cp.stderr, self.host.name)
            if cp.returncode == SSH_CONNECTION_FAILED and not isinstance(error, DiskFull):
                error = ConnectionLost(f"connection lost during upload (rsync exit 255): "
                                       f"{describe_ssh_failure(cp.stderr)}", host=self.host.name)
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

    def close(self) -> None:
        if self._opening is not None:
            # Never waited for (the deploy stopped before its first command): stop a login
            # still in progress; a master that already forked is ended below, over its socket.
            opening, self._opening = self._opening, None
            opening.proc.kill()
            opening.proc.wait()
            opening.err.close()
            self._connected = bool(os.listdir(self._control_dir))
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


@dataclass
class _Opening:
    """A master connection being opened in the background (`open_early`)."""

    proc: subprocess.Popen[bytes]
    err: IO[str]  # its stderr, a file: the forked master keeps it open
    deadline: float  # time.monotonic() by which login must be done


FIRST_COMMAND_LIMIT = 30.0  # seconds, beyond ConnectTimeout, for the master's first command
