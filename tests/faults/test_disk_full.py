"""A host whose disk fills during the upload: exit 3 naming the host and its free space,
`current` untouched, the staged tree removed, and a later (smaller) deploy works.

deploy_to is a 2 MB tmpfs: over SSH mounted inside web1's own mount namespace (nsenter; the
test reads it through /proc/<sshd>/root), locally mounted in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from project import Project, Target, local_target
from sshd_harness import _descendants

from faults.kit import check_invariants


def _mount(argv_prefix: list[str], where: str) -> None:
    subprocess.run([*argv_prefix, "mount", "-t", "tmpfs", "-o", "size=2m", "swo-full", where],
                   check=True, capture_output=True, timeout=30)


@pytest.fixture(params=["ssh", "local"])
def small_disk(request, tmp_path) -> Iterator[Project]:
    if os.geteuid() != 0 or not shutil.which("nsenter"):
        pytest.skip("needs root and nsenter to mount a small filesystem")
    if request.param == "local":
        target = local_target(tmp_path)
        Path(target.deploy_to).mkdir()
        prefix: list[str] = []
        where = target.deploy_to
    else:
        fleet = request.getfixturevalue("ssh_fleet")
        if not fleet.shared_path:
            pytest.skip("per-host mount namespaces unavailable")
        fleet.ensure_running()
        host = fleet["web1"]
        sshd = _descendants(host.pid)[0]  # the namespace's init: sshd itself
        name = tmp_path.name
        (host.root / name).mkdir()
        where = f"{fleet.remote_root}/{name}"
        prefix = ["nsenter", "-t", str(sshd), "-m", "--"]
        target = Target("ssh", where, {"web1": Path(f"/proc/{sshd}/root{where}")},
                        f'hosts = ["web1"]\nssh_config = "{fleet.ssh_config}"\n', fleet)
    _mount(prefix, where)
    try:
        yield Project(tmp_path / "proj", target)
    finally:
        subprocess.run([*prefix, "umount", "-l", where], capture_output=True, timeout=30)


def test_disk_full_during_upload(small_disk: Project):
    p = small_disk
    host = p.target.hosts[0]
    p.ok("deploy", "test")
    first = p.current()
    (p.app / "big.bin").write_bytes(os.urandom(3 << 20))  # more than the whole filesystem
    r = p.run("deploy", "test")
    assert r.returncode == 3, r.stderr
    assert f"{host}: " in r.stderr and "failed: no space left on the host" in r.stderr
    assert "free of 2.1 MB" in r.stderr and "(df)" in r.stderr
    assert "current unchanged" in r.stdout + r.stderr
    check_invariants(p, {host: first})
    assert p.releases() == [first]
    assert not list((p.root() / ".switchover" / "staging").iterdir())  # staged tree removed
    assert not p.locked()
    assert p.events()[-1] == "deploy_failed"
    (p.app / "big.bin").unlink()
    (p.app / "index.html").write_text("v2\n")
    p.ok("deploy", "test")
    assert p.live_file("index.html") == "v2\n"
    check_invariants(p)
