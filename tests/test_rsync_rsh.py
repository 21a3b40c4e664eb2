"""rsync's remote shell run unwaited (transport.base.unwaited_rsh), with real rsync and a
stand-in for ssh that runs the remote side locally."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from switchover.transport.base import RSH_EXIT, rsh_status, unwaited_rsh

# Skips ssh's options up to the host name, then runs the remote command here.
FAKE_SSH = """#!/bin/sh
while [ "$1" != fakehost ]; do shift; done
shift
{body}
"""


def _fake_ssh(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bin dir" / "fake'ssh"  # a space and a quote: the quoting holds
    path.parent.mkdir()
    path.write_text(FAKE_SSH.format(body=body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _rsync(rsh: str, src: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rsync", "-a", "-s", "-e", rsh, f"{src}/", f"fakehost:{dest}/"],
                          capture_output=True, text=True, timeout=60)


def test_an_unwaited_remote_shell_carries_the_transfer_both_ways(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("hello\n")
    (src / "big.bin").write_bytes(bytes(range(256)) * 4096)
    ssh = _fake_ssh(tmp_path, 'exec "$@"')
    cp = _rsync(unwaited_rsh([str(ssh), "-o", "Opt=with space"]), src, tmp_path / "dest")
    rc, stderr = rsh_status(cp.returncode, cp.stderr)
    assert (rc, stderr) == (0, ""), cp.stderr
    assert (tmp_path / "dest" / "sub" / "a.txt").read_text() == "hello\n"
    assert (tmp_path / "dest" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_the_remote_shells_failure_is_reported_as_rsync_would(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("x\n")
    ssh = _fake_ssh(tmp_path, "echo 'ssh: connect to host fakehost: Connection refused' >&2\n"
                              "exit 255")
    cp = _rsync(unwaited_rsh([str(ssh)]), src, tmp_path / "dest")
    assert RSH_EXIT + "255" in cp.stderr  # rsync itself saw a stream that closed
    rc, stderr = rsh_status(cp.returncode, cp.stderr)
    assert rc == 255  # ssh's own code: the link was lost (retried)
    assert "Connection refused" in stderr and RSH_EXIT not in stderr
    # rsync with ssh as its own child gives 255 too, or 12 (stream closed) when it sees
    # the closed stream before it reaps ssh: both are network failures (retried).
    plain = _rsync(" ".join([str(ssh).replace("'", "'\"'\"'").join("''")]), src,
                   tmp_path / "dest")
    assert plain.returncode in (12, 255)


def test_rsh_status_folds_the_shells_exit_into_rsyncs():
    line = f"\n{RSH_EXIT}255\n"  # as the wrapper prints it
    assert rsh_status(0, "") == (0, "")
    assert rsh_status(23, "partial\n") == (23, "partial\n")
    assert rsh_status(12, f"closed\n{line}") == (255, "closed\n")
    assert rsh_status(12, f"no newline{line}") == (255, "no newline")
    assert rsh_status(0, f"\n{RSH_EXIT}127\n") == (127, "")  # rsync's own code was 0
    assert rsh_status(30, f"\n{RSH_EXIT}1\n") == (30, "")  # its own is the larger
    assert rsh_status(-9, line) == (-9, "")  # killed by us: stays killed, not retried
    assert rsh_status(1, f"\n{RSH_EXIT}x\n") == (1, f"\n{RSH_EXIT}x\n")  # not ours
