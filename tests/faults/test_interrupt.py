"""Ctrl-C after the switch, a second Ctrl-C, and locks kept alive by a heartbeat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from project import Project, local_target, ssh_target

from faults.kit import Client, check_invariants, lock_owner


def _wait_all(paths, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(p.exists() for p in paths):
        time.sleep(0.02)
    assert all(p.exists() for p in paths), paths


def test_sigint_after_switch_finishes_the_check_then_rolls_back(project: Project):
    project.ok("deploy", "test")
    first = {h: project.current(h) for h in project.target.hosts}
    (project.app / "index.html").write_text("v2\n")
    check = "touch ../../check-started; sleep 1; touch ../../check-finished"
    client = Client(project, "deploy", "test", "--check", check)
    _wait_all([project.root(h) / "check-started" for h in project.target.hosts])
    client.proc.send_signal(signal.SIGINT)
    r = client.finish()
    assert r.returncode == 130, r.stderr
    assert "stopping safely" in r.stderr
    assert "interrupted after the switch: rolled back" in r.stdout + r.stderr
    check_invariants(project, first)
    for h in project.target.hosts:
        # the check in flight was not cut off: it ran to its end, then the host went back
        assert (project.root(h) / "check-finished").exists()
        assert project.live_file("index.html", h) == "v1\n"
        assert project.events(h)[-2:] == ["deploy_failed", "rolled_back"]
        assert not project.locked(h)


def test_second_sigint_aborts_now(project: Project):
    project.ok("deploy", "test")
    (project.app / "index.html").write_text("v2\n")
    client = Client(project, "deploy", "test", "--check", "touch ../../check-started; sleep 8")
    _wait_all([project.root(h) / "check-started" for h in project.target.hosts])
    client.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    client.proc.send_signal(signal.SIGINT)
    r = client.finish(timeout=6)  # well before the 8 s check would have ended
    assert r.returncode == 130, r.stderr
    assert "aborting now" in r.stderr
    # It says how it ended: rolled back at once, or aborted where it stood.
    assert "rolled back" in r.stdout + r.stderr or "switchover status" in r.stderr
    check_invariants(project)  # every host on a complete release
    for h in project.target.hosts:
        assert not project.locked(h)  # the locks are still released on the way out


@pytest.fixture
def sshp(ssh_fleet, tmp_path) -> Project:
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    return Project(tmp_path / "proj", ssh_target(ssh_fleet, tmp_path.name))


def test_heartbeat_keeps_a_live_lock_and_a_silent_one_is_taken_over(sshp: Project):
    p = sshp
    # lock_timeout 3 s against a beat every 0.3 s: only a stall of over 2 s in the holder
    # (ages are whole seconds) could make its live lock look stale on a loaded machine
    p.write_config(env_extra="lock_timeout = 3.0\n")
    p.ok("deploy", "test")
    holder = Client(p, "deploy", "test", pause_at="after_begin",
                    env={"SWITCHOVER_LOCK_HEARTBEAT": "0.3"})
    holder.wait_paused(hosts=len(p.target.hosts))  # every host holds its lock
    beat = {h: p.root(h) / ".switchover" / "lock" / "heartbeat" for h in p.target.hosts}
    start = {h: int(beat[h].read_text()) for h in p.target.hosts}
    # Seen from "elsewhere", only the heartbeat can tell whether the owner is alive.
    for h in p.target.hosts:
        owner = lock_owner(p, h)
        assert owner is not None
        owner.update(origin="another-machine", machine="other")
        (beat[h].parent / "owner.json").write_text(json.dumps(owner) + "\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
            int(beat[h].read_text()) >= start[h] + 4 for h in p.target.hosts):
        time.sleep(0.1)
    # The lock is older than lock_timeout, but its heartbeat is fresh: never taken.
    r = p.run("deploy", "test")
    assert r.returncode == 4, r.stderr
    assert "another-machine" in r.stderr and "last heartbeat" in r.stderr
    holder.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
            time.time() - int(beat[h].read_text()) >= 4.2 for h in p.target.hosts):
        time.sleep(0.1)
    r = p.ok("deploy", "test")
    assert "took over a stale lock" in r.stderr and "no heartbeat for" in r.stderr
    for h in p.target.hosts:
        taken = [e for e in p.history(h) if e["event"] == "unlock" and e.get("takeover")]
        assert taken and taken[-1]["former_owner"]["origin"] == "another-machine"
        assert not p.locked(h)
    check_invariants(p)


@pytest.mark.parametrize("pause", ["before_finish", "after_health"])
def test_sigint_once_every_host_passed_keeps_the_release_and_records_it(sshp: Project,
                                                                        pause: str):
    # before_finish (--parallel 1): Ctrl-C while the first host's success is recorded; the
    # hosts not yet recorded are recorded all the same. after_health: Ctrl-C once every
    # host has passed, while they end their check step (paused there). Either way every
    # host has passed: nothing is undone.
    p = sshp
    p.ok("deploy", "test")
    (p.app / "index.html").write_text("v2\n")
    host = p.target.hosts[0]
    if pause == "before_finish":
        args, at, paused = ["--parallel", "1"], f"{pause}@{host}", 1
    else:
        args, at, paused = [], pause, len(p.target.hosts)
    client = Client(p, "deploy", "test", *args, pause_at=at,
                    env={"SWITCHOVER_TEST_PAUSE_SECONDS": "3"})
    client.wait_paused(hosts=paused)
    client.proc.send_signal(signal.SIGINT)
    r = client.finish()
    assert r.returncode == 0, r.stderr
    assert "every host passed its checks" in r.stderr
    release = p.current(host)
    for h in p.target.hosts:
        assert p.live_file("index.html", h) == "v2\n"
        assert p.current(h) == release
        assert p.events(h)[-1] == "deploy_succeeded", p.events(h)
        assert "rolled_back" not in p.events(h)
        assert not p.locked(h)
    check_invariants(p)


# Runs the CLI with a SIGINT sent to itself at one point of the deploy's main thread: the
# windows between fan-outs that no pause point reaches.
_SIGNAL_AT = """
import os, signal, sys
from switchover import deploy
where = os.environ["SIGNAL_AT"]
each = deploy.Deployer._each
sent = []
def once():
    if not sent:  # one Ctrl-C only: a second would abort
        sent.append(1)
        os.kill(os.getpid(), signal.SIGINT)
