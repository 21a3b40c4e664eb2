"""clonepatch: the host's listing, and what turns a clone of the live release into the
artifact (pure logic; the end-to-end behaviour is in tests/test_clone_upload.py)."""

from __future__ import annotations

import os

import pytest

from switchover.clonepatch import (
    Node,
    Owners,
    PlanCache,
    Unlistable,
    local_listing,
    parse_ids,
    parse_listing,
    plan,
)
from switchover.manifest import scan_tree

SEC = 1_700_000_000 * 10**9


def _entry(kind: str, mode: str, size: int, mtime: str, path: str, target: str = "",
           uid: int = 0, gid: int = 0) -> str:
    return "\0".join([kind, mode, str(size), mtime, str(uid), str(gid), path, target]) + "\0"


def test_the_hosts_listing_parses_every_kind_and_nanosecond_times():
    text = (_entry("d", "755", 4096, "1700000000.5000000000", "static")
            + _entry("f", "4755", 12, "1700000000.0000000010", "static/a b\tc.js")
            + _entry("l", "777", 9, "1700000001.0000000000", "link", "static/x")
            + _entry("f", "644", 0, "1700000000", "empty", uid=1000, gid=33))
    got = parse_listing(text)
    assert got == {
        "static": Node("d", 0o755, 0, SEC + 500_000_000),
        "static/a b\tc.js": Node("f", 0o4755, 12, SEC + 1),  # find prints 10 digits: ns then a 0
        "link": Node("l", 0, 0, SEC + 10**9, target="static/x"),
        "empty": Node("f", 0o644, 0, SEC, 1000, 33),
    }
    assert parse_listing("") == {}


@pytest.mark.parametrize("text", [
    _entry("f", "644", 1, "1700000000.0", "a\nb"),  # a line break the transport may alter
    _entry("f", "644", 1, "1700000000.0", "caf\ufffd"),  # not UTF-8 on the host
    _entry("f", "644", 1, "1700000000.0", "a")[:-3],  # cut short
    _entry("f", "6x4", 1, "1700000000.0", "a"),  # garbage
    _entry("f", "644", 1, "yesterday", "a"),
    _entry("f", "644", 1, "1700000000.0", ""),
    _entry("f", "644", 1, "1700000000.0", "../outside"),  # never under the clone
    _entry("f", "644", 1, "1700000000.0", "/etc/passwd"),
])
def test_a_listing_that_cannot_be_trusted_is_refused(text):
    with pytest.raises(Unlistable):
        parse_listing(text)


def _f(sha: str = "a", size: int = 10, mode: int = 0o644, mtime: int = SEC, uid: int = 0,
       gid: int = 0) -> tuple[Node, dict]:
    return (Node("f", mode, size, mtime, uid, gid),
            {"type": "file", "size": size, "sha256": sha, "mode": f"{mode:04o}"})


def _plan(local: dict, remote: dict, owners: Owners | None = None):
    # values: a Node (a directory or symlink) or (Node, manifest entry) for a file
    loc = {p: v if isinstance(v, Node) else v[0] for p, v in local.items()}
    rem = {p: v if isinstance(v, Node) else v[0] for p, v in remote.items()}
    new = {p: v[1] for p, v in local.items() if not isinstance(v, Node)}
    live = {p: v[1] for p, v in remote.items() if not isinstance(v, Node)}
    return plan(loc, rem, live, new, owners)


def test_unchanged_files_stay_and_every_directory_is_sent_for_its_modes_and_times():
    d = Node("d", 0o755, 0, SEC)
    p = _plan({"s": d, "s/a": _f(), "b": _f("b")},
              {"s": d, "s/a": _f(), "b": _f("b")})
    assert p.remove == []
    assert p.send == ["s"]


@pytest.mark.parametrize("change", [
    {"sha": "new"},  # same size and mtime, other content: the manifests tell
    {"mode": 0o755},
    {"mtime": SEC + 1},  # a nanosecond would do too
    {"size": 11, "sha": "new"},
])
def test_a_file_that_differs_in_content_or_metadata_is_sent_again(change):
    p = _plan({"a": _f(**change), "b": _f("b")}, {"a": _f(), "b": _f("b")})
    assert p.send == ["a"] and p.remove == []


def test_a_file_the_live_manifest_does_not_know_is_sent_again():
    # Same size and mtime on the host, but nobody knows what it holds (it appeared there).
    local = {"a": _f()}
    remote_node, _ = _f()
    p = plan({"a": local["a"][0]}, {"a": remote_node}, {}, {"a": local["a"][1]}, None)
    assert p.send == ["a"]


def test_what_the_artifact_lacks_is_removed_topmost_only():
    d = Node("d", 0o755, 0, SEC)
    p = _plan({"keep": _f()},
              {"keep": _f(), "old": d, "old/x": _f(), "old/y/z": _f(), "stray": _f(),
               "old-b": d, "old-b/c": _f(), "app.sock": Node("s")})
    assert p.remove == ["app.sock", "old", "old-b", "stray"]
    # nothing to send, yet one entry goes: with it rsync sets the root directory's mode and
    # times (the clone's are not the artifact's)
    assert p.send == ["keep"]
    assert _plan({"f": _f(), "d": d, "d/e": d}, {"f": _f(), "d": d, "d/e": d}).send == ["d", "d/e"]


