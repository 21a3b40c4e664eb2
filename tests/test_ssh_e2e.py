"""What only an SSH target has: reachability, keys, host keys, multiplexing."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from faults.kit import masters
from project import Project, ssh_target
from sshd_harness import _descendants, _signal

from switchover.errors import ConnectionLost, HostError, Interrupted
from switchover.hosts import HostSpec
from switchover.transport import ssh as ssh_module
from switchover.transport.base import abort_running
from switchover.transport.ssh import SshOptions, SshTransport, terminate_master


@pytest.fixture
def sshp(ssh_fleet, tmp_path) -> Project:
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    return Project(tmp_path / "proj", ssh_target(ssh_fleet, tmp_path.name, hosts=3))


def test_unreachable_host_exits_3_and_changes_nothing_anywhere(sshp: Project, ssh_fleet):
    sshp.ok("deploy", "test")
    first = {h: sshp.current(h) for h in sshp.target.hosts}
    (sshp.app / "index.html").write_text("v2\n")
    with ssh_fleet.host_down("web2"):
        r = sshp.run("deploy", "test")
    assert r.returncode == 3, r.stderr
    assert "web2" in r.stderr and "connection refused" in r.stderr
    for h in sshp.target.hosts:
        assert sshp.current(h) == first[h]
        assert sshp.releases(h) == [first[h]]
        assert not sshp.locked(h)
        assert sshp.live_file("index.html", h) == "v1\n"


def test_status_reports_unreachable_host(sshp: Project, ssh_fleet):
    sshp.ok("deploy", "test")
    with ssh_fleet.host_down("web3"):
        doc = sshp.json("status", "test", code=3)
    by_host = {h["host"]: h for h in doc["hosts"]}
    assert by_host["web3"]["reachable"] is False and by_host["web3"]["error"]
    assert by_host["web1"]["reachable"] is True and by_host["web1"]["current"]


def test_missing_identity_file_exits_2_before_touching_hosts(sshp: Project):
    sshp.write_config(env_extra='identity_file = "/nonexistent/id_ed25519"\n')
    r = sshp.run("deploy", "test")
    assert r.returncode == 2
    assert "identity_file" in r.stderr and "/nonexistent/id_ed25519" in r.stderr
    for h in sshp.target.hosts:
        assert not sshp.root(h).exists()


def test_one_ssh_connection_per_host_per_deploy(sshp: Project, ssh_fleet):
    sshp.ok("deploy", "test")
    before = ssh_fleet.connection_counts()
    (sshp.app / "index.html").write_text("v2\n")
    sshp.ok("deploy", "test", "--check", "true")
    after = ssh_fleet.connection_counts()
    for h in sshp.target.hosts:
        assert after[h] - before[h] == 1, (h, before[h], after[h])


def _our_masters(fleet) -> set[int]:
    """Pids of ssh masters using switchover's private control dirs (/tmp/swo-*): renamed
    to "[mux]" (opened by a first command) or not (opened early, `-f -N`)."""
    return {pid for pid, d in masters(str(fleet.ssh_config)).items()
            if d.startswith("/tmp/swo-")}


def _masters_of(fleet, t: SshTransport) -> set[int]:
    return {pid for pid, d in masters(str(fleet.ssh_config)).items() if d == t._control_dir}


def test_deploy_leaves_no_ssh_master_behind(sshp: Project, ssh_fleet):
    before = _our_masters(ssh_fleet)
    sshp.ok("deploy", "test")
    (sshp.app / "index.html").write_text("v2\n")
    sshp.ok("deploy", "test")
    deadline = time.monotonic() + 5  # a master exits just after it is told to
    while _our_masters(ssh_fleet) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _our_masters(ssh_fleet) - before


def test_terminate_master_ends_it_and_falls_back_when_it_cannot(ssh_fleet, tmp_path):
    host = ssh_fleet.hosts[0]
    t = SshTransport(HostSpec(host.alias), SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    try:
        assert t.run("true").ok  # the first command opens the master
        (pid,) = _masters_of(ssh_fleet, t)
        assert terminate_master(t._control_dir)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not Path(f"/proc/{pid}").exists()
        assert not terminate_master(t._control_dir)  # nothing listens any more
        assert not terminate_master(str(tmp_path / "missing"))
    finally:
        t.close()


def test_unknown_host_key_is_refused_with_exit_3(sshp: Project, ssh_fleet, tmp_path):
    # same hosts, but a known_hosts that does not list them
    cfg = tmp_path / "ssh_config_empty_known"
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    text = ssh_fleet.ssh_config.read_text().replace(str(ssh_fleet.known_hosts), str(empty))
    cfg.write_text(text)
    sshp.target.env_toml = sshp.target.env_toml.replace(str(ssh_fleet.ssh_config), str(cfg))
    sshp.write_config()
    r = sshp.run("deploy", "test")
    assert r.returncode == 3
    assert "host key verification failed" in r.stderr
    for h in sshp.target.hosts:
        assert not sshp.root(h).exists()


def test_changed_host_key_is_refused_with_exit_3(sshp: Project, ssh_fleet, tmp_path):
    sshp.ok("deploy", "test")
    first = {h: sshp.current(h) for h in sshp.target.hosts}
    # known_hosts lists a different key for web2 (any other ed25519 key will do)
    web2 = ssh_fleet.host("web2")
    other = ssh_fleet.identity_file.with_name(ssh_fleet.identity_file.name + ".pub")
    key_type, key = other.read_text().split()[:2]
    lines = ssh_fleet.known_hosts.read_text().splitlines()
    entry = f"[{web2.address}]:{web2.port} "
    assert any(line.startswith(entry) for line in lines)
    changed = tmp_path / "changed_known_hosts"
    changed.write_text("\n".join(f"{entry}{key_type} {key}" if line.startswith(entry) else line
                                 for line in lines) + "\n")
    cfg = tmp_path / "ssh_config_changed_key"
    cfg.write_text(ssh_fleet.ssh_config.read_text().replace(str(ssh_fleet.known_hosts),
                                                            str(changed)))
    cfg.chmod(0o600)
    sshp.target.env_toml = sshp.target.env_toml.replace(str(ssh_fleet.ssh_config), str(cfg))
    sshp.write_config()
    (sshp.app / "index.html").write_text("v2\n")
    r = sshp.run("deploy", "test")
    assert r.returncode == 3, r.stderr
    assert "web2" in r.stderr and "host key has CHANGED" in r.stderr
    for h in sshp.target.hosts:
        assert sshp.current(h) == first[h]
        assert sshp.releases(h) == [first[h]]
        assert not sshp.locked(h)


@pytest.fixture
def master_transport(ssh_fleet):
    """A transport whose master is up (opened by a first command), closed afterwards."""
    ssh_fleet.ensure_running()
    options = SshOptions(ssh_config=ssh_fleet.ssh_config)
    t = SshTransport(HostSpec(ssh_fleet.hosts[0].alias), options)
    t.connect()
    assert t.run("true").ok
    yield t
    t.close()


def test_later_commands_ride_the_master_socket_without_an_ssh_process(master_transport,
                                                                       monkeypatch):
    # No ssh on PATH: only a session asked of the master over its socket can run these.
    monkeypatch.setenv("PATH", "/nonexistent")
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value: stdin is passed exactly
    r = master_transport.run("PATH=/usr/bin:/bin; echo out; echo err >&2; "
                             "sha256sum | cut -c1-64; exit 3", input=data)
    assert r.rc == 3
    assert r.stdout.splitlines() == ["out", hashlib.sha256(data).hexdigest()]
    assert r.stderr == "err\n"
    assert master_transport.run("exit 0").ok


def test_a_command_over_the_master_is_cut_off_by_its_timeout_and_abort(master_transport):
    started = time.monotonic()
    with pytest.raises(HostError, match="timed out after 1 s"):
        master_transport.run("sleep 30", timeout=1)
    master_transport.abort = threading.Event()
    threading.Timer(0.5, master_transport.abort.set).start()
    with pytest.raises(Interrupted):
        master_transport.run("sleep 30")
    assert time.monotonic() - started < 10
    master_transport.abort = None
    assert master_transport.run("echo still-up").stdout == "still-up\n"


def test_a_session_ending_without_status_is_a_lost_connection(master_transport):
    # What `ssh` itself reports as exit 255: the remote shell killed, no exit status sent.
    with pytest.raises(ConnectionLost):
        master_transport.run("kill -9 $$")


def test_commands_fall_back_to_ssh_when_the_master_is_gone(master_transport):
    assert terminate_master(master_transport._control_dir)
    deadline = time.monotonic() + 5
    while os.listdir(master_transport._control_dir) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert master_transport.run("echo direct").stdout == "direct\n"


@pytest.fixture(scope="module")
def strict_fleet(make_ssh_fleet):
    """One host allowing a single session per connection and accepting SWO_* variables."""
    return make_ssh_fleet(1, sshd_options=["MaxSessions 1", "AcceptEnv SWO_*"])


def _strict_transport(fleet, tmp_path) -> SshTransport:
    # Our config sends SWO_SENT (only): the first command (ssh itself) and the later ones
    # (sessions of the master) must pass the same variables.
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n    SendEnv SWO_SENT\nInclude {fleet.ssh_config}\n")
    config.chmod(0o600)
    t = SshTransport(HostSpec(fleet.hosts[0].alias), SshOptions(ssh_config=config))
    t.connect()
    return t


def test_commands_over_the_master_pass_the_environment_ssh_would(strict_fleet, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("SWO_SENT", "sent")
    monkeypatch.setenv("SWO_KEPT", "not sent")
    t = _strict_transport(strict_fleet, tmp_path)
    try:
        probe = 'echo "${SWO_SENT:-unset} ${SWO_KEPT:-unset}"'
        assert t.run(probe).stdout == "sent unset\n"  # opens the master (ssh itself)
        assert t.run(probe).stdout == "sent unset\n"  # a session of the master
    finally:
        t.close()


def test_a_session_the_host_refuses_runs_over_a_connection_of_its_own(strict_fleet, tmp_path):
    t = _strict_transport(strict_fleet, tmp_path)
    try:
        assert t.run("true").ok  # opens the master; its session ends with the command
        busy = threading.Thread(target=t.run, args=("sleep 4",))
        busy.start()  # holds the connection's one session
        time.sleep(1)
        r = t.run("echo ran")  # refused by the host: MaxSessions 1
        busy.join()
        assert r.stdout == "ran\n"
    finally:
        t.close()


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 5  # a master exits just after it is told to
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not Path(f"/proc/{pid}").exists()


def test_an_early_connection_carries_the_first_command(ssh_fleet, monkeypatch):
    ssh_fleet.ensure_running()
    alias = ssh_fleet.hosts[0].alias
    before = ssh_fleet.connection_count(alias)
    t = SshTransport(HostSpec(alias), SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    t.open_early()
    try:
        # ssh is started already: with none on PATH from here, only the early master's
        # socket can run the first command (and rsync's later ones need it up too).
        monkeypatch.setenv("PATH", "/nonexistent")
        assert t.run("echo first").stdout == "first\n"
        assert t.run("echo second").stdout == "second\n"
        monkeypatch.undo()
        (pid,) = _masters_of(ssh_fleet, t)
    finally:
        t.close()
    assert ssh_fleet.connection_count(alias) - before == 1
    assert _wait_gone(pid)
    assert not Path(t._control_dir).exists()


@pytest.mark.parametrize("wait_for_login", [False, True])
def test_an_early_connection_never_used_is_closed(ssh_fleet, wait_for_login):
    # The deploy stopped before its first command (a bad artifact, Ctrl-C): close() ends the
    # login in progress, or the master it became.
    ssh_fleet.ensure_running()
    t = SshTransport(HostSpec(ssh_fleet.hosts[0].alias),
                     SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    t.open_early()
    pids = set()
    if wait_for_login:
        deadline = time.monotonic() + 10
        while not os.listdir(t._control_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.listdir(t._control_dir), "the master never came up"
        pids = _masters_of(ssh_fleet, t)
        assert pids
    t.close()
    assert all(_wait_gone(p) for p in pids)
    assert not _masters_of(ssh_fleet, t)
    assert not Path(t._control_dir).exists()


def test_an_early_connection_that_fails_is_reported_by_the_first_command(ssh_fleet):
    alias = ssh_fleet.hosts[1].alias
    t = SshTransport(HostSpec(alias), SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    try:
        with ssh_fleet.host_down(alias):
            t.open_early()
            with pytest.raises(HostError, match="could not connect: connection refused"):
                t.run("true")
    finally:
        t.close()


def _control_dirs() -> set[str]:
    return set(glob.glob("/tmp/swo-*"))


def test_a_failed_deploy_leaves_no_early_connection_behind(sshp: Project, ssh_fleet):
    sshp.ok("deploy", "test")
    first = {h: sshp.current(h) for h in sshp.target.hosts}
    masters_before, dirs_before = _our_masters(ssh_fleet), _control_dirs()
    counts = ssh_fleet.connection_counts()
    shutil.rmtree(sshp.app)
    sshp.app.mkdir()
    # --parallel 1: only the first host of the fleet connects while the artifact is read
    r = sshp.run("deploy", "test", "--parallel", "1")
    assert r.returncode == 2, r.stderr
    assert "is an empty directory" in r.stderr
    deadline = time.monotonic() + 5
    while _our_masters(ssh_fleet) - masters_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _our_masters(ssh_fleet) - masters_before
    assert not _control_dirs() - dirs_before
    for h in sshp.target.hosts:  # a login cut off may reach the log a moment later
        ssh_fleet.wait_sessions_ended(h)
    after = ssh_fleet.connection_counts()
    # web1 may have logged in before the empty artifact ended the deploy; the others never
    new = [after[h] - counts[h] for h in sshp.target.hosts]
    assert new[0] <= 1 and new[1:] == [0, 0], new
    # an unknown canary host is a usage error before any host is touched
    (sshp.app / "index.html").write_text("v2\n")
    r = sshp.run("deploy", "test", "--strategy", "canary", "--canary-hosts", "nope")
    assert r.returncode == 2, r.stderr
    assert ssh_fleet.connection_counts() == after
    for h in sshp.target.hosts:
        assert sshp.current(h) == first[h] and not sshp.locked(h)


@pytest.fixture
def frozen_host(ssh_fleet):
    """A host whose sshd is stopped: TCP connects, login never ends."""
    ssh_fleet.ensure_running()
    host = ssh_fleet.hosts[2]
    frozen = _descendants(host.pid)
    assert frozen
    # The listing can hold a process that is just ending (a previous deploy's detached
    # spare build, a closing session): it is gone, not frozen, and needs nothing.
    _signal(frozen, signal.SIGSTOP)
    try:
        yield host
    finally:
        _signal(frozen, signal.SIGCONT)


def _waiting_command(t: SshTransport) -> tuple[threading.Thread, list[BaseException]]:
    """t.run("true") in a thread (as a deploy's worker runs it); its error lands in the list."""
    errors: list[BaseException] = []

    def first_command() -> None:
        try:
            t.run("true")
        except BaseException as e:  # handed to the test
            errors.append(e)

    thread = threading.Thread(target=first_command)
    thread.start()
    return thread, errors


def test_a_second_ctrl_c_stops_a_login_in_progress(ssh_fleet, frozen_host):
    t = SshTransport(HostSpec(frozen_host.alias), SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    t.open_early()
    try:
        thread, errors = _waiting_command(t)
        time.sleep(0.5)
        started = time.monotonic()
        abort_running()  # what the second Ctrl-C does
        thread.join(timeout=5)
        assert not thread.is_alive() and time.monotonic() - started < 3
        assert len(errors) == 1 and isinstance(errors[0], Interrupted), errors
    finally:
        t.close()
    assert not _masters_of(ssh_fleet, t)


def test_closing_while_a_command_waits_for_its_login_runs_nothing(ssh_fleet, frozen_host):
    # The deploy's end (second Ctrl-C) closes the transports while a worker still waits for
    # its login: that worker must not go on to run its command over a connection of its own.
    t = SshTransport(HostSpec(frozen_host.alias), SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    t.open_early()
    thread, errors = _waiting_command(t)
    time.sleep(0.5)
    t.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Interrupted), errors
    with pytest.raises(Interrupted):
        t.run("true")
    assert not _masters_of(ssh_fleet, t) and not Path(t._control_dir).exists()


@pytest.fixture(scope="module")
def slow_login_fleet(make_ssh_fleet):
    """One host whose login hangs after the key exchange (a slow LDAP or PAM lookup): its
    AuthorizedKeysCommand sleeps. sshd runs it only from a root-owned path nobody else can
    write to, so not from /tmp."""
    d = Path(tempfile.mkdtemp(prefix="swo-test-", dir="/run"))
    d.chmod(0o755)
    cmd = d / "slow-keys"
    cmd.write_text("#!/bin/sh\nsleep 20\n")
    cmd.chmod(0o755)
    try:
        yield make_ssh_fleet(1, sshd_options=[f"AuthorizedKeysCommand {cmd}",
                                              "AuthorizedKeysCommandUser root",
                                              "AuthorizedKeysFile none"])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_an_early_login_that_hangs_is_cut_off(slow_login_fleet, monkeypatch):
    # ConnectTimeout covers the TCP connect and the key exchange only: a login that hangs
    # after them is cut off by our bound, connect_timeout + FIRST_COMMAND_LIMIT.
    monkeypatch.setattr(ssh_module, "FIRST_COMMAND_LIMIT", 1.0)
    options = SshOptions(ssh_config=slow_login_fleet.ssh_config, connect_timeout=2)
    t = SshTransport(HostSpec(slow_login_fleet.hosts[0].alias), options)
    t.connect()
    t.open_early()
    started = time.monotonic()
    try:
        with pytest.raises(HostError, match="could not connect: timed out"):
            t.run("true", timeout=600)
        assert time.monotonic() - started < 6  # 2 + 1 s, with room for a slow machine
    finally:
        t.close()
    assert not _masters_of(slow_login_fleet, t)


def test_the_first_command_after_an_early_login_is_bounded(ssh_fleet, monkeypatch):
    # A host that logs in but hangs opening a session is cut off as the first command that
    # opens a master would be: within FIRST_COMMAND_LIMIT, not the whole step timeout.
    ssh_fleet.ensure_running()
    monkeypatch.setattr(ssh_module, "FIRST_COMMAND_LIMIT", 1.0)
    t = SshTransport(HostSpec(ssh_fleet.hosts[0].alias),
                     SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    t.open_early()
    try:
        started = time.monotonic()
        with pytest.raises(HostError, match="timed out after 1 s"):
            t.run("sleep 30", timeout=600)
        assert time.monotonic() - started < 10
        assert t.run("sleep 1.5; echo later", timeout=600).stdout == "later\n"  # only the first
    finally:
        t.close()