def _each(self, runs, fn, *args, **kw):
    name = getattr(fn, "__name__", "")
    if where == "before_finish" and name == "_finish":
        once()
    each(self, runs, fn, *args, **kw)
    if where == name:  # as the fan-out returns: "_switch" or "_finish"
        once()
deploy.Deployer._each = _each
from switchover.cli import main
main(prog_name="switchover")
"""


@pytest.mark.parametrize("where", ["_switch", "before_finish", "_finish"])
def test_sigint_between_the_last_check_and_the_end_undoes_nothing(tmp_path, where):
    p = Project(tmp_path / "proj", local_target(tmp_path))
    p.ok("deploy", "test")
    (p.app / "index.html").write_text("v2\n")
    driver = tmp_path / "driver.py"
    driver.write_text(_SIGNAL_AT)
    r = subprocess.run([sys.executable, str(driver), "-c", str(p.config), "deploy", "test"],
                       capture_output=True, text=True, cwd=p.dir, timeout=120,
                       env={**os.environ, "SIGNAL_AT": where})
    assert r.returncode == 0, r.stderr
    assert "interrupted" in r.stderr and "is live on 1 host" in r.stdout + r.stderr
    assert p.live_file("index.html") == "v2\n"
    events = p.events()
    assert events[-1] == "deploy_succeeded" and "rolled_back" not in events, events
    assert events.count("deploy_succeeded") == 2  # recorded once, though entered again
    assert not p.locked()