def test_a_change_of_kind_is_removed_then_sent():
    d = Node("d", 0o755, 0, SEC)
    p = _plan({"was_file": d, "was_file/in": _f(), "was_dir": _f(), "was_link": _f()},
              {"was_file": _f(), "was_dir": d, "was_dir/in": _f(),
               "was_link": Node("l", target="x")})
    assert p.remove == ["was_dir", "was_file", "was_link"]
    assert p.send == ["was_dir", "was_file", "was_file/in", "was_link"]


def test_a_symlink_is_replaced_when_it_differs_never_updated():
    same, other = Node("l", target="a", mtime_ns=SEC), Node("l", target="b", mtime_ns=SEC)
    touched = Node("l", target="a", mtime_ns=SEC + 5)
    p = _plan({"same": same, "retarget": other, "touched": same, "new": same},
              {"same": same, "retarget": same, "touched": touched})
    assert p.remove == ["retarget", "touched"]
    assert p.send == ["new", "retarget", "touched"]


def test_owners_count_where_the_hosts_rsync_sets_them():
    d = Node("d", 0o755, 0, SEC)
    local = {"d": d, "a": _f(uid=501, gid=20), "b": _f(uid=0, gid=0)}
    remote = {"d": d, "a": _f(uid=1000, gid=1000), "b": _f(uid=0, gid=0)}
    assert _plan(local, remote, None).send == ["d"]
    # root there: local 501/20 become the host's ids of the same names, 1000/1000
    mapped = {"uids": {501: 1000}, "gids": {20: 1000}}
    assert _plan(local, remote, Owners(**mapped, root=True, groups=frozenset())).send == ["d"]
    unmapped = Owners(uids={}, gids={}, root=True, groups=frozenset())
    assert _plan(local, remote, unmapped).send == ["a", "d"]
    # another user: owners stay its own; a group only if it is one of the user's
    assert _plan(local, remote, Owners(uids={}, gids={}, root=False,
                                       groups=frozenset({1000}))).send == ["d"]
    assert _plan(local, remote, Owners(uids={}, gids={}, root=False,
                                       groups=frozenset({20, 1000}))).send == ["a", "d"]


def test_the_hosts_ids_are_read_from_its_answer():
    lines = ["G 1000 27 33", "u deploy 1001", "u ghost ", "g www-data 33", "g staff 50"]
    got = parse_ids(lines, {"deploy": 501, "ghost": 502}, {"www-data": 33, "staff": 20})
    assert got == Owners(uids={501: 1001}, gids={33: 33, 20: 50}, root=False,
                         groups=frozenset({1000, 27, 33}))
    assert parse_ids(["G 0", "root"], {}, {}).root


def test_the_artifacts_listing_follows_the_excludes_and_refuses_what_it_cannot_carry(tmp_path):
    def listing(exclude: list[str]) -> dict:
        scanned = scan_tree(root, exclude)  # the walk that makes the manifest, and only it
        return local_listing(scanned.stats, scanned.entries)

    root = tmp_path / "app"
    (root / "static" / "empty").mkdir(parents=True)
    (root / "static" / "a.js").write_text("a")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "debug.log").write_text("x")
    os.symlink("static/a.js", root / "link")
    os.symlink("static", root / "dirlink")
    got = listing([".git", "*.log"])
    assert sorted(got) == ["dirlink", "link", "static", "static/a.js", "static/empty"]
    assert got["link"].kind == "l" and got["link"].target == "static/a.js"
    assert got["dirlink"].kind == "l" and got["dirlink"].target == "static"
    assert got["static/a.js"].kind == "f" and got["static/a.js"].size == 1
    assert got["static/empty"].kind == "d"
    # A directory comes before what it holds (rsync's file list needs it made first).
    order = list(got)
    assert order.index("static") < order.index("static/a.js")
    (root / "bad\nname").write_text("x")
    with pytest.raises(Unlistable):
        listing([])
    (root / "bad\nname").unlink()
    os.mkfifo(root / "fifo")
    with pytest.raises(Unlistable):
        listing([])


def test_a_plan_is_made_once_per_listing():
    cache = PlanCache()
    made = []

    def make():
        made.append(1)
        return plan({}, {}, {}, {}, None)

    assert cache.get(("live", "listing"), make) is cache.get(("live", "listing"), make)
    cache.get(("live", "other listing"), make)
    assert len(made) == 2


def test_an_artifact_without_its_scans_stats_is_not_listed_as_empty(tmp_path):
    # An empty listing would plan the removal of every file of the clone.
    root = tmp_path / "app"
    root.mkdir()
    (root / "a.txt").write_text("a")
    scanned = scan_tree(root, [])
    with pytest.raises(Unlistable):
        local_listing({}, scanned.entries)
