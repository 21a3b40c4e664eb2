#!/usr/bin/env python3
"""Start/stop the hello server. Used as switchover's after_switch/after_rollback hook.

    python3 ctl.py restart   stop the running server (if any), start the `current` release
    python3 ctl.py stop      stop the running server
    python3 ctl.py status    exit 0 if the server is running, 3 if not

The server is started fully detached (own session, stdin from /dev/null, stdout/stderr
to logs/hello.log), so this hook returns promptly and does not hold the deploy tool's
output pipes open. The pid file lives in run/, a shared dir (DEPLOY_TO/shared/run), so
every release sees the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent  # DEPLOY_TO/releases/<id> when deployed
HOST = "127.0.0.1"
PORT = int(os.environ.get("HELLO_PORT", "8089"))
PID_FILE = HERE / "run" / "hello.pid"
TIMEOUT = 5.0  # seconds to wait for the old server to go / the new one to answer

# Talk to 127.0.0.1 directly, even if http_proxy is set in the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def target_dir() -> Path | None:
    """The release to serve: whatever DEPLOY_TO/current points to.

    Following `current` rather than using HERE makes after_rollback start the restored
    release whichever release dir the hook runs from. Outside a deploy layout
    (no releases/ parent), serve HERE. None means there is no current release.
    """
    if HERE.parent.name != "releases":
        return HERE
    current = HERE.parent.parent / "current"
    return current.resolve() if current.exists() else None


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def port_in_use() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, PORT)) == 0


def serving(release: str) -> bool:
    """True once the server for `release` (not some older one) answers /version."""
    try:
        with _opener.open(f"http://{HOST}:{PORT}/version", timeout=0.5) as resp:
            return resp.read().decode().strip() == release
    except OSError:
        return False


def read_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 1 else None  # never signal 0/1 (process group / init)


def running(pid: int) -> bool:
    """Is `pid` a live hello server? Guards against stale pid files and reused pids."""
    if Path("/proc/self").exists():
        # Linux: check it is really our server; zombies have an empty cmdline.
        try:
            return b"server.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def stop() -> bool:
    pid = read_pid()
    if pid is not None and running(pid):
        print(f"stopping hello server (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not running(pid)):
            print(f"pid {pid} ignored SIGTERM, killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not running(pid), 2.0)
    PID_FILE.unlink(missing_ok=True)
    # Whatever held it, the port must be free before the next server can bind it.
    if not wait_until(lambda: not port_in_use()):
        print(f"port {PORT} is still in use by another process", file=sys.stderr)
        return False
    return True


def start(target: Path) -> bool:
    release = target.name
    log_path = target / "logs" / "hello.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(target / "server.py")],
            cwd=target,
            env={**os.environ, "SWITCHOVER_RELEASE": release},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detach from the hook's session / process group
        )
    PID_FILE.write_text(f"{proc.pid}\n")
    if wait_until(lambda: proc.poll() is not None or serving(release)) and proc.poll() is None:
        print(f"hello server for release {release} is up: http://{HOST}:{PORT}/ (pid {proc.pid})")
        return True
    print(f"hello server for release {release} did not come up; see {log_path}", file=sys.stderr)
    if proc.poll() is None:
        proc.kill()
    PID_FILE.unlink(missing_ok=True)
    return False


def run(cmd: str) -> int:
    if cmd == "stop":
        return 0 if stop() else 1
    if cmd == "restart":
        target = target_dir()
        if not stop():
            return 1
        if target is None:
            print("no current release, nothing to start")
            return 0
        return 0 if start(target) else 1
    if cmd == "status":
        pid = read_pid()
        if pid is not None and running(pid):
            print(f"hello server running (pid {pid})")
            return 0
        print("hello server not running")
        return 3
    print("usage: ctl.py restart|stop|status", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    PID_FILE.parent.mkdir(exist_ok=True)
    # One ctl at a time, so a stop can't remove the pid file of a concurrent start.
    with open(PID_FILE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return run(argv[1] if len(argv) == 2 else "")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
