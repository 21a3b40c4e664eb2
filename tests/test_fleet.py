"""Fleets: strategies, whole-fleet rollback, host selection, hangs, drift (5 real sshd hosts)."""

from __future__ import annotations

import signal
import time

import pytest
from faults.kit import Client
from project import Project, ssh_target
from sshd_harness import _descendants, _signal

HOSTS = 5


@pytest.fixture(scope="module")
def fleet5(make_ssh_fleet):
    fleet = make_ssh_fleet(HOSTS)
    if not fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    return fleet


@pytest.fixture
def fp(fleet5, tmp_path) -> Project:
    fleet5.ensure_running()
    return Project(tmp_path / "proj", ssh_target(fleet5, tmp_path.name, hosts=HOSTS))


def same_release_everywhere(p: Project) -> str | None:
    live = {p.current(h) for h in p.target.hosts}
    assert len(live) == 1, live
    return live.pop()


@pytest.mark.parametrize("args", [
    ("--strategy", "all"),
    ("--strategy", "rolling", "--batch-size", "2"),
    ("--strategy", "rolling", "--batch-size", "40%"),
    ("--strategy", "canary", "--canary-wait", "1", "--check", "true"),
])
def test_every_strategy_reaches_every_host(fp: Project, args):
    fp.ok("deploy", "test")
    (fp.app / "index.html").write_text("v2\n")
    doc = fp.json("deploy", "test", *args)
    assert doc["status"] == "succeeded"
    assert same_release_everywhere(fp) == doc["release"]
    assert [h["host"] for h in doc["hosts"]] == fp.target.hosts  # stable order
    for h in fp.target.hosts:
        assert fp.live_file("index.html", h) == "v2\n"
    ids = {e["deploy_id"] for h in fp.target.hosts for e in fp.history(h)
           if e["release"] == doc["release"]}
    assert len(ids) == 1


@pytest.mark.parametrize("args", [
    ("--strategy", "all"),
    ("--strategy", "rolling", "--batch-size", "2"),
    ("--strategy", "canary", "--canary-hosts", "web5", "--canary-wait", "0"),
])
def test_one_bad_host_rolls_back_the_whole_fleet(fp: Project, args):
    fp.ok("deploy", "test")
    good = same_release_everywhere(fp)
    (fp.root("web5") / "BAD").write_text("")  # only web5 fails its check
    (fp.app / "index.html").write_text("v2\n")
    r = fp.run("deploy", "test", "--check", "test ! -f ../../BAD", *args)
    assert r.returncode == 1, r.stderr
    assert "web5" in r.stderr
    assert same_release_everywhere(fp) == good
    for h in fp.target.hosts:
        assert fp.releases(h) == [good] or fp.history(h)[-1]["event"] in (
            "rolled_back", "deploy_failed")
        assert fp.live_file("index.html", h) == "v1\n"
        assert not fp.locked(h)
        # every host's story of this deploy ends in a failure
        assert "deploy_failed" in fp.events(h)[-2:]


def test_rolling_stops_at_the_failing_batch(fp: Project):
    fp.ok("deploy", "test")
    good = same_release_everywhere(fp)
    (fp.root("web3") / "BAD").write_text("")
    r = fp.run("deploy", "test", "--strategy", "rolling", "--batch-size", "2",
               "--check", "test ! -f ../../BAD")
    assert r.returncode == 1
    assert same_release_everywhere(fp) == good
    # web5 is in the last batch: it never switched, and its staged release is gone
    assert "switched" not in fp.events("web5")[-3:]
    assert fp.releases("web5") == [good]
    assert "rolled_back" in fp.events("web1")  # an earlier batch was put back


def test_canary_failure_never_touches_the_rest(fp: Project):
    fp.ok("deploy", "test")
    good = same_release_everywhere(fp)
    (fp.root("web1") / "BAD").write_text("")
    r = fp.run("deploy", "test", "--strategy", "canary", "--canary-wait", "0",
               "--check", "test ! -f ../../BAD")
    assert r.returncode == 1
    for h in fp.target.hosts[1:]:
        assert fp.current(h) == good and fp.releases(h) == [good]
        assert "switched" not in fp.events(h)[-3:]


def test_host_selection_limits_the_work_and_status_flags_drift(fp: Project, tmp_path):
    fp.ok("deploy", "test")
    first = same_release_everywhere(fp)
    (fp.app / "index.html").write_text("v2\n")
    doc = fp.json("deploy", "test", "--host", "web2", "--host", "web4")
    assert [h["host"] for h in doc["hosts"]] == ["web2", "web4"]
    for h in fp.target.hosts:
        assert fp.current(h) == (doc["release"] if h in ("web2", "web4") else first)
    st = fp.json("status", "test")
    assert st["drift"] is True
    assert fp.json("releases", "test")["drift"] is True
    rel = fp.json("releases", "test", "--host", "web1")
    assert [h["host"] for h in rel["hosts"]] == ["web1"]
    listed = tmp_path / "hosts.txt"
    listed.write_text("# just one\nweb3\n")
    doc = fp.json("deploy", "test", "--hosts-from", str(listed))
    assert [h["host"] for h in doc["hosts"]] == ["web3"]
    r = fp.run("deploy", "test", "--host", "web9")
    assert r.returncode == 2 and "web9" in r.stderr


