"""The artifact hash cache (hashcache.py) and the mtime in manifest entries."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from switchover import artifact, hashcache
from switchover import manifest as M

OLD = time.time() - 3600  # an hour ago: well clear of the racy window


def _tree(root: Path, mtime: float | None = OLD) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(b"\0" * 5000)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("sub/b.bin")
    (root / "skip.log").write_text("excluded\n")
    if mtime is not None:
        for p in (root / "a.txt", root / "sub" / "b.bin", root / "run.sh", root / "skip.log"):
            os.utime(p, (mtime, mtime))


def _backdate_ctimes(monkeypatch: pytest.MonkeyPatch, seconds: float = 60) -> None:
    """ctime cannot be set: pretend the cache was written `seconds` later instead."""
    real = time.time_ns
    monkeypatch.setattr(hashcache.time, "time_ns", lambda: real() + int(seconds * 1e9))


class Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real = hashcache.file_sha256

        def counting(path: str) -> str:
            self.paths.append(os.path.relpath(path))
            return real(path)

        monkeypatch.setattr(hashcache, "file_sha256", counting)
        monkeypatch.setattr(M, "file_sha256", counting)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "app"
    _tree(root)
    monkeypatch.chdir(root)
    _backdate_ctimes(monkeypatch)  # the tree's ctimes are "now": not trusted otherwise
    return root


def test_second_scan_of_unchanged_tree_reads_no_file(app: Path, monkeypatch) -> None:
    first = M.scan(app, ["*.log"], cache=True)
    count = Counter(monkeypatch)
    second = M.scan(app, ["*.log"], cache=True)
    assert count.paths == []
    assert second == first


def test_results_with_and_without_cache_are_identical(app: Path) -> None:
    plain = M.scan(app, ["*.log"])
    cold = M.scan(app, ["*.log"], cache=True)
    warm = M.scan(app, ["*.log"], cache=True)
    assert plain == cold == warm
    assert set(plain) == {"a.txt", "sub/b.bin", "run.sh", "link"}
    assert plain["run.sh"]["mode"] == "0755"
    assert plain["link"] == {"type": "link", "target": "sub/b.bin"}


def test_changed_content_with_pinned_mtime_is_rehashed(app: Path, monkeypatch) -> None:
    before = M.scan(app, [], cache=True)
    old = (app / "a.txt").stat()
    # The fixture shifted the clock past the racy window; without it, a rewrite within one
    # timestamp tick of the last would be exactly the racy case the window is there for.
    time.sleep(0.05)
    (app / "a.txt").write_text("omega\n")  # same size
    os.utime(app / "a.txt", ns=(old.st_atime_ns, old.st_mtime_ns))  # mtime pinned back
    new = (app / "a.txt").stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert new.st_ctime_ns != old.st_ctime_ns
    count = Counter(monkeypatch)
    after = M.scan(app, [], cache=True)
    assert count.paths == ["a.txt"]  # the ctime moved on
    assert after["a.txt"]["sha256"] != before["a.txt"]["sha256"]
    assert after["a.txt"]["sha256"] == M.scan(app, [])["a.txt"]["sha256"]


def test_racy_entries_are_rehashed(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "app"
    _tree(root, mtime=None)  # written just now: mtime and ctime within the racy window
    monkeypatch.chdir(root)
    M.scan(root, [], cache=True)
    count = Counter(monkeypatch)
    M.scan(root, [], cache=True)
    assert sorted(count.paths) == ["a.txt", "run.sh", "skip.log", "sub/b.bin"]


def test_a_recent_ctime_alone_makes_an_entry_racy(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "app"
    _tree(root)  # old mtimes, but the ctimes are now (utime itself changes the ctime)
    monkeypatch.chdir(root)
    M.scan(root, [], cache=True)
    count = Counter(monkeypatch)
    M.scan(root, [], cache=True)
    assert len(count.paths) == 4


@pytest.mark.parametrize("content", [
    b"", b"not json", b"[]", b'{"version": 99}', b'{"version": 1, "files": 3}',
    b'{"version": 1, "root": "/elsewhere", "scan_started_ns": 0, "files": {}}',
])
def test_corrupt_or_foreign_cache_file_is_ignored(app: Path, monkeypatch, content) -> None:
    expected = M.scan(app, [])
    path = hashcache.cache_file(app)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o600)
    count = Counter(monkeypatch)
    assert M.scan(app, [], cache=True) == expected
    assert len(count.paths) == 4  # every file read, nothing trusted
    assert json.loads(path.read_bytes())["version"] == hashcache.VERSION  # rewritten


def test_bad_entries_are_not_trusted(app: Path, monkeypatch) -> None:
    expected = M.scan(app, [], cache=True)
    path = hashcache.cache_file(app)
    doc = json.loads(path.read_bytes())
    doc["files"]["a.txt"][-1] = "0" * 63  # not a sha256
    doc["files"]["run.sh"][0] = "9"  # not an int
    path.write_text(json.dumps(doc))
    count = Counter(monkeypatch)
    assert M.scan(app, [], cache=True) == expected
    assert sorted(count.paths) == ["a.txt", "run.sh"]


def test_a_cache_file_others_could_write_is_ignored(app: Path, monkeypatch) -> None:
    M.scan(app, [], cache=True)
    hashcache.cache_file(app).chmod(0o666)
    count = Counter(monkeypatch)
    M.scan(app, [], cache=True)
    assert len(count.paths) == 4


def test_cache_file_is_private_and_holds_only_the_last_scan(app: Path) -> None:
    M.scan(app, [], cache=True)
    path = hashcache.cache_file(app)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.parent == hashcache.cache_dir("hashes")
    assert set(json.loads(path.read_bytes())["files"]) == {
        "a.txt", "sub/b.bin", "run.sh", "skip.log"}
    (app / "sub" / "b.bin").unlink()
    M.scan(app, ["*.log"], cache=True)
    assert set(json.loads(path.read_bytes())["files"]) == {"a.txt", "run.sh"}


def test_unwritable_cache_is_not_an_error(app: Path, monkeypatch, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SWITCHOVER_CACHE_DIR", str(blocker))
    assert M.scan(app, [], cache=True) == M.scan(app, [])


def test_replaced_file_with_same_stat_times_is_rehashed(app: Path, monkeypatch) -> None:
    M.scan(app, [], cache=True)
    old = (app / "a.txt").stat()
    (app / "new").write_text("other\n")
    os.utime(app / "new", ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(app / "new", app / "a.txt")  # a new inode under the old name
    count = Counter(monkeypatch)
    assert M.scan(app, [], cache=True)["a.txt"]["sha256"] == M.scan(app, [])["a.txt"]["sha256"]
    assert "a.txt" in count.paths


def test_file_entries_carry_mtime_seconds(app: Path) -> None:
    entries = M.scan(app, [])
    assert entries["a.txt"]["mtime"] == int(OLD)
    assert "mtime" not in entries["link"]


def test_touch_changes_neither_the_digest_nor_the_comparison(app: Path) -> None:
    before = M.scan(app, [], cache=True)
    os.utime(app / "a.txt", (OLD + 100, OLD + 100))
    after = M.scan(app, [], cache=True)
    assert after["a.txt"]["mtime"] != before["a.txt"]["mtime"]
    assert artifact.tree_digest(after) == artifact.tree_digest(before)
    assert artifact.prepare(app, []).sha256 == artifact.tree_digest(before)[0]
    # a manifest with mtimes against one without (older manifests, host listings)
    doc = M.build("r1", after, [], [])
    listing = {p: {k: v for k, v in e.items() if k != "mtime"} for p, e in before.items()}
    assert M.compare(doc, listing).clean
    assert M.compare(M.build("r0", listing, [], []), after).clean


def test_tarball_artifacts_use_no_cache(tmp_path: Path, monkeypatch) -> None:
    import tarfile

    src = tmp_path / "app"
    _tree(src)
    tgz = tmp_path / "app.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src, arcname="app")
    art = artifact.prepare(tgz, [])
    try:
        assert art.files == 5
    finally:
        art.cleanup()
    assert not hashcache.cache_dir("hashes").exists()
