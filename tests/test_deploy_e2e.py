"""The core promises, end to end, over a local target and over real sshd hosts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from faults.kit import check_invariants
from project import Project


def test_first_deploy_goes_live_and_is_recorded(project: Project):
    r = project.ok("deploy", "test", "-m", "first one")
    assert "is live on" in r.stdout
    for host in project.target.hosts:
        rid = project.current(host)
        assert rid is not None and project.releases(host) == [rid]
        assert project.live_file("index.html", host) == "v1\n"
        hist = project.history(host)
        assert [e["event"] for e in hist] == ["deploy_started", "switched", "deploy_succeeded"]
        for e in hist:
            for key in ("time", "event", "release", "previous", "user", "host", "message"):
                assert key in e, key
            assert e["release"] == rid and e["previous"] is None and e["host"] == host
            assert e["time"].endswith("Z")
        assert hist[0]["message"] == "first one"
        assert len(hist[0]["artifact_sha256"]) == 64
        assert not project.locked(host)
    # one deploy id joins all hosts' entries
    ids = {e["deploy_id"] for h in project.target.hosts for e in project.history(h)}
    assert len(ids) == 1


def test_second_deploy_switches_and_hard_links_unchanged_files(project: Project):
    project.ok("deploy", "test")
    first = project.current()
    index = project.app / "index.html"
    stamp = index.stat().st_mtime
    index.write_text("v2\n")  # same size, and (as reproducible builds do) the same mtime
    os.utime(index, (stamp, stamp))
    data = project.json("deploy", "test")
    assert data["status"] == "succeeded" and data["release"] != first
    for host in project.target.hosts:
        second = project.current(host)
        assert second == data["release"]
        assert project.live_file("index.html", host) == "v2\n"
        old = project.root(host) / "releases" / first
        new = project.root(host) / "releases" / second
        # unchanged files were hard-linked from the live release, not sent again
        assert (old / "static/asset3.js").stat().st_ino == (new / "static/asset3.js").stat().st_ino
        assert (old / "index.html").stat().st_ino != (new / "index.html").stat().st_ino
        assert project.history(host)[-1]["previous"] == first
    hosts = {h["host"]: h for h in data["hosts"]}
    assert all(h["files_transferred"] == 1 for h in hosts.values())


def test_redeploy_trusts_sizes_and_times_only_against_a_known_live_manifest(
        project: Project, _cache_in_tmp: Path):
    """Sizes and times are trusted (the live release cloned on the host, what differs sent:
    clonepatch.py) only with our copy of the live release's manifest, and the file they
    would miss (same size, same mtime, new content) is sent too."""
    project.ok("deploy", "test")
    index = project.app / "index.html"
    stamp = index.stat().st_mtime
    index.write_text("v2\n")
    os.utime(index, (stamp, stamp))
    r = project.ok("-vv", "deploy", "test")
    assert "as a clone of" in r.stderr, r.stderr
    for host in project.target.hosts:
        assert project.live_file("index.html", host) == "v2\n"

    # Without our copy of the live manifest (another machine deployed it, or the cache is
    # gone) the upload falls back to --checksum, and is just as right.
    shutil.rmtree(_cache_in_tmp / "manifests")
    index.write_text("v3\n")
    os.utime(index, (stamp, stamp))
    r = project.ok("-vv", "deploy", "test")
    assert "(--checksum;" in r.stderr and "sync again" not in r.stderr, r.stderr
    for host in project.target.hosts:
        assert project.live_file("index.html", host) == "v3\n"
    check_invariants(project)


def test_quick_check_is_not_fooled_by_a_directory_that_was_a_link(project: Project):
    """Live: vendor -> vendor-1.2. New: vendor/ a real directory whose x.js has the size
    and mtime of vendor-1.2/x.js but other content. rsync finds its basis through the old
    link; the file must still arrive."""
    lib = project.app / "vendor-1.2"
    lib.mkdir()
    (lib / "x.js").write_text("old!\n")
    stamp = (lib / "x.js").stat().st_mtime
    os.utime(lib / "x.js", (stamp, stamp))
    (project.app / "vendor").symlink_to("vendor-1.2")
    project.ok("deploy", "test")
    (project.app / "vendor").unlink()
    (project.app / "vendor").mkdir()
    (project.app / "vendor" / "x.js").write_text("new!\n")
    os.utime(project.app / "vendor" / "x.js", (stamp, stamp))
    project.ok("deploy", "test")
    for host in project.target.hosts:
        assert project.live_file("vendor/x.js", host) == "new!\n"
        assert project.live_file("vendor-1.2/x.js", host) == "old!\n"
    check_invariants(project)


def test_release_id_taken_on_one_host_moves_the_whole_fleet_to_a_new_one(project: Project):
    """The id proposed with the lock is kept only if every host can take it."""
    hosts = project.target.hosts
    ahead = "29990101_000000"  # a release from a deploy whose clock ran far ahead
    (project.root(hosts[0]) / "releases" / ahead).mkdir(parents=True)
    (project.app / "index.html").write_text("v2\n")
    data = project.json("deploy", "test")
    assert data["status"] == "succeeded" and data["release"] == ahead + "_02"
    for host in hosts:
        assert project.current(host) == ahead + "_02"
        assert project.live_file("index.html", host) == "v2\n"
        assert not list((project.root(host) / ".switchover" / "staging").iterdir())
        # The manifest made ahead for the proposed id is not the one stored
        stored = project.root(host) / ".switchover" / "manifests" / f"{ahead}_02.json"
        assert json.loads(stored.read_text())["release"] == ahead + "_02"
        mine = [e for e in project.history(host) if e["deploy_id"] == data["deploy_id"]]
        started = [e["release"] for e in mine if e["event"] == "deploy_started"]
        assert started[-1] == ahead + "_02"
        if len(started) > 1:  # this host began the proposed id: that start is closed
            dropped = [e for e in mine if e["event"] == "deploy_failed"]
            assert [e["release"] for e in dropped] == started[:1]
            assert "not usable on every host" in dropped[0]["message"]
    status = project.json("status", "test")
    assert all(h["last_deploy"]["state"] == "succeeded" for h in status["hosts"])
    if len(hosts) > 1:
        assert any(len([e for e in project.history(h) if e["event"] == "deploy_started"
                        and e["deploy_id"] == data["deploy_id"]]) == 2 for h in hosts[1:])


def test_failing_check_rolls_back(project: Project):
    project.ok("deploy", "test")
    good = project.current()
    (project.app / "index.html").write_text("broken\n")
    r = project.run("deploy", "test", "--check", "grep -q v1 index.html")
    assert r.returncode == 1, r.stderr
    assert "rolled back" in r.stdout + r.stderr
    for host in project.target.hosts:
        assert project.current(host) == good
        assert project.live_file("index.html", host) == "v1\n"
        events = project.events(host)
        assert events[-2:] == ["deploy_failed", "rolled_back"]
        failed = project.history(host)[-2]["release"]
        assert project.history(host)[-1]["release"] == good
        assert not project.locked(host)
    rel = project.json("releases", "test")
    states = {r["id"]: r["state"] for r in rel["hosts"][0]["releases"]}
    assert states[good] == "live" and states[failed] == "failed"


def test_failing_first_deploy_leaves_no_current(project: Project):
    r = project.run("deploy", "test", "--check", "false", env={})
    assert r.returncode == 1
    for host in project.target.hosts:
        assert project.current(host) is None
        assert project.events(host)[-1] == "deploy_failed"
        assert not project.locked(host)


def test_hook_failure_after_switch_rolls_back_and_hooks_see_env(project: Project):
    project.write_config(sections="""
        [hooks]
        after_switch = ["env | grep ^SWITCHOVER_ | sort > ../../hook-env.txt",
                        "test ! -f ../../fail"]
        after_rollback = ["echo rolled > ../../rollback-ran"]
    """)
    project.ok("deploy", "test")
    first = project.current()
    env = dict(
        line.split("=", 1) for line in (project.root() / "hook-env.txt").read_text().splitlines()
    )
    assert env["SWITCHOVER_APP"] == "demo" and env["SWITCHOVER_ENV"] == "test"
    assert env["SWITCHOVER_RELEASE"] == first
    assert env["SWITCHOVER_RELEASE_PATH"].endswith(f"/releases/{first}")
    assert env["SWITCHOVER_PREVIOUS_RELEASE"] == ""
    assert env["SWITCHOVER_HOST"] == project.target.hosts[0]
    for host in project.target.hosts:
        (project.root(host) / "fail").write_text("")
    r = project.run("deploy", "test")
    assert r.returncode == 1
    assert "after_switch hook failed" in r.stderr
    for host in project.target.hosts:
        assert project.current(host) == first
        assert (project.root(host) / "rollback-ran").read_text() == "rolled\n"


def test_before_switch_hook_failure_changes_nothing(project: Project):
    project.ok("deploy", "test")
    first = project.current()
    project.write_config(sections='[hooks]\nbefore_switch = ["exit 3"]\n')
    r = project.run("deploy", "test")
    assert r.returncode == 1
    assert "before_switch hook failed" in r.stderr
    for host in project.target.hosts:
        assert project.current(host) == first
        assert project.releases(host) == [first]  # the staged release was removed
        assert project.events(host)[-1] == "deploy_failed"
        assert not list((project.root(host) / ".switchover/staging").iterdir())


def deploy_versions(project: Project, n: int) -> list[str]:
    """Deploy v0 .. v{n-1} of the app in turn; their release ids, oldest first."""
    ids = []
    for i in range(n):
        (project.app / "index.html").write_text(f"v{i}\n")
        project.ok("deploy", "test")
        ids.append(project.current())
    return ids


def test_manual_rollback_and_to(project: Project):
    ids = deploy_versions(project, 3)
    r = project.ok("rollback", "test")
    assert ids[1] in r.stdout
    for host in project.target.hosts:
        assert project.current(host) == ids[1]
        assert project.events(host)[-1] == "rollback"
    # again: walks back to the one before
    project.ok("rollback", "test")
    assert project.current() == ids[0]
    # nothing older: exit 1, nothing changed
    r = project.run("rollback", "test")
    assert r.returncode == 1 and "nothing to roll back to" in r.stderr
    assert project.current() == ids[0]
    # --to forward
    data = project.json("rollback", "test", "--to", ids[2])
    assert {h["release"] for h in data["hosts"]} == {ids[2]}
    assert project.current() == ids[2]


def test_manual_rollback_runs_after_rollback_hooks_for_the_release_it_brings_back(
        project: Project):
    project.write_config(sections="""
        [hooks]
        after_rollback = ["echo restarted $SWITCHOVER_RELEASE; echo $SWITCHOVER_RELEASE > ../../up",
                          "test ! -f ../../fail"]
    """)
    ids = deploy_versions(project, 2)
    r = project.ok("-v", "rollback", "test")
    assert f"restarted {ids[0]}" in r.stdout + r.stderr  # each hook's output, with -v
    for host in project.target.hosts:
        assert project.current(host) == ids[0]
        assert (project.root(host) / "up").read_text() == f"{ids[0]}\n"
    # A failing hook: the switch stands, the exit code says it needs attention (5).
    for host in project.target.hosts:
        (project.root(host) / "fail").write_text("")
    r = project.run("rollback", "test", "--to", ids[1])
    assert r.returncode == 5, r.stderr
    assert "after_rollback hook failed" in r.stderr and "test ! -f ../../fail" in r.stderr
    for host in project.target.hosts:
        assert project.current(host) == ids[1]
        assert (project.root(host) / "up").read_text() == f"{ids[1]}\n"


def test_a_long_history_still_gives_the_rollback_target_and_the_history(project: Project):
    ids = deploy_versions(project, 2)
    # Months of other entries since: the state read sends only the lines naming a release
    # on disk and the newest ones, and decisions come out the same.
    filler = "".join(json.dumps({"time": "2026-06-01T00:00:00Z", "event": "unlock",
                                 "release": None, "n": i}) + "\n" for i in range(3000))
    for host in project.target.hosts:
        with (project.root(host) / ".switchover" / "history.jsonl").open("a") as f:
            f.write(filler)
    for row in project.json("releases", "test")["hosts"]:
        states = {r["id"]: r["state"] for r in row["releases"]}
        assert states == {ids[0]: "previous", ids[1]: "live"}, row
    project.ok("rollback", "test")
    for host in project.target.hosts:
        assert project.current(host) == ids[0]
    # `history` still shows the whole tail, the first deploys included
    events = project.json("history", "test", "--limit", "5000")
    assert any(e["event"] == "deploy_succeeded" and e["release"] == ids[1] for e in events)
    assert sum(e["event"] == "unlock" and "n" in e for e in events) >= 3000 - len(ids) * 10


def test_rollback_to_bad_targets_is_refused(project: Project):
    project.ok("deploy", "test")
    good = project.current()
    project.run("deploy", "test", "--check", "false")
    failed = project.releases()[-1]
    assert failed != good
    for to, needle in ((failed, "failed its checks"), ("20200101_000000", "does not exist"),
                       ("../etc", "not a release id"), (good, "already live")):
        r = project.run("rollback", "test", "--to", to)
        assert r.returncode == 2, (to, r.stderr)
        assert needle in r.stderr
        assert project.current() == good
    assert not project.locked()


def test_keep_releases_never_prunes_live_or_rollback_target(project: Project):
    project.write_config(top="keep_releases = 2\n")
    project.ok("deploy", "test")
    good = project.current()
    for _ in range(3):  # three failures must not push the good release out
        assert project.run("deploy", "test", "--check", "false").returncode == 1
    assert project.current() == good
    (project.app / "index.html").write_text("v2\n")
    project.ok("deploy", "test")
    live = project.current()
    # failed releases pruned; live + rollback target kept
    for host in project.target.hosts:
        assert project.releases(host) == [good, live]
        assert project.events(host)[-1] == "cleanup"
    for _ in range(2):
        project.ok("deploy", "test")
    rel = project.releases()
    assert len(rel) == 2 and rel[-1] == project.current()
    status = project.json("status", "test")
    assert {h["previous"] for h in status["hosts"]} == {rel[0]}
    # cleanup --keep 1 keeps live and the rollback target anyway
    data = project.json("cleanup", "test", "--keep", "1")
    assert data["status"] == "ok"
    assert project.releases() == rel


def test_lock_held_exits_4_and_unlock_frees_it(project: Project):
    project.ok("deploy", "test")
    first = project.current()
    host = project.target.hosts[-1]
    lock = project.root(host) / ".switchover" / "lock"
    lock.mkdir()
    (lock / "owner.json").write_text(json.dumps(
        {"user": "alice", "origin": "laptop", "pid": 4242, "time": "2026-01-01T00:00:00Z",
         "deploy_id": "feed"}) + "\n")
    r = project.run("deploy", "test")
    assert r.returncode == 4
    assert "alice@laptop" in r.stderr and "4242" in r.stderr
    for h in project.target.hosts:
        assert project.current(h) == first
        assert project.releases(h) == [first]
    assert lock.exists()  # someone else's lock is never removed by a failed deploy
    assert not any(project.locked(h) for h in project.target.hosts if h != host)
    st = project.json("status", "test")
    assert [h["locked"] for h in st["hosts"]][-1] is True
    r = project.ok("unlock", "test")
    assert "alice@laptop" in r.stderr
    assert not lock.exists()
    assert project.events(host)[-1] == "unlock"
    project.ok("deploy", "test")


def test_shared_files_and_dirs_survive_releases(project: Project):
    project.write_config(sections='[shared]\nfiles = ["config/.env"]\ndirs = ["storage"]\n')
    (project.app / "config").mkdir()
    (project.app / "config" / ".env").write_text("FROM_ARTIFACT=1\n")
    project.ok("deploy", "test")
    for host in project.target.hosts:
        rel = project.root(host) / "releases" / project.current(host)
        assert (rel / "config/.env").is_symlink() and (rel / "storage").is_symlink()
        assert not os.readlink(rel / "storage").startswith("/")
        (project.root(host) / "shared/storage/upload.txt").write_text("user data")
        (project.root(host) / "shared/config/.env").write_text("SECRET=host\n")
    (project.app / "index.html").write_text("v2\n")
    project.ok("deploy", "test")
    for host in project.target.hosts:
        rel = project.root(host) / "releases" / project.current(host)
        assert (rel / "storage/upload.txt").read_text() == "user data"
        assert (rel / "config/.env").read_text() == "SECRET=host\n"


def test_every_json_document_parses(project: Project):
    deploy = project.json("deploy", "test")
    assert deploy["status"] == "succeeded" and deploy["release"]
    assert {h["host"] for h in deploy["hosts"]} == set(project.target.hosts)
    status = project.json("status", "test")
    assert status["environment"] == "test"
    assert {"host", "current", "previous", "locked"} <= set(status["hosts"][0])
    releases = project.json("releases", "test")
    assert releases["hosts"][0]["releases"][0] == {"id": deploy["release"], "state": "live"}
    history = project.json("history", "test", "--limit", "2")
    assert isinstance(history, list) and len(history) == 2
    assert history[-1]["event"] == "deploy_succeeded"
    assert project.json("cleanup", "test")["status"] == "ok"
    assert project.json("unlock", "test")["status"] == "ok"
    assert project.json("setup", "test")["status"] == "ok"
    failed = project.json("deploy", "test", "--check", "false", code=1)
    assert failed["status"] == "rolled_back" and failed["exit_code"] == 1
    err = project.json("deploy", "nope", code=2)
    assert err["status"] == "error" and "nope" in err["error"]


def test_health_url_against_real_http_server(project: Project, http_health):
    project.ok("deploy", "test", "--url", http_health.url)
    good = project.current()
    assert http_health.hits >= len(project.target.hosts)
    http_health.status = 503
    r = project.run("deploy", "test", "--url", http_health.url)
    assert r.returncode == 1 and "HTTP 503" in r.stderr
    assert project.current() == good


def test_ctrl_c_before_switch_changes_nothing_and_releases_lock(project: Project):
    project.ok("deploy", "test")
    first = project.current()
    marker = project.dir / "hook-started"
    project.write_config(sections=f'[hooks]\nbefore_switch = ["touch {marker}; sleep 30"]\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "switchover", "-c", str(project.config), "deploy", "test"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "current unchanged" in out + err
    for host in project.target.hosts:
        assert project.current(host) == first
        assert project.releases(host) == [first]
        assert not project.locked(host)
        assert project.events(host)[-1] == "deploy_failed"
