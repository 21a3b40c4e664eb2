"""The one walk of a directory artifact (manifest.scan_tree) and what is refused from it."""

from __future__ import annotations

import os
import subprocess

import pytest

from switchover import manifest as M
from switchover.artifact import prepare
from switchover.errors import ArtifactError


def test_a_directory_that_cannot_be_read_fails_the_scan_not_the_deploy_in_part(tmp_path,
                                                                             monkeypatch):
    # A tree scanned in part would be deployed in part: the walk's errors are not skipped.
    with pytest.raises(FileNotFoundError):
        M.scan_tree(tmp_path / "gone", [])
    # Root reads every directory, so the refusal of one is simulated where it happens.
    app = tmp_path / "app"
    (app / "secret").mkdir(parents=True)
    (app / ".git" / "objects").mkdir(parents=True)
    (app / "index.html").write_text("hi")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith(("secret", "objects")):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ArtifactError, match=r"cannot read secret: Permission denied"):
        prepare(app, [".git"])
    # What is excluded is not uploaded: an unreadable directory there is not missed.
    assert set(prepare(app, [".git", "secret"]).entries) == {"index.html"}


@pytest.mark.parametrize("exclude", [["cache/", "tool/"], ["cache", "tool"], ["*"]])
def test_an_exclude_never_hides_a_hostile_entry(tmp_path, exclude):
    # `excluded` and rsync need not agree on every pattern (rsync's "dir/" matches
    # directories only): whatever the excludes, a hostile entry is refused.
    app = tmp_path / "app"
    app.mkdir()
    (app / "index.html").write_text("hi")
    os.symlink("/etc/passwd", app / "cache")
    with pytest.raises(ArtifactError, match="cache: link to absolute path"):
        prepare(app, exclude)
    (app / "cache").unlink()
    (app / "tool").write_text("#!/bin/sh\n")
    (app / "tool").chmod(0o4755)
    with pytest.raises(ArtifactError, match="tool: setuid/setgid bit"):
        prepare(app, exclude)
    (app / "tool").unlink()
    (app / "deep" / "er").mkdir(parents=True)
    subprocess.run(["mkfifo", str(app / "deep" / "er" / "pipe")], check=True)
    with pytest.raises(ArtifactError, match="FIFO or socket"):
        prepare(app, [*exclude, "deep"])


def test_excluded_entries_are_walked_for_the_checks_only(tmp_path):
    app = tmp_path / "app"
    (app / "static").mkdir(parents=True)
    (app / "static" / "a.js").write_text("a")
    (app / ".git" / "refs").mkdir(parents=True)
    (app / ".git" / "HEAD").write_text("ref")
    (app / "debug.log").write_text("x")
    scanned = M.scan_tree(app, [".git", "*.log"])
    assert set(scanned.entries) == {"static/a.js"}
    assert set(scanned.stats) == {"static", "static/a.js"}
    assert set(scanned.excluded_stats) == {".git", ".git/HEAD", ".git/refs", "debug.log"}
