"""`verify ENV` over real sshd hosts: a clean release passes (shared links and excluded
files are no drift); tampering is reported as added, missing and modified files, exit 1."""

from __future__ import annotations

import pytest
from project import Project, ssh_target


@pytest.fixture
def sshp(ssh_fleet, tmp_path) -> Project:
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    return Project(tmp_path / "proj", ssh_target(ssh_fleet, tmp_path.name))


def test_verify_reports_drift_per_host(sshp: Project):
    p = sshp
    text = p.config.read_text().replace(
        '[artifact]\npath = "app"\n', '[artifact]\npath = "app"\nexclude = ["*.log"]\n')
    text += '[shared]\nfiles = ["config/.env"]\ndirs = ["storage"]\n'
    p.config.write_text(text)
    (p.app / "config").mkdir()
    (p.app / "config" / ".env").write_text("A=1\n")
    (p.app / "storage").mkdir()
    (p.app / "storage" / "seed.txt").write_text("seed\n")
    (p.app / "debug.log").write_text("not deployed\n")
    (p.app / "bin").mkdir()
    (p.app / "bin" / "run").write_text("#!/bin/sh\n")
    (p.app / "bin" / "run").chmod(0o755)
    (p.app / "latest").symlink_to("index.html")
    p.ok("deploy", "test")
    doc = p.json("verify", "test")
    assert doc["status"] == "ok"
    assert [h["status"] for h in doc["hosts"]] == ["ok", "ok"]

    web1, web2 = p.target.hosts
    live = p.root(web1) / "releases" / p.current(web1)
    (live / "index.html").write_text("defaced\n")
    (live / "static" / "asset3.js").unlink()
    (live / "backdoor.php").write_text("<?php")
    (live / "bin" / "run").chmod(0o777)
    (p.root(web1) / "shared" / "storage" / "upload.txt").write_text("user data is not drift")
    doc = p.json("verify", "test", code=1)
    assert doc["status"] == "drift"
    rows = {h["host"]: h for h in doc["hosts"]}
    assert rows[web2]["status"] == "ok"
    bad = rows[web1]
    assert bad["status"] == "drift"
    assert bad["added"] == ["backdoor.php"] and bad["missing"] == ["static/asset3.js"]
    changes = {m["path"]: m["change"] for m in bad["modified"]}
    assert set(changes) == {"index.html", "bin/run"}
    assert "content" in changes["index.html"] and "mode 0755 -> 0777" in changes["bin/run"]
    r = p.run("verify", "test")
    assert r.returncode == 1
    assert f"{web1}: release" in r.stderr and "backdoor.php" in r.stderr
