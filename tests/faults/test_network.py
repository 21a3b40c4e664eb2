"""A link that drops: mid-upload (once, every time), mid-switch, and a client that dies mid-upload.

web1 is reached through a TCP proxy on loopback that resets connections on cue (see
tcpproxy.py); web2 directly. The artifact carries a fresh 8 MB random file each time so the
upload is big enough to cut in the middle.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from project import Project, Target

from faults.kit import Client, check_invariants
from faults.tcpproxy import DropProxy

MB = 1 << 20
BIG = 8 * MB


def _write_ssh_config(fleet, proxy: DropProxy, path: Path) -> None:
    web1, web2 = fleet["web1"], fleet["web2"]
    key = Path(str(web1.host_key) + ".pub").read_text().split()
    known = path.with_name("known_hosts")
    known.write_text(fleet.known_hosts.read_text() + f"web1-proxied {key[0]} {key[1]}\n")
    common = [
        "    User root",
        f"    IdentityFile {fleet.identity_file}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {known}",
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    CheckHostIP no",
        "    BatchMode yes",
        "    ConnectTimeout 10",
    ]
    path.write_text("\n".join([
        "Host web1",
        f"    HostName {proxy.address[0]}",
        f"    Port {proxy.address[1]}",
        "    HostKeyAlias web1-proxied",
        *common,
        "Host web2",
        f"    HostName {web2.address}",
        f"    Port {web2.port}",
        *common,
        "",
    ]))
    path.chmod(0o600)


@pytest.fixture
def proxied(ssh_fleet, tmp_path) -> Iterator[tuple[Project, DropProxy]]:
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    web1 = ssh_fleet["web1"]
    proxy = DropProxy((web1.address, web1.port))
    config = tmp_path / "ssh_config"
    _write_ssh_config(ssh_fleet, proxy, config)
    name = tmp_path.name
    target = Target(
        "ssh", f"{ssh_fleet.remote_root}/{name}",
        {h: ssh_fleet[h].root / name for h in ("web1", "web2")},
        f'hosts = ["web1", "web2"]\nssh_config = "{config}"\n', ssh_fleet)
    project = Project(tmp_path / "proj", target)
    try:
        yield project, proxy
    finally:
        proxy.close()


def _new_big(p: Project) -> bytes:
    data = os.urandom(BIG)
    (p.app / "big.bin").write_bytes(data)
    return data


def _live_big(p: Project, host: str) -> bytes:
    return (p.root(host) / "releases" / p.current(host) / "big.bin").read_bytes()


def _staging(p: Project, host: str) -> list[str]:
    d = p.root(host) / ".switchover" / "staging"
    return sorted(x.name for x in d.iterdir()) if d.is_dir() else []


def test_one_drop_mid_upload_is_retried_and_resumes(proxied):
    p, proxy = proxied
    _new_big(p)
    p.ok("deploy", "test")
    data = _new_big(p)
    first = len(proxy.conns)
    proxy.plan(cut_after=6 * MB, cuts=1)
    r = p.ok("deploy", "test")
    assert "connection lost during upload" in r.stderr and "retrying" in r.stderr
    assert "rsync exit 255" in r.stderr and "rsh-exit" not in r.stderr  # ssh's status
    conns = proxy.conns[first:]
    cut = [i for i, c in enumerate(conns) if c.cut]
    assert len(cut) == 1 and len(conns) > cut[0] + 1, conns
    # Resumed, not started over: what the later connection carried is well under the file.
    after = sum(c.up for c in conns[cut[0] + 1:])
    assert after < 0.7 * BIG, (after, BIG)
    check_invariants(p)
    for h in ("web1", "web2"):
        assert _live_big(p, h) == data


def test_a_link_that_keeps_dropping_exits_3_and_changes_nothing(proxied):
    p, proxy = proxied
    data = _new_big(p)
    p.ok("deploy", "test")
    before = {h: p.current(h) for h in ("web1", "web2")}
    _new_big(p)
    proxy.plan(cut_after=2 * MB, cuts=-1)
    r = p.run("deploy", "test")
    assert r.returncode == 3, r.stderr
    assert "web1" in r.stderr and "gave up after 3 attempts" in r.stderr
    assert "current unchanged" in r.stdout + r.stderr
    check_invariants(p, before)
    for h in ("web1", "web2"):
        assert _live_big(p, h) == data
        assert p.releases(h) == [before[h]]
        assert _staging(p, h) == []  # the staged tree is removed on every host
        assert not p.locked(h)
    proxy.plan()  # the link is good again
    data = _new_big(p)
    p.ok("deploy", "test")
    check_invariants(p)
    assert _live_big(p, "web1") == data


def test_client_dying_mid_upload_leaves_no_partial_release(proxied):
    """Kill point `mid_upload`: the client machine dies (client, rsync and ssh all killed)."""
    p, proxy = proxied
    p.ok("deploy", "test")
    before = {h: p.current(h) for h in ("web1", "web2")}
    data = _new_big(p)
    proxy.plan(rate=4 * MB)  # ~2 s for the big file through web1's link
    first = len(proxy.conns)
    client = Client(p, "deploy", "test")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(c.up for c in proxy.conns[first:]) < 2 * MB:
        time.sleep(0.02)
    assert sum(c.up for c in proxy.conns[first:]) >= 2 * MB
    client.kill(tree=True)
    proxy.cut_all()
    check_invariants(p, before)  # nothing partial under releases/, current untouched
    proxy.plan()
    r = p.ok("deploy", "test")
    assert "took over a stale lock" in r.stderr
    check_invariants(p)
    for h in ("web1", "web2"):
        assert _live_big(p, h) == data
        assert _staging(p, h) == []


def test_link_lost_during_switch_step_host_still_restarts(proxied):
    """The switch and after_switch hooks are one detached step: cut the link mid-hook, and
    the host still finishes it; the client reconnects, reads the result and goes on."""
    p, proxy = proxied
    hook = "touch ../../hook-started; sleep 1; echo $SWITCHOVER_RELEASE > ../../restarted"
    p.write_config(sections=f'[hooks]\nafter_switch = ["{hook}"]\n')
    p.ok("deploy", "test")
    first = p.current("web1")
    (p.app / "index.html").write_text("v2\n")
    started = p.root("web1") / "hook-started"
    started.unlink()
    client = Client(p, "deploy", "test")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not started.exists():
        time.sleep(0.02)
    assert started.exists()
    assert proxy.cut_all() >= 1
    r = client.finish()
    assert r.returncode == 0, r.stderr
    assert "reconnecting" in r.stderr
    for h in ("web1", "web2"):
        new = p.current(h)
        assert new != first and p.live_file("index.html", h) == "v2\n"
        assert (p.root(h) / "restarted").read_text().strip() == new
    check_invariants(p)


def _files(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every file under root: mode, mtime (ns), inode and content."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_ino,
                                                path.read_bytes())
    return out


def test_link_lost_mid_clone_uploads_the_whole_tree_and_leaves_live_whole(proxied):
    """The redeploy clones the live release on the host (hard links) and reads back its
    listing; the link dies while that listing is on its way. The client reconnects, empties
    staging and uploads the whole tree: the live release, whose inodes the clone shared, is
    not touched (a mode-only change would otherwise be made in place on a shared inode)."""
    p, proxy = proxied
    many = p.app / "many"
    many.mkdir()
    for i in range(600):  # a listing of ~40 kB: seconds through the throttled link
        (many / f"f{i:03d}.txt").write_text(f"{i}\n")
    tool = p.app / "run.sh"
    tool.write_text("#!/bin/sh\necho run\n")
    tool.chmod(0o755)
    p.ok("deploy", "test")
    live = p.current("web1")
    live_dir = p.root("web1") / "releases" / live
    before = _files(live_dir)

    (p.app / "index.html").write_text("v2\n")
    tool.chmod(0o644)  # the same bytes, another mode: rsync would chmod the file in place
    staging = p.root("web1") / ".switchover" / "staging"
    proxy.plan(down_rate=8000)
    client = Client(p, "deploy", "test")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(staging.glob("*/many/f599.txt")):
        time.sleep(0.01)
    assert any(staging.glob("*/many/f599.txt")), "the clone never showed up in staging"
    assert proxy.cut_all() >= 1  # the clone is made; its listing is still on the way
    proxy.plan()
    r = client.finish()
    assert r.returncode == 0, r.stderr
    assert "uploading the whole tree instead" in r.stderr, r.stderr
    assert _files(live_dir) == before
    new = p.current("web1")
    assert new != live and p.live_file("index.html", "web1") == "v2\n"
    new_tool = p.root("web1") / "releases" / new / "run.sh"
    assert new_tool.stat().st_mode & 0o777 == 0o644
    assert new_tool.stat().st_ino != (live_dir / "run.sh").stat().st_ino
    check_invariants(p)
    assert _staging(p, "web1") == []
