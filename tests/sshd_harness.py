"""Throw-away fleets of real OpenSSH servers on loopback, for end-to-end tests.

``SshFleet(base_dir, n)`` starts ``n`` ``sshd -D`` processes, each on its own
loopback address (``127.0.0.11``, ``127.0.0.12``, ...) and a free port picked
at run time, all accepting one generated ed25519 client key as ``root``.  It
writes an ``ssh_config`` with one alias per host (``web1``, ``web2``, ...), so
``ssh -F fleet.ssh_config web1 CMD`` and ``rsync -e fleet.rsh ... web1:PATH``
just work, with strict host-key checking against a generated known_hosts file.

Per-host filesystem
-------------------
When the kernel lets us (root + mount/PID namespaces, which is the case in the
CI sandbox), every sshd runs in its own mount and PID namespace::

    unshare --mount --propagation private --pid --fork --kill-child \\
        sh -c 'mount --bind <host.root> <remote_root> && exec sshd -D ...'

so every host sees *its own* directory at the *same* absolute path
``fleet.remote_root`` (``/srv/swo-test-XXXXXXXX``, unique per fleet), exactly
like a real fleet, and ``shared_path`` is True.  ``host.root`` is the local
directory that backs it; the test process (which is outside the namespaces)
reads and writes host files there.  Only ``remote_root`` is per host: every
other path (``/tmp``, ``/root``, ...) is the one shared filesystem.

Never delete and re-create ``host.root`` itself (the bind mount would keep
pointing at the deleted directory); empty it instead (``fleet.wipe_roots()``).

If namespaces are unavailable the fleet falls back to ``shared_path = False``:
each host's ``remote_root`` is then simply its ``root`` (distinct per host) and
``fleet.remote_root`` is None.  Tests needing one path for the whole fleet
should skip in that case.  ``SshFleet(..., isolate=False)`` forces the fallback.

Process hygiene
---------------
The PID namespace makes cleanup airtight: sshd is the namespace's init, so
killing it kills every per-connection sshd and remote shell with it.  stop()
also walks /proc and SIGKILLs every descendant (the only mechanism in the
fallback mode), the ``unshare`` wrapper is started with PR_SET_PDEATHSIG so the
servers die with the test process even on SIGKILL, and an atexit hook stops any
fleet still running.  Only if the test process is SIGKILLed do leftovers remain:
the empty ``/srv/swo-test-*`` mountpoint and, with ``quickack=True``, the
``127.0.0.X/32`` routes (both harmless; no process survives).

Speed (measured in the sandbox, OpenSSH 9.2)
--------------------------------------------
A fresh connection running ``true`` costs ~140 ms; ~60 ms with
``quickack=True``; a command over an existing ControlMaster ~10 ms.  The
quickack option adds ``ip route add local 127.0.0.X/32 dev lo table local
quickack 1`` for each fleet address while the fleet runs (it removes two 40 ms
Nagle/delayed-ACK stalls from every handshake).  It changes the routing table,
so it is opt-in (``SWITCHOVER_TEST_QUICKACK=1`` in conftest.py).
For multiplexing use ``-o ControlPath={fleet.control_dir}/%C``: the directory
is short enough for the 108-byte socket path limit.

Remote environment
------------------
Each sshd sets ``HOME`` to a per-host empty directory (``SetEnv HOME=...``) so
that bash does not source root's real ~/.bashrc (pyenv init there costs
~140 ms per remote command in the sandbox).  The working directory of a session is still ``/root``
(sshd chdirs to the passwd home) and ``PATH`` is sshd's default
(``/usr/local/bin:/usr/bin:/bin:/usr/games``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SSH = "ssh"
SSH_KEYGEN = "ssh-keygen"
UNSHARE = "unshare"

START_TIMEOUT = 10.0  # seconds to wait for an sshd to accept connections
STOP_TIMEOUT = 10.0  # seconds to wait for an sshd (and its children) to die
COMMAND_TIMEOUT = 30.0  # default timeout for helper ssh/keygen commands

DEFAULT_FIRST_OCTET = 11
ACCEPTED_MARKER = "Accepted publickey"

_PR_SET_PDEATHSIG = 1
_BIND_FAILURE_MARKERS = ("Bind to port", "Cannot bind any address", "Address already in use")


class HarnessError(RuntimeError):
    """The harness could not set up or tear down the fleet."""


def sshd_available() -> bool:
    """True if the OpenSSH server and client tools needed by the harness exist."""
    return (
        os.access(SSHD, os.X_OK)
        and shutil.which(SSH) is not None
        and shutil.which(SSH_KEYGEN) is not None
    )


# ---------------------------------------------------------------------------
# Host objects
# ---------------------------------------------------------------------------


@dataclass
class SshHost:
    """One sshd of a fleet.  Attributes are plain values; methods live on the fleet."""

    alias: str  # ssh_config alias, e.g. "web1" -- use it as the ssh/rsync host name
    address: str  # loopback address sshd listens on, e.g. "127.0.0.11"
    port: int  # TCP port sshd listens on (picked at run time)
    user: str  # login user ("root")
    root: Path  # local directory backing the host's view of remote_root
    remote_root: str  # the same directory as seen over ssh on this host
    home: Path  # $HOME of remote sessions on this host (empty dir)
    log_path: Path  # sshd log (LogLevel VERBOSE), appended to by sshd -E
    sshd_config: Path  # this host's sshd_config
    host_key: Path  # private host key (public key is host_key + ".pub")
    authorized_keys: Path  # AuthorizedKeysFile used by this sshd
    _state_dir: Path = field(repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _stderr: object | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the process the harness started (the unshare wrapper or sshd)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def target(self) -> str:
        """``user@alias``, for tools that want an explicit user."""
        return f"{self.user}@{self.alias}"

    def local_path(self, remote_path: str) -> Path:
        """Map a path on this host (at or under remote_root) to the local file backing it.

        Use it for absolute symlink targets written remotely: locally they point
        into ``remote_root``, which the test process does not see.
        """
        rel = os.path.relpath(os.path.normpath(remote_path), self.remote_root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise ValueError(f"{remote_path!r} is not under {self.remote_root!r}")
        return self.root if rel == os.curdir else self.root / rel

    def connection_count(self) -> int:
        """Number of successful logins recorded in this host's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count(ACCEPTED_MARKER)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# ---------------------------------------------------------------------------
