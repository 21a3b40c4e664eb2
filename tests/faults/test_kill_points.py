"""SIGKILL the client at every named step of a deploy, over real sshd hosts (and locally).

After each kill: `current` is a complete release (the old one before the switch, the new
one once the host has the detached switch step), every release on disk matches its
manifest, the history and `status` show the interrupted deploy, and the next deploy just
works: it takes over the dead client's lock (its pid is gone) with a warning.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from project import Project, local_target, ssh_target

from faults.kit import Client, check_invariants, lock_owner

# (step, where `current` is after the kill: "old" release or "new" one)
POINTS = [
    ("after_lock", "old"),
    ("after_begin", "old"),
    ("after_upload", "old"),
    ("after_finalize", "old"),
    ("before_switch", "old"),
    ("during_switch", "new"),  # the host finishes the switch + after_switch hooks alone
    ("after_hooks", "new"),
    ("after_health", "new"),
    ("before_rollback_switch", "new"),  # a failed check, killed before the rollback
    ("during_rollback", "old"),  # the host finishes the rollback + after_rollback alone
    ("before_finish", "new"),  # healthy; killed before recording success (+ unlock)
]
# Locally every step runs through the same code but sh instead of ssh: a cheap subset.
LOCAL_POINTS = [("during_switch", "new")]

STATUS_POINTS = {"after_begin", "during_switch", "before_finish"}
_version = itertools.count(2)

HOOKS = """
[hooks]
after_switch = ["{sleep}echo $SWITCHOVER_RELEASE > ../../restarted"]
after_rollback = ["{sleep}echo $SWITCHOVER_RELEASE > ../../restarted"]
"""
DETACHED = {"during_switch", "during_rollback"}  # the host runs these steps by itself


def _make(tmp: Path, target_of) -> Iterator[Project]:
    p = Project(tmp / "proj", target_of(tmp))
    p.write_config(sections=HOOKS.format(sleep=""))
    p.ok("deploy", "test")
    yield p


@pytest.fixture(scope="module")
def ssh_project(ssh_fleet, tmp_path_factory) -> Iterator[Project]:
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    tmp = tmp_path_factory.mktemp("killpoints")
    yield from _make(tmp, lambda t: ssh_target(ssh_fleet, t.name))


@pytest.fixture(scope="module")
def local_project(tmp_path_factory) -> Iterator[Project]:
    yield from _make(tmp_path_factory.mktemp("killpoints-local"), local_target)


def _kill_at(p: Project, step: str, where: str) -> None:
    p.target.fleet and p.target.fleet.ensure_running()
    old = {h: p.current(h) for h in p.target.hosts}
    check_invariants(p, old)
    n = next(_version)
    (p.app / "index.html").write_text(f"v{n}\n")
    p.write_config(sections=HOOKS.format(sleep="sleep 0.5; " if step in DETACHED else ""))
    args = ["deploy", "test"]
    if "rollback" in step:
        args += ["--check", "test -f no-such-file"]
    client = Client(p, *args, pause_at=step)
    client.wait_paused(hosts=len(p.target.hosts))  # every host at that step, none beyond
    owners = {h: lock_owner(p, h) for h in p.target.hosts}
    client.kill()
    dead = {o["deploy_id"] for o in owners.values() if o}
    assert len(dead) == 1, owners  # the killed client holds every host's lock

    hosts = p.target.hosts
    if step in DETACHED:
        # The detached step finishes on the host though its client is gone: switch + restart.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                (p.root(h) / "restarted").exists()
                and (p.root(h) / "restarted").read_text().strip() == p.current(h)
                and (p.current(h) == old[h]) == (where == "old") for h in hosts):
            time.sleep(0.05)
        # The step writes its result just after the hook: wait for every detached step's
        # status (a running one makes the next deploy's takeover wait, then give up).
        runs = [d for h in hosts for d in (p.root(h) / ".switchover" / "run").glob("*/")
                if (d / "pid").exists()]
        while time.monotonic() < deadline and not all((d / "status").exists() for d in runs):
            time.sleep(0.02)
        assert all((d / "status").exists() for d in runs), runs
    if where == "old":
        check_invariants(p, old)
        if step == "during_rollback":  # the old release's restart ran after it came back
            for h in hosts:
                assert (p.root(h) / "restarted").read_text().strip() == old[h]
    else:
        new = {h: p.current(h) for h in hosts}
        check_invariants(p, None)
        for h in hosts:
            assert new[h] != old[h], f"{h}: expected the new release live after {step}"
            assert p.live_file("index.html", h) == f"v{n}\n"
            # the after_switch restart ran for the release that is live
            assert (p.root(h) / "restarted").read_text().strip() == new[h]

    # The tool sees the dead client's lock as stale and its deploy as interrupted.
    # The lock's round trip also begins the release if the id it proposes is fresh on the
    # host; killed right there, whether it was depends on the clock: not asserted.
    began = None if step == "after_lock" else True
    if step in STATUS_POINTS:  # (a CLI run costs ~1 s: not at every step)
        for row in p.json("status", "test")["hosts"]:
            assert row["locked"] and row["lock_stale"], row
            assert row["last_deploy"]["state"] == "interrupted", row
    # Each host's history has the dead deploy's start, with an ending only if it got there.
    for h in hosts:
        mine = [e["event"] for e in p.history(h) if e.get("deploy_id") in dead]
        if began is not None:
            assert ("deploy_started" in mine) == began, (h, mine)
        ended = {"deploy_succeeded", "deploy_failed"} & set(mine)
        if step == "during_rollback":  # the step that finished on the host records its end
            assert ended == {"deploy_failed"} and "rolled_back" in mine, (h, mine)
        else:
            assert not ended, (h, mine)
    if step in STATUS_POINTS:
        hist = p.json("history", "test")
        started = [e for e in hist if e["event"] == "deploy_started" and e["deploy_id"] in dead]
        assert len(started) == len(hosts)
        assert all(e.get("interrupted") for e in started)

    # The next deploy needs no manual work: it takes the dead client's lock over.
    (p.app / "index.html").write_text(f"v{n}b\n")
    p.write_config(sections=HOOKS.format(sleep=""))
    r = p.ok("deploy", "test")
    assert "took over a stale lock" in r.stderr
    check_invariants(p, None)
    for h in hosts:
        assert p.live_file("index.html", h) == f"v{n}b\n"
        assert not p.locked(h)
        takeovers = [e for e in p.history(h) if e["event"] == "unlock" and e.get("takeover")]
        assert takeovers[-1]["former_owner"]["deploy_id"] in dead
    assert not list((p.root(hosts[0]) / ".switchover" / "staging").iterdir())


@pytest.mark.parametrize(("step", "where"), POINTS, ids=[s for s, _ in POINTS])
def test_sigkill_over_ssh(ssh_project: Project, step: str, where: str):
    _kill_at(ssh_project, step, where)


@pytest.mark.parametrize(("step", "where"), LOCAL_POINTS, ids=[s for s, _ in LOCAL_POINTS])
def test_sigkill_local(local_project: Project, step: str, where: str):
    _kill_at(local_project, step, where)