def test_parallel_one_still_works(fp: Project):
    fp.write_config(top="parallel = 1\n")
    doc = fp.json("deploy", "test")
    assert doc["status"] == "succeeded"
    same_release_everywhere(fp)


def test_hanging_host_is_cut_off_by_its_timeout(fp: Project, fleet5):
    fp.ok("deploy", "test")
    good = same_release_everywhere(fp)
    # freeze web4's sshd (inside its namespace): TCP still connects, nothing ever answers
    frozen = _descendants(fleet5["web4"].pid)
    assert frozen
    _signal(frozen, signal.SIGSTOP)  # a just-ended process in the listing needs nothing
    try:
        t0 = time.monotonic()
        r = fp.run("deploy", "test", "--timeout", "3", timeout=90)
        took = time.monotonic() - t0
    finally:
        _signal(frozen, signal.SIGCONT)
    assert r.returncode == 3, r.stderr
    assert "web4" in r.stderr
    assert took < 60  # bounded by the per-step timeout, not by TCP or ssh defaults
    for h in fp.target.hosts:
        assert fp.current(h) == good and not fp.locked(h)


def test_inventory_group(fp: Project, tmp_path):
    inv = tmp_path / "hosts.ini"
    inv.write_text("[web]\nweb1\nweb2\n[db]\nweb5\n[app:children]\nweb\n")
    fp.target.env_toml = fp.target.env_toml.split("\n", 1)[1]  # drop the hosts = [...] line
    fp.write_config(env_extra=f'inventory = "{inv}"\ngroup = "app"\n')
    doc = fp.json("deploy", "test")
    assert [h["host"] for h in doc["hosts"]] == ["web1", "web2"]
    assert fp.current("web5") is None


def test_hosts_upload_while_a_slow_host_is_still_taking_its_lock(fp: Project):
    """Pipelined prepare/stage: a host that holds its lock uploads at once; the release id
    is fixed, and anything finalized, only once every host holds its lock."""
    fp.ok("deploy", "test")
    first = same_release_everywhere(fp)
    (fp.app / "index.html").write_text("v2\n")
    # The id a deploy proposes comes from this machine's clock (whole seconds, UTC): in the
    # second the first deploy was named in it is not fresh, and nobody uploads before every
    # host holds its lock. Start in a later second (bounded wait).
    deadline = time.monotonic() + 3
    while time.strftime("%Y%m%d_%H%M%S", time.gmtime()) <= first[:15] \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    client = Client(fp, "deploy", "test", pause_at="after_lock@web5",
                    env={"SWITCHOVER_TEST_PAUSE_SECONDS": "10"})
    client.wait_paused()
    staging = fp.root("web1") / ".switchover" / "staging"
    deadline = time.monotonic() + 8  # well inside web5's pause, on a loaded machine too
    uploaded = []
    while time.monotonic() < deadline and not uploaded:
        uploaded = [d for d in staging.iterdir() if (d / "index.html").is_file()
                    and (d / "index.html").read_text() == "v2\n"] if staging.is_dir() else []
        time.sleep(0.05)
    assert uploaded, "web1 did not upload while web5 was still in prepare"
    # nothing is finalized or switched before every host holds its lock
    assert fp.releases("web1") == [fp.current("web1")]
    r = client.finish()
    assert r.returncode == 0, r.stderr
    assert same_release_everywhere(fp) == uploaded[0].name
    for h in fp.target.hosts:
        assert fp.live_file("index.html", h) == "v2\n"


def test_a_host_failing_prepare_stops_the_others_uploads_and_leaves_no_trace(fp: Project,
                                                                             fleet5):
    fp.ok("deploy", "test")
    first = same_release_everywhere(fp)
    seen = {h: len(fp.history(h)) for h in fp.target.hosts}
    (fp.app / "index.html").write_text("v2\n")
    with fleet5.host_down("web3"):
        r = fp.run("deploy", "test")
    assert r.returncode == 3, r.stderr
    assert "prepare failed on web3" in r.stdout + r.stderr
    for h in fp.target.hosts:
        assert fp.current(h) == first and fp.releases(h) == [first]
        assert not fp.locked(h)
        assert not list((fp.root(h) / ".switchover" / "staging").iterdir())
        # Each start recorded with the lock is closed, naming the cause. (A host still
        # logging in when web3 was refused is stopped before it locks: nothing to close.)
        new = fp.history(h)[seen[h]:]
        starts = [e["release"] for e in new if e["event"] == "deploy_started"]
        ends = [e for e in new if e["event"] == "deploy_failed"]
        assert [e["release"] for e in ends] == starts
        assert all("prepare failed on web3" in e["message"] for e in ends)
