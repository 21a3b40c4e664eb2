"""Shared fixtures: fleets of real sshd processes on loopback (see sshd_harness.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from project import Project, local_target, ssh_target
from sshd_harness import SSHD, SshFleet, sshd_available

#: Hosts in the shared session fleet.  Tests needing more use make_ssh_fleet(n).
SSH_FLEET_SIZE = 3

#: Opt-in: add loopback routes with delayed ACKs off (~2.4x faster ssh handshakes).
#: Changes the routing table while the fleet runs; see SshFleet._add_quickack_routes.
QUICKACK = os.environ.get("SWITCHOVER_TEST_QUICKACK", "") not in ("", "0")

MakeSshFleet = Callable[..., SshFleet]


def _require_sshd() -> None:
    if not sshd_available():
        pytest.skip(f"OpenSSH server not installed ({SSHD}, ssh, ssh-keygen needed)")


@pytest.fixture(scope="session")
def make_ssh_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeSshFleet]:
    """Factory: ``make_ssh_fleet(n=3, **SshFleet_kwargs)`` -> a started SshFleet.

    Every fleet made is stopped at the end of the session.  For a fleet that
    should die with the test, use it as a context manager: ``with make_ssh_fleet(5):``.
    """
    fleets: list[SshFleet] = []

    def make(count: int = SSH_FLEET_SIZE, **kwargs: object) -> SshFleet:
        _require_sshd()
        kwargs.setdefault("quickack", QUICKACK)
        fleet = SshFleet(tmp_path_factory.mktemp("sshfleet"), count, **kwargs)  # type: ignore[arg-type]
        fleets.append(fleet)
        return fleet.start()

    yield make
    errors = []
    for fleet in reversed(fleets):
        try:
            fleet.stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def ssh_fleet(make_ssh_fleet: MakeSshFleet) -> SshFleet:
    """A session-wide fleet of SSH_FLEET_SIZE hosts: web1, web2, web3.

    Shared by all tests: restore what you change (use ``fleet.host_down(...)``
    rather than bare stop_host) -- or use ``clean_ssh_fleet``.
    """
    return make_ssh_fleet(SSH_FLEET_SIZE)


@pytest.fixture
def clean_ssh_fleet(ssh_fleet: SshFleet) -> SshFleet:
    """The session fleet with every host running and every host root emptied."""
    ssh_fleet.ensure_running()
    ssh_fleet.wipe_roots()
    return ssh_fleet


@pytest.fixture(params=["local", "ssh"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Project:
    """A demo project deploying to a local target, or to two real sshd hosts."""
    if request.param == "local":
        target = local_target(tmp_path)
    else:
        fleet = request.getfixturevalue("ssh_fleet")
        if not fleet.shared_path:
            pytest.skip("per-host mount namespaces unavailable")
        fleet.ensure_running()
        target = ssh_target(fleet, tmp_path.name)
    return Project(tmp_path / "proj", target)


class _Health:
    """A real HTTP server on loopback whose answer the test controls."""

    def __init__(self) -> None:
        import http.server
        import threading

        outer = self
        self.status = 200
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(outer.status)
                self.end_headers()
                self.wfile.write(b"ok\n" if outer.status == 200 else b"down\n")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_health() -> Iterator[_Health]:
    h = _Health()
    yield h
    h.close()


@pytest.fixture(autouse=True, scope="session")
def _run_logs_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep every run's log file (see runlog.py) out of the real ~/.local/state."""
    old = os.environ.get("SWITCHOVER_LOG_DIR")
    logs = tmp_path_factory.mktemp("run-logs")
    os.environ["SWITCHOVER_LOG_DIR"] = str(logs)
    yield logs
    if old is None:
        os.environ.pop("SWITCHOVER_LOG_DIR", None)
    else:
        os.environ["SWITCHOVER_LOG_DIR"] = old


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own empty local cache (see cache.py): no test warms another's."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SWITCHOVER_CACHE_DIR", str(path))
    return path