# The fleet
# ---------------------------------------------------------------------------


class SshFleet:
    """N real sshd processes on loopback.  Use as a context manager or start()/stop().

    Fleet-level attributes (valid after construction; the files exist after start()):

    - ``hosts``: list[SshHost], in alias order; ``fleet["web1"]`` / ``fleet.host("web1")``
    - ``aliases``: list[str]
    - ``ssh_config``, ``identity_file``, ``known_hosts``: Path
    - ``shared_path``: bool -- every host sees its own tree at ``remote_root``
    - ``remote_root``: str | None -- the common per-host path (None if not shared_path)
    - ``ssh_command``: list[str] -- ``["ssh", "-F", <ssh_config>]``
    - ``rsh``: str -- the same as one shell word string, for ``rsync -e``
    - ``control_dir``: Path | None -- short directory for ControlPath sockets
    - ``base_dir``: Path -- everything the fleet writes lives under it

    ``isolate``: None = use mount/PID namespaces if they work, False = never.
    ``first_octet``: first X of 127.0.0.X (default: a fresh block per fleet).
    ``quickack``: add quickack loopback routes while running (faster, see above).
    """

    def __init__(
        self,
        base_dir: os.PathLike[str] | str,
        count: int = 3,
        *,
        names: Sequence[str] | None = None,
        first_octet: int | None = None,
        isolate: bool | None = None,
        quickack: bool = False,
        mount_parent: os.PathLike[str] | str = "/srv",
        user: str = "root",
        sshd_options: Sequence[str] = (),
    ) -> None:
        if names is None:
            names = [f"web{i + 1}" for i in range(count)]
        if len(names) != count or len(set(names)) != count:
            raise ValueError("names must be `count` distinct aliases")
        if first_octet is None:
            first_octet = _allocate_octets(count)
        if not 2 <= first_octet <= 255 - count:
            raise ValueError("first_octet out of range for 127.0.0.X")
        self.base_dir = Path(base_dir).resolve()
        self.count = count
        self.user = user
        self._first_octet = first_octet
        self._isolate_request = isolate
        self._quickack = quickack
        self._routes: list[str] = []  # quickack routes we added (and must delete)
        self._mount_parent = Path(mount_parent)
        self._names = list(names)
        self._sshd_options = list(sshd_options)  # sshd_config lines; they win over ours

        client_dir = self.base_dir / "client"
        self.identity_file: Path = client_dir / "id_ed25519"
        self.known_hosts: Path = client_dir / "known_hosts"
        self.ssh_config: Path = client_dir / "ssh_config"
        self.hosts: list[SshHost] = []
        self.shared_path: bool = False
        self.remote_root: str | None = None
        # Short directory for ControlPath sockets (sun_path is limited to 108 bytes).
        self.control_dir: Path | None = None
        self._mountpoint: Path | None = None
        self._started = False

    # -- context manager -------------------------------------------------

    def __enter__(self) -> SshFleet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lookup ------------------------------------------------------------

    @property
    def aliases(self) -> list[str]:
        return [h.alias for h in self.hosts]

    def host(self, alias: str) -> SshHost:
        for h in self.hosts:
            if h.alias == alias:
                return h
        raise KeyError(alias)

    __getitem__ = host

    def __iter__(self) -> Iterator[SshHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    # -- client helpers ----------------------------------------------------

    @property
    def ssh_command(self) -> list[str]:
        """argv prefix for the ssh client: ``["ssh", "-F", <ssh_config>]``."""
        return [SSH, "-F", str(self.ssh_config)]

    @property
    def rsh(self) -> str:
        """Remote shell string for ``rsync -e`` (``ssh -F <ssh_config>``)."""
        return shlex.join(self.ssh_command)

    def ssh(
        self,
        alias: str,
        command: str,
        *,
        timeout: float = COMMAND_TIMEOUT,
        check: bool = False,
        options: Sequence[str] = (),
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on ``alias`` through the real ssh client; returns text output."""
        argv = [*self.ssh_command, *options, alias, command]
        return subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL if input is None else None,
        )

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> SshFleet:
        if self._started:
            return self
        if not sshd_available():
            raise HarnessError(f"{SSHD}, {SSH} or {SSH_KEYGEN} not available")
        self._started = True
        _LIVE_FLEETS.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.hosts = []
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd privsep dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.identity_file.parent.mkdir(parents=True, exist_ok=True)
        _keygen(self.identity_file, comment=f"switchover-test-client@{self.base_dir.name}")
        # ControlPath sockets: "<control_dir>/%C" must fit in sun_path (108 bytes).
        control_dir = self.base_dir / "cm"
        if len(str(control_dir)) + 41 <= 100:
            control_dir.mkdir(exist_ok=True)
            self.control_dir = control_dir
        else:
            self.control_dir = Path(tempfile.mkdtemp(prefix="swo-cm-", dir="/tmp"))

        isolate = self._isolate_request
        if isolate is None:
            isolate = namespaces_supported()
        if isolate:
            self._mount_parent.mkdir(parents=True, exist_ok=True)
            self._mountpoint = Path(tempfile.mkdtemp(prefix="swo-test-", dir=self._mount_parent))
            self.shared_path = True
            self.remote_root = str(self._mountpoint)
        else:
            self.shared_path = False
            self.remote_root = None

        pubkey = self.identity_file.with_name(self.identity_file.name + ".pub").read_text()
        for i, alias in enumerate(self._names):
            state = self.base_dir / "hosts" / alias
            root = state / "root"
            home = state / "home"
            for d in (state, root, home):
                d.mkdir(parents=True, exist_ok=True)
            host = SshHost(
                alias=alias,
                address=f"127.0.0.{self._first_octet + i}",
                port=0,
                user=self.user,
                root=root,
                remote_root=self.remote_root if self.shared_path else str(root),
                home=home,
                log_path=state / "sshd.log",
                sshd_config=state / "sshd_config",
                host_key=state / "ssh_host_ed25519_key",
                authorized_keys=state / "authorized_keys",
                _state_dir=state,
            )
            _keygen(host.host_key, comment=f"{alias}-hostkey")
            host.authorized_keys.write_text(pubkey)
            self.hosts.append(host)
            self._launch(host, keep_port=False)

        self._write_client_files()
        if self._quickack:
            self._add_quickack_routes()

    def stop(self) -> None:
        """Kill every sshd (and all their children), remove the mountpoint.  Idempotent."""
        errors: list[str] = []
        for host in self.hosts:
            try:
                self._kill(host)
            except Exception as exc:  # keep going: never leave the others running
                errors.append(f"{host.alias}: {exc}")
        for route in reversed(self._routes):
            with contextlib.suppress(Exception):
                _ip_route("del", route)
        self._routes.clear()
        if self.control_dir is not None and not self.control_dir.is_relative_to(self.base_dir):
            shutil.rmtree(self.control_dir, ignore_errors=True)
        if self._mountpoint is not None:
            # The bind mounts live only in the (now dead) namespaces, so the
            # directory is empty here.  rmdir, never rmtree: if anything is in it,
            # it is not ours.
            try:
                self._mountpoint.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"rmdir {self._mountpoint}: {exc}")
            self._mountpoint = None
        self._started = False
        _LIVE_FLEETS.discard(self)
        if errors:
            raise HarnessError("; ".join(errors))

    # -- per-host control ----------------------------------------------------

    def stop_host(self, alias: str) -> None:
        """Kill one host's sshd and all its sessions; its port then refuses connections."""
        self._kill(self.host(alias))

    def start_host(self, alias: str) -> None:
        """(Re)start one host's sshd on the same address and port."""
        host = self.host(alias)
        if host.running:
            return
        self._launch(host, keep_port=True)

    def kill_sessions(self, alias: str) -> int:
        """SIGKILL every open connection to ``alias`` (its per-connection sshd
        processes and the remote commands under them); the listener keeps running,
        so new connections work.  Simulates a dropped link.  Returns #processes killed.
        """
        host = self.host(alias)
        proc = host._proc
        if proc is None or proc.poll() is not None:
            return 0
        pids = _descendants(proc.pid)
        if self.shared_path:
            pids = pids[1:]  # pids[0] is sshd itself (init of the PID namespace)
        _signal(pids, signal.SIGKILL)
        _wait_dead(pids, STOP_TIMEOUT)
        return len(pids)

    @contextlib.contextmanager
    def host_down(self, *aliases: str) -> Iterator[None]:
        """Context manager: the given hosts are unreachable inside the block."""
        for a in aliases:
            self.stop_host(a)
        try:
            yield
        finally:
            for a in aliases:
                self.start_host(a)

    def ensure_running(self) -> None:
        """Restart any host that is not running (e.g. after a failed test)."""
        for h in self.hosts:
            if not h.running:
                self._launch(h, keep_port=True)

    def wipe_roots(self) -> None:
        """Empty every host's root (keeps the directories: they are mount sources)."""
        for h in self.hosts:
            for child in h.root.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()

    # -- logs ------------------------------------------------------------------

    def wait_sessions_ended(self, alias: str, seconds: float = 10.0) -> None:
        """Wait (bounded) until ``alias``'s sshd has no connection open (no per-connection
        sshd process): a login that was in flight is in the log, or never will be, once
        this returns. Commands left running by other tests' dead clients, and detached
        background work, are not connections and do not count. Needs the per-host PID
        namespace."""
        host = self.host(alias)
        proc = host._proc
        assert self.shared_path and proc is not None

        def sessions() -> list[int]:
            found = []
            for pid in _descendants(proc.pid)[1:]:  # [0] is the listener (namespace init)
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd":
                        found.append(pid)
            return found

        deadline = time.monotonic() + seconds
        while open_ := sessions():
            if time.monotonic() > deadline:
                tree = {p: _cmdline(p) for p in _descendants(proc.pid)}
                raise AssertionError(f"{alias}: connections still open: {open_}; {tree}")
            time.sleep(0.02)

    def connection_count(self, alias: str) -> int:
        """Successful logins ("Accepted publickey" log lines) on ``alias`` since the last reset."""
        return self.host(alias).connection_count()

    def connection_counts(self) -> dict[str, int]:
        """Snapshot of connection_count for every host (use as a baseline)."""
        return {h.alias: h.connection_count() for h in self.hosts}

    def reset_logs(self) -> None:
        """Truncate every host log (sshd appends with O_APPEND, so this is safe live)."""
        for h in self.hosts:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(h.log_path, 0)

    # -- internals ---------------------------------------------------------------

    def _add_quickack_routes(self) -> None:
        """Disable delayed ACKs towards the fleet's addresses (opt-in, see SshFleet docs).

        sshd does not set TCP_NODELAY before authentication, so Nagle on its side
        plus the client's 40 ms delayed ACK stalls every handshake twice.  A
        ``quickack 1`` host route per fleet address removes both stalls (~145 ms
        -> ~60 ms per fresh connection here).  Routes that already exist (another
        run) are left alone; the ones we add are deleted by stop().
        """
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return
        for h in self.hosts:
            route = f"{h.address}/32"
            if _ip_route("add", route):
                self._routes.append(route)

    def _write_client_files(self) -> None:
        kh_lines = []
        cfg_lines = [
            "# Generated by tests/sshd_harness.py -- one alias per test sshd.",
            "# Settings live in the Host blocks only, so `ssh -o ...` overrides them.",
            "",
        ]
        for h in self.hosts:
            hostkey_pub = Path(str(h.host_key) + ".pub").read_text().split()
            kh_lines.append(f"[{h.address}]:{h.port} {hostkey_pub[0]} {hostkey_pub[1]}")
            cfg_lines += [
                f"Host {h.alias}",
                f"    HostName {h.address}",
                f"    Port {h.port}",
                f"    User {h.user}",
                f"    IdentityFile {_q(self.identity_file)}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {_q(self.known_hosts)}",
                "    GlobalKnownHostsFile /dev/null",
                "    StrictHostKeyChecking yes",
                "    BatchMode yes",
                "    ConnectTimeout 10",
                "",
            ]
        self.known_hosts.write_text("\n".join(kh_lines) + "\n")
        self.ssh_config.write_text("\n".join(cfg_lines))
        self.ssh_config.chmod(0o600)  # ssh refuses group/world-writable configs

    def _write_sshd_config(self, host: SshHost) -> None:
        pidfile = host._state_dir / "sshd.pid"
        lines = [
            *self._sshd_options,  # sshd keeps the first value it reads for a keyword
            f"Port {host.port}",
            f"ListenAddress {host.address}",
            f"HostKey {_q(host.host_key)}",
            f"PidFile {_q(pidfile)}",  # inside the PID namespace this holds "1"
            f"AuthorizedKeysFile {_q(host.authorized_keys)}",
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin yes",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitUserEnvironment no",
            f"SetEnv {_q(f'HOME={host.home}')}",
            "KexAlgorithms curve25519-sha256",
            "LogLevel VERBOSE",
            "MaxSessions 50",
            "MaxStartups 100",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "Subsystem sftp internal-sftp",
            "",
        ]
        host.sshd_config.write_text("\n".join(lines))

    def _argv(self, host: SshHost) -> list[str]:
        sshd = [SSHD, "-D", "-f", str(host.sshd_config), "-E", str(host.log_path)]
        if not self.shared_path:
            return sshd
        assert self.remote_root is not None
        script = (
            f"mount --bind {shlex.quote(str(host.root))} {shlex.quote(self.remote_root)}"
            f" && exec {shlex.join(sshd)}"
        )
        return [
            UNSHARE, "--mount", "--propagation", "private",
            "--pid", "--fork", "--kill-child",
            "sh", "-c", script,
        ]  # fmt: skip

    def _launch(self, host: SshHost, *, keep_port: bool) -> None:
        if host._proc is not None:  # died on its own: reap it, close its files
            self._kill(host, wait_port=False)
        attempts = 1 if keep_port else 5
        last_error = ""
        for _ in range(attempts):
            if not keep_port:
                host.port = _free_port(host.address)
            self._write_sshd_config(host)
            stderr_path = host._state_dir / "sshd.stderr"
            stderr = open(stderr_path, "ab")  # noqa: SIM115 -- closed in _kill
            main_thread = threading.current_thread() is threading.main_thread()
            try:
                proc = subprocess.Popen(
                    self._argv(host),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,
                    # PDEATHSIG fires when the *thread* that forked dies, so only
                    # arm it when started from the main thread.
                    preexec_fn=_die_with_parent if main_thread else None,
                )
            except BaseException:
                stderr.close()
                raise
            host._proc, host._stderr = proc, stderr
            ok, last_error = _wait_ready(proc, host.address, host.port, START_TIMEOUT)
            if ok:
                return
            diag = _tail(stderr_path) + _tail(host.log_path)
            self._kill(host, wait_port=False)  # the port may be someone else's
            last_error = f"{last_error}\n{diag}".strip()
            if not any(m in diag for m in _BIND_FAILURE_MARKERS):
                break
        raise HarnessError(
            f"sshd for {host.alias} ({host.address}:{host.port}) did not start: {last_error}"
        )

    def _kill(self, host: SshHost, *, wait_port: bool = True) -> None:
        proc = host._proc
        if proc is None:
            return
        try:
            _kill_tree(proc, wrapper=self.shared_path)
            if wait_port:
                _wait_refused(host.address, host.port, STOP_TIMEOUT)
        finally:
            host._proc = None
            if host._stderr is not None:
                host._stderr.close()  # type: ignore[attr-defined]
                host._stderr = None


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_NAMESPACES_OK: bool | None = None
_NEXT_OCTET = DEFAULT_FIRST_OCTET
_OCTET_LOCK = threading.Lock()


def _allocate_octets(count: int) -> int:
    """Give each fleet of this process its own block of 127.0.0.X addresses."""
    global _NEXT_OCTET
    with _OCTET_LOCK:
        if _NEXT_OCTET + count > 250:
            _NEXT_OCTET = DEFAULT_FIRST_OCTET
        first = _NEXT_OCTET
        _NEXT_OCTET += count
        return first


def _ip_route(action: str, prefix: str) -> bool:
    argv = ["ip", "route", action, "local", prefix, "dev", "lo", "table", "local"]
    if action == "add":
        argv += ["quickack", "1"]
    try:
        res = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def namespaces_supported() -> bool:
    """Probe (once per process) whether unshare + private bind mounts work here."""
    global _NAMESPACES_OK
    if _NAMESPACES_OK is None:
        _NAMESPACES_OK = _probe_namespaces()
    return _NAMESPACES_OK


def _probe_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which(UNSHARE) is None:
        return False
    with tempfile.TemporaryDirectory(prefix="swo-nsprobe-") as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        src.mkdir()
        dst.mkdir()
        (src / "marker").write_text("ok")
        script = (
            f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}"
            f" && cat {shlex.quote(str(dst / 'marker'))}"
        )
        try:
            res = subprocess.run(
                [UNSHARE, "--mount", "--propagation", "private", "--pid", "--fork",
                 "--kill-child", "sh", "-c", script],
                capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return False
        # The mount must have been private: not visible out here.
        return res.returncode == 0 and res.stdout == "ok" and not (dst / "marker").exists()


def _q(path: os.PathLike[str] | str) -> str:
    """Quote a path for ssh_config / sshd_config."""
    s = str(path)
    if any(c in s for c in ' \t"'):
        if '"' in s:
            raise HarnessError(f"unsupported path for ssh config: {s!r}")
        return f'"{s}"'
    return s


def _keygen(path: Path, *, comment: str) -> None:
    for p in (path, Path(str(path) + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
    )


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_ready(
    proc: subprocess.Popen[bytes], address: str, port: int, timeout: float
) -> tuple[bool, str]:
    """Wait until sshd sends its banner on (address, port)."""
    deadline = time.monotonic() + timeout
    last = "timed out"
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            return False, f"exited with status {rc}"
        try:
            with socket.create_connection((address, port), timeout=1.0) as s:
                s.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                if s.recv(64).startswith(b"SSH-"):
                    return True, ""
        except OSError as exc:
            last = str(exc)
        time.sleep(0.02)
    return False, f"not accepting connections after {timeout:.0f}s ({last})"


def _wait_refused(address: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                pass
        except OSError:
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"{address}:{port} still accepts connections after stop")
        time.sleep(0.02)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process, from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 2:
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return "(gone)"


def _descendants(pid: int) -> list[int]:
    """All live descendants of pid, parents before children."""
    children: dict[int, list[int]] = {}
    for p, (ppid, _state) in _proc_table().items():
        children.setdefault(ppid, []).append(p)
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            out.append(c)
            todo.append(c)
    return out


def _signal(pids: Sequence[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _kill_tree(proc: subprocess.Popen[bytes], *, wrapper: bool) -> None:
    """SIGKILL every descendant of proc, then proc; wait until all of them are gone.

    ``wrapper``: proc is the ``unshare`` wrapper, which reaps its child (sshd)
    and exits by itself once that child is dead, so nothing becomes an orphan.
    (util-linux 2.38 then prints "unshare: sigprocmask unblock failed: Invalid
    argument" to sshd.stderr: harmless.)
    """
    pids: list[int] = []
    if proc.poll() is None:
        # Freeze the tree so nothing forks or reparents while we collect it.
        _signal([proc.pid], signal.SIGSTOP)
        pids = _descendants(proc.pid)
        _signal(pids, signal.SIGSTOP)
        pids = list(dict.fromkeys(pids + _descendants(proc.pid)))
        # In the PID-namespace mode the first descendant is sshd, the namespace
        # init: killing it makes the kernel kill everything else in there too.
        _signal(pids, signal.SIGKILL)
        if wrapper:
            _signal([proc.pid], signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2.0)
        if proc.poll() is None:
            _signal([proc.pid], signal.SIGKILL)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"pid {proc.pid} did not die") from exc
    _wait_dead(pids, STOP_TIMEOUT)


def _wait_dead(pids: Sequence[int], timeout: float) -> None:
    """Wait until none of pids is alive (zombies count as dead)."""
    deadline = time.monotonic() + timeout
    while True:
        table = _proc_table()
        alive = [p for p in pids if p in table and table[p][1] not in ("Z", "X")]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"processes still alive after SIGKILL: {alive}")
        time.sleep(0.01)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""


# Fleets that are started and not yet stopped: stopped at interpreter exit.
_LIVE_FLEETS: set[SshFleet] = set()


@atexit.register
def _stop_live_fleets() -> None:
    for fleet in list(_LIVE_FLEETS):
        with contextlib.suppress(Exception):
            fleet.stop()
