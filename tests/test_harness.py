"""The sshd test harness itself: real sshd processes, reachable through ssh_config aliases."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from sshd_harness import SshFleet

TIMEOUT = 30


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        **kwargs,  # type: ignore[arg-type]
    )


def fleet_processes(fleet: SshFleet) -> list[int]:
    """PIDs of live processes whose command line mentions this fleet's directory."""
    needle = str(fleet.base_dir).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def refuses(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return False
    except OSError:
        return True


def test_echo_over_alias(ssh_fleet: SshFleet) -> None:
    res = run(["ssh", "-F", str(ssh_fleet.ssh_config), "web1", "echo hi"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hi\n"
    assert res.stderr == ""


def test_every_host_answers(ssh_fleet: SshFleet) -> None:
    assert ssh_fleet.aliases == ["web1", "web2", "web3"]
    addresses = {h.address for h in ssh_fleet}
    assert len(addresses) == 3
    assert all(a.startswith("127.0.0.") for a in addresses)
    for host in ssh_fleet:
        res = ssh_fleet.ssh(host.alias, "echo $HOME; id -un")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [str(host.home), "root"]


def test_known_hosts_are_enforced(ssh_fleet: SshFleet) -> None:
    # web1's alias pointed at web2's port: web2 presents a key not listed for it.
    web2 = ssh_fleet["web2"]
    opts = [
        "-o",
        f"HostName={web2.address}",
        "-o",
        f"Port={web2.port}",
        "-o",
        f"HostKeyAlias=[{ssh_fleet['web1'].address}]:{ssh_fleet['web1'].port}",
    ]
    res = ssh_fleet.ssh("web1", "true", options=opts)
    assert res.returncode == 255
    assert "Host key verification failed" in res.stderr


def test_known_hosts_uses_address_form(ssh_fleet: SshFleet) -> None:
    lines = ssh_fleet.known_hosts.read_text().splitlines()
    assert len(lines) == 3
    for host, line in zip(ssh_fleet, lines, strict=True):
        assert line.startswith(f"[{host.address}]:{host.port} ssh-ed25519 ")


def test_hosts_have_separate_trees_at_the_same_path(ssh_fleet: SshFleet) -> None:
    if not ssh_fleet.shared_path:
        pytest.skip("mount namespaces unavailable: hosts use distinct remote roots")
    web1, web2 = ssh_fleet["web1"], ssh_fleet["web2"]
    assert ssh_fleet.remote_root is not None
    assert web1.remote_root == web2.remote_root == ssh_fleet.remote_root
    assert web1.root != web2.root

    name = f"marker-{uuid.uuid4().hex}"
    remote = f"{ssh_fleet.remote_root}/{name}"
    res = ssh_fleet.ssh("web1", f"echo from-web1 > {shlex.quote(remote)}")
    assert res.returncode == 0, res.stderr

    assert (web1.root / name).read_text() == "from-web1\n"
    assert not (web2.root / name).exists()
    assert ssh_fleet.ssh("web2", f"test -e {shlex.quote(remote)}").returncode == 1
    assert ssh_fleet.ssh("web1", f"cat {shlex.quote(remote)}").stdout == "from-web1\n"
    # ...and the test process does not see the host trees at remote_root.
    assert not Path(remote).exists()

    # Files written locally show up remotely on that host only.
    (web2.root / name).write_text("from-test\n")
    assert ssh_fleet.ssh("web2", f"cat {shlex.quote(remote)}").stdout == "from-test\n"
    assert ssh_fleet.ssh("web1", f"cat {shlex.quote(remote)}").stdout == "from-web1\n"


def test_local_path_maps_remote_symlinks(ssh_fleet: SshFleet) -> None:
    web1 = ssh_fleet["web1"]
    name = f"link-{uuid.uuid4().hex}"
    rr = web1.remote_root
    res = ssh_fleet.ssh("web1", f"mkdir -p {rr}/{name}/r1 && ln -s {rr}/{name}/r1 {rr}/{name}/cur")
    assert res.returncode == 0, res.stderr
    target = os.readlink(web1.root / name / "cur")
    assert target == f"{rr}/{name}/r1"
    assert web1.local_path(target) == web1.root / name / "r1"
    assert web1.local_path(rr) == web1.root
    with pytest.raises(ValueError):
        web1.local_path("/etc/passwd")


def test_stop_host_makes_it_unreachable(ssh_fleet: SshFleet) -> None:
    web3 = ssh_fleet["web3"]
    with ssh_fleet.host_down("web3"):
        assert not web3.running
        assert refuses(web3.address, web3.port)
        started = time.monotonic()
        res = ssh_fleet.ssh("web3", "true")
        assert res.returncode == 255
        assert "Connection refused" in res.stderr
        assert time.monotonic() - started < 5
        # the others are unaffected
        assert ssh_fleet.ssh("web1", "true").returncode == 0
    assert web3.running
    res = ssh_fleet.ssh("web3", "echo back")
    assert (res.returncode, res.stdout) == (0, "back\n"), res.stderr


def test_stop_host_kills_open_sessions(ssh_fleet: SshFleet) -> None:
    web2 = ssh_fleet["web2"]
    proc = subprocess.Popen(
        [*ssh_fleet.ssh_command, "web2", "echo ready; exec sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        with ssh_fleet.host_down("web2"):
            assert proc.wait(timeout=10) == 255  # connection dropped
            assert refuses(web2.address, web2.port)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert ssh_fleet.ssh("web2", "true").returncode == 0


def test_kill_sessions_drops_connections_but_keeps_listening(ssh_fleet: SshFleet) -> None:
    proc = subprocess.Popen(
        [*ssh_fleet.ssh_command, "web1", "echo ready; exec sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert ssh_fleet.kill_sessions("web1") >= 2  # session sshd(s) + sleep
        assert proc.wait(timeout=10) == 255
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert ssh_fleet["web1"].running
    assert ssh_fleet.ssh("web1", "true").returncode == 0


def test_connection_count_counts_logins(ssh_fleet: SshFleet) -> None:
    before = ssh_fleet.connection_counts()
    for _ in range(3):
        assert ssh_fleet.ssh("web1", "true").returncode == 0
        # one new connection == one more accepted login
    assert ssh_fleet.connection_count("web1") == before["web1"] + 3
    assert ssh_fleet.connection_count("web2") == before["web2"]

    # Raw TCP probes (no login) do not count.
    web1 = ssh_fleet["web1"]
    with socket.create_connection((web1.address, web1.port), timeout=5) as s:
        assert s.recv(64).startswith(b"SSH-2.0-")
    assert ssh_fleet.connection_count("web1") == before["web1"] + 3

    # A failed login does not count either.
    res = ssh_fleet.ssh("web1", "true", options=["-o", "PubkeyAuthentication=no"])
    assert res.returncode == 255
    assert ssh_fleet.connection_count("web1") == before["web1"] + 3


def test_control_master_reuses_one_connection(ssh_fleet: SshFleet) -> None:
    assert ssh_fleet.control_dir is not None
    mux = [
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={ssh_fleet.control_dir}/%C",
        "-o", "ControlPersist=30",
    ]  # fmt: skip
    before = ssh_fleet.connection_count("web2")
    try:
        for i in range(4):
            res = ssh_fleet.ssh("web2", f"echo {i}", options=mux)
            assert (res.returncode, res.stdout) == (0, f"{i}\n"), res.stderr
        assert ssh_fleet.connection_count("web2") == before + 1
    finally:
        ssh_fleet.ssh("web2", "", options=[*mux, "-O", "exit"])


def test_reset_logs(make_ssh_fleet) -> None:  # type: ignore[no-untyped-def]
    with make_ssh_fleet(1) as fleet:
        assert fleet.ssh("web1", "true").returncode == 0
        assert fleet.connection_count("web1") == 1
        fleet.reset_logs()
        assert fleet.connection_count("web1") == 0
        assert fleet.ssh("web1", "true").returncode == 0
        assert fleet.connection_count("web1") == 1


def test_rsync_over_ssh(ssh_fleet: SshFleet, tmp_path: Path) -> None:
    src = tmp_path / "release"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "app").write_text("#!/bin/sh\necho app\n")
    (src / "bin" / "app").chmod(0o755)
    (src / "VERSION").write_text("1.2.3\n")

    web1 = ssh_fleet["web1"]
    dest_name = f"rsync-{uuid.uuid4().hex}"
    res = run(
        ["rsync", "-a", "-e", ssh_fleet.rsh, f"{src}/", f"web1:{web1.remote_root}/{dest_name}/"]
    )
    assert res.returncode == 0, res.stderr
    landed = web1.root / dest_name
    assert (landed / "VERSION").read_text() == "1.2.3\n"
    assert os.access(landed / "bin" / "app", os.X_OK)
    if ssh_fleet.shared_path:
        assert not (ssh_fleet["web2"].root / dest_name).exists()
    res = ssh_fleet.ssh("web1", f"{web1.remote_root}/{dest_name}/bin/app")
    assert res.stdout == "app\n"


def test_remote_commands_are_fast(ssh_fleet: SshFleet) -> None:
    # HOME points at an empty per-host dir, so root's ~/.bashrc (pyenv init) is not run.
    durations = []
    for _ in range(3):
        started = time.perf_counter()
        assert ssh_fleet.ssh("web1", "true").returncode == 0
        durations.append(time.perf_counter() - started)
    assert min(durations) < 1.0, durations  # generous bound: ~0.06-0.15 s here


def test_fleet_of_five_and_clean_stop(make_ssh_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_ssh_fleet(5)
    assert fleet.aliases == ["web1", "web2", "web3", "web4", "web5"]
    for host in fleet:
        assert fleet.ssh(host.alias, "true").returncode == 0
    # an open session must not survive stop()
    hanging = subprocess.Popen(
        [*fleet.ssh_command, "web5", "echo ready; exec sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert hanging.stdout is not None
        assert hanging.stdout.readline() == "ready\n"
        assert fleet_processes(fleet)
        mountpoint = fleet.remote_root
        fleet.stop()
        assert hanging.wait(timeout=10) == 255
    finally:
        hanging.kill()
        hanging.wait(timeout=10)
    assert fleet_processes(fleet) == []
    assert all(refuses(h.address, h.port) for h in fleet)
    if mountpoint is not None:
        assert not Path(mountpoint).exists()
    fleet.stop()  # idempotent


def test_fallback_without_namespaces(make_ssh_fleet) -> None:  # type: ignore[no-untyped-def]
    with make_ssh_fleet(2, isolate=False) as fleet:
        assert fleet.shared_path is False
        assert fleet.remote_root is None
        web1, web2 = fleet["web1"], fleet["web2"]
        assert web1.remote_root == str(web1.root) != web2.remote_root
        res = fleet.ssh("web1", f"echo x > {web1.remote_root}/f")
        assert res.returncode == 0, res.stderr
        assert (web1.root / "f").read_text() == "x\n"
        with fleet.host_down("web2"):
            assert fleet.ssh("web2", "true").returncode == 255
        assert fleet.ssh("web2", "true").returncode == 0
        hanging = subprocess.Popen(
            [*fleet.ssh_command, "web2", "echo ready; exec sleep 60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert hanging.stdout is not None
            assert hanging.stdout.readline() == "ready\n"
            assert fleet.kill_sessions("web2") >= 2
            assert hanging.wait(timeout=10) == 255
        finally:
            hanging.kill()
            hanging.wait(timeout=10)
        assert fleet.ssh("web2", "true").returncode == 0
    assert fleet_processes(fleet) == []
