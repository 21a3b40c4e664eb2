"""Deploys as a host user that is not root, the usual production set-up, over real sshd.

rsync run by such a user sets no owners and only its own groups, and `cp -l` may only link
the files it owns (fs.protected_hardlinks): a redeploy must still clone and patch the live
release, send nothing for an artifact that did not change, and land the artifact exactly.

The hosts log in as `swo-deploy`, a system user this module adds when it is missing and
removes after (it needs root and useradd).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from project import Project, ssh_target
from sshd_harness import SshFleet, namespaces_supported, sshd_available
from test_clone_upload import redeploy_is_exact

USER = "swo-deploy"


@pytest.fixture(scope="module")
def host_user() -> Iterator[pwd.struct_passwd]:
    """The host login user; added for this module when missing, and removed after."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("adding a host user needs root and useradd")
    if not sshd_available() or not namespaces_supported():
        pytest.skip("needs sshd and per-host mount namespaces")
    try:
        existing = pwd.getpwnam(USER)
    except KeyError:
        existing = None
    if existing is not None:  # someone else's: left as it is
        yield existing
        return
    # Password "*": none valid, yet not a locked account ("!"), which sshd turns away even
    # with a key when it does not use PAM.
    subprocess.run(["useradd", "--system", "--create-home", "--home-dir", f"/var/lib/{USER}",
                    "--shell", "/bin/sh", "--password", "*", USER], check=True)
    try:
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["userdel", "--remove", USER], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def nonroot(tmp_path: Path, host_user: pwd.struct_passwd
            ) -> Iterator[tuple[Project, pwd.struct_passwd]]:
    user = host_user
    # Not under pytest's own temp dir (0700): sshd reads authorized_keys as the user.
    base = Path(tempfile.mkdtemp(prefix="swo-nonroot-", dir="/tmp"))
    base.chmod(0o755)
    try:
        with SshFleet(base, 2, user=USER) as fleet:
            for h in fleet.hosts:
                os.chown(h.root, user.pw_uid, user.pw_gid)  # what the hosts see as /srv/...
            target = ssh_target(fleet, "app", hosts=2)
            yield Project(tmp_path / "proj", target), user
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _owners(root: Path) -> set[tuple[int, int]]:
    return {(st.st_uid, st.st_gid) for st in (p.lstat() for p in root.rglob("*"))}


def test_a_host_user_that_is_not_root_deploys_redeploys_and_rolls_back(nonroot):
    p, user = nonroot
    (p.app / "ro").mkdir()
    (p.app / "ro" / "conf.txt").write_text("read-only\n")
    (p.app / "ro").chmod(0o555)  # the deploy user cannot write into it: a clone must
    (p.app / "run.sh").write_text("#!/bin/sh\necho ok\n")
    (p.app / "run.sh").chmod(0o755)
    r = p.ok("deploy", "test")
    cold = r.stdout + r.stderr  # a first release: nothing to hard-link from, nor said
    assert len(re.findall(r"uploaded: \d+ files \(", cold)) == 2 and "hard-linked" not in cold
    first = p.current("web1")
    for h in p.target.hosts:
        rel = p.root(h) / "releases" / first
        assert _owners(rel) == {(user.pw_uid, user.pw_gid)}, h  # not root's: not settable
        assert (rel / "ro").stat().st_mode & 0o777 == 0o555
    # The artifact's owner (root here) cannot be set on the host: that is no difference.
    r = p.ok("-vv", "deploy", "test")
    assert "as a clone of" in r.stderr
    assert len(re.findall(r"uploaded: 0 files changed", r.stdout + r.stderr)) == 2, r.stderr
    second = p.current("web1")
    assert second != first
    (p.app / "ro").chmod(0o755)  # let the shared test below write into it
    redeploy_is_exact(p, host_user=(user.pw_uid, user.pw_gid))
    live = {h: p.current(h) for h in p.target.hosts}
    p.ok("rollback", "test")
    for h in p.target.hosts:  # back to the release the helper drifted by hand
        assert p.current(h) == p.releases(h)[-2] != live[h]
    r = p.run("verify", "test")
    assert r.returncode == 1 and "added:    stray.txt" in r.stdout + r.stderr
