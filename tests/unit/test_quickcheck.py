"""Which files rsync's quick check could get wrong, the local manifest copies, and ids."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime

import pytest

from switchover import sentmanifests
from switchover.quickcheck import suspects, usable
from switchover.releases import choose_release_id


def f(sha: str, size: int = 10, mtime: int | None = 100) -> dict:
    e = {"type": "file", "size": size, "mode": "0644", "sha256": sha}
    if mtime is not None:
        e["mtime"] = mtime
    return e


def test_only_same_size_same_second_content_changes_are_suspects():
    live = {"same": f("a"), "pinned": f("a"), "grown": f("a"), "touched": f("a"),
            "gone": f("a"), "was_link": {"type": "link", "target": "x"},
            "no_mtime": f("a", mtime=None)}
    new = {"same": f("a"), "pinned": f("b"), "grown": f("b", size=11),
           "touched": f("b", mtime=101), "new": f("b"), "was_link": f("b"), "no_mtime": f("b"),
           "link": {"type": "link", "target": "y"}}
    # grown/touched: rsync sees the size or mtime change; new/was_link: nothing to link to;
    # no_mtime: an old manifest cannot rule the quick check's mistake out
    assert suspects(live, new) == ["no_mtime", "pinned"]


def test_quick_check_needs_a_live_manifest_with_hashes():
    assert not usable(None, {"a": f("a")})
    assert usable({"a": f("a")}, {"a": f("b")})
    assert not usable({"a": {"type": "file", "size": 1}}, {"a": f("b")})


def test_manifest_copies_round_trip_and_are_never_trusted_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHOVER_CACHE_DIR", str(tmp_path))
    data = json.dumps({"files": {"a": f("a")}}).encode()
    digest = sentmanifests.store(data)
    assert digest == hashlib.sha256(data).hexdigest()
    path = tmp_path / "manifests" / f"{digest}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sentmanifests.load(digest) == {"a": f("a")}
    assert sentmanifests.load(None) is None
    assert sentmanifests.load("0" * 64) is None  # never stored
    path.write_bytes(data.replace(b'"a"', b'"b"'))  # damaged: digest no longer matches
    assert sentmanifests.load(digest) is None
    bad = b"not json"
    bad_digest = hashlib.sha256(bad).hexdigest()
    (tmp_path / "manifests" / f"{bad_digest}.json").write_bytes(bad)
    assert sentmanifests.load(bad_digest) is None


def test_manifest_copies_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHOVER_CACHE_DIR", str(tmp_path))
    digests = []
    for i in range(sentmanifests.KEEP + 5):
        digests.append(sentmanifests.store(json.dumps({"files": {}, "n": i}).encode()))
        p = tmp_path / "manifests" / f"{digests[-1]}.json"
        os.utime(p, (1000 + i, 1000 + i))  # store order, whatever the clock's resolution
    left = {p.stem for p in (tmp_path / "manifests").glob("*.json")}
    assert left == set(digests[-sentmanifests.KEEP:])


def test_the_newest_copy_is_the_one_stored_or_used_last(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHOVER_CACHE_DIR", str(tmp_path))
    assert sentmanifests.newest() is None  # no cache yet
    first = sentmanifests.store(b'{"files": {}, "n": 1}')
    second = sentmanifests.store(b'{"files": {}, "n": 2}')
    for age, digest in ((2000, first), (1000, second)):
        os.utime(tmp_path / "manifests" / f"{digest}.json", (age, age))
    assert sentmanifests.newest() == first
    assert sentmanifests.load(second) == {}  # a use makes it the newest
    assert sentmanifests.newest() == second


def test_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SWITCHOVER_CACHE_DIR", str(blocker))  # a file, not a dir
    assert sentmanifests.store(b"{}") == hashlib.sha256(b"{}").hexdigest()
    assert sentmanifests.load(hashlib.sha256(b"{}").hexdigest()) is None


@pytest.mark.parametrize(("used", "expected"), [
    (set(), "20260102_000000"),
    ({"20260101_000000", "not-an-id"}, "20260102_000000"),
    ({"20260102_000000"}, "20260102_000000_02"),  # taken
    ({"20260103_000000"}, "20260103_000000_02"),  # a newer id (a clock ahead of ours)
])
def test_proposed_release_id_is_kept_unless_a_host_rules_it_out(used, expected):
    now = datetime(2026, 1, 2, tzinfo=UTC)  # the clock of the deploy that proposed it
    assert choose_release_id("20260102_000000", used, now) == expected


def test_files_under_a_directory_that_is_a_link_in_the_live_release_are_suspects():
    # live: vendor -> vendor-1.2 (rsync finds the basis for vendor/x.js through that link)
    live = {"vendor": {"type": "link", "target": "vendor-1.2"}, "vendor-1.2/x.js": f("a")}
    new = {"vendor/x.js": f("b"), "vendor/sub/y.js": f("c"), "other/x.js": f("b")}
    assert suspects(live, new) == ["vendor/sub/y.js", "vendor/x.js"]


@pytest.mark.parametrize(("patterns", "ok"), [
    ((), True),
    ((".git", "*.log", "node_modules", "/build", "/b*", "[ab]?.tmp"), True),
    (("logs/*.log",), False),  # rsync's * stops at '/', fnmatch's does not
    (("tmp/",), False),  # rsync: directories only
    (("**/cache",), False),
    (("+ keep",), False),
])
def test_quick_check_only_with_exclude_patterns_rsync_reads_the_same_way(patterns, ok):
    assert usable({"a": f("a")}, {"a": f("b")}, patterns) is ok


def test_quick_check_needs_sizes_too():
    assert not usable({"a": {"type": "file", "sha256": "a"}}, {"a": f("b")})


def test_manifest_bytes_are_sorted_json_and_any_name_round_trips(tmp_path, monkeypatch):
    from switchover import manifest as M

    monkeypatch.setenv("SWITCHOVER_CACHE_DIR", str(tmp_path))
    files = {"z.txt": f("a"), "caf\u00e9": f("b"), "a/b": {"type": "link", "target": "../z"}}
    doc = M.build("20260101_000000", files, [".env"], ["log"])
    data = M.encode(doc)
    assert data.endswith(b"\n") and json.loads(data) == doc
    assert list(json.loads(data)) == sorted(doc)
    assert list(json.loads(data)["files"]) == sorted(files)
    assert data.isascii()
    # A name with a line separator in it: still one line (verify reads manifests as text)
    sep = {**files, "a\u2028b.txt": f("d")}
    sep_data = M.encode({**doc, "files": sep})
    assert sep_data.isascii() and sep_data.count(b"\n") == 1
    assert M.decode(sep_data)["files"] == sep
    # A name that is not UTF-8 (a surrogate in Python) still encodes, and reads back as is
    odd = {**files, b"caf\xe9".decode("utf-8", "surrogateescape"): f("c")}
    odd_data = M.encode({**doc, "files": odd})
    assert M.decode(odd_data)["files"] == odd
    assert sentmanifests.load(sentmanifests.store(odd_data)) == odd
