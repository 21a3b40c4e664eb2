"""Upload by cloning the live release on the host and patching the clone.

`rsync --link-dest` of a whole tree makes the host stat and link every file through
rsync's protocol: ~160 ms of host CPU for 2000 files here, on every host, on every deploy,
for a 1% change. A clone makes the same links in one `cp -PRl` (~35 ms), and what the new
artifact changes is then known from two listings:

- the clone's, made on the host by GNU `find -printf` right after the copy (so it is the
  live tree as it is now, drift made by hand included), and
- the artifact's, from the walk that made its manifest (manifest.scan_tree),

plus the live release's manifest (what each live file contained when it was uploaded),
which tells content changes that keep size and mtime (quickcheck.py) from none.

The patch: remove what the artifact does not have (and what changes kind, and symlinks
to be replaced), then one `rsync --files-from --ignore-times` of every directory and of
every file that differs. rsync writes each file to a temporary name and renames it: a file
of the clone is replaced, never written in place, so the live release, which shares the
clone's inodes, is never touched. Content changed by hand on the host with size and mtime
kept is not seen (as rsync's quick check would not see it).

What cannot be listed faithfully falls back to the whole-tree rsync: names that are not
UTF-8 or hold a newline or carriage return, special files in the artifact, a host without
GNU find or `cp -l`. Pure logic except `names`, which reads this machine's user database.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

FIELDS = 8  # per entry of the host's listing: kind mode size mtime uid gid path target


class Node(NamedTuple):
    """One entry of a tree, as rsync -a would set it."""

    kind: str  # "f" file, "d" directory, "l" symlink
    mode: int = 0  # permission bits (files and directories)
    size: int = 0  # files
    mtime_ns: int = 0
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlinks


@dataclass
class Patch:
    remove: list[str] = field(default_factory=list)  # from the clone, before the send
    send: list[str] = field(default_factory=list)  # with rsync, in this order


class PlanCache:
    """Plans by what they were made from: hosts on one live release list the same clone
    (same files, same times), and 50 of them need not parse and plan it 50 times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: dict[Hashable, Patch] = {}

    def get(self, key: Hashable, make: Callable[[], Patch]) -> Patch:
        with self._lock:
            found = self._plans.get(key)
        if found is None:
            found = make()  # two hosts may make the same plan at once: it is the same plan
            with self._lock:
                self._plans[key] = found
        return found


class Unlistable(ValueError):
    """A tree this module cannot list faithfully: use the whole-tree rsync."""


def _faithful(path: str) -> bool:
    # Paths travel as text: a newline or carriage return (normalised by the transport) or a
    # name that is not UTF-8 (surrogates here) would not survive the trip.
    if "\n" in path or "\r" in path:
        return False
    try:
        path.encode()
    except UnicodeEncodeError:
        return False
    return True


def _node(st: os.stat_result, target: str = "") -> Node:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        kind = "l"
    elif stat.S_ISDIR(mode):
        kind = "d"
    elif stat.S_ISREG(mode):
        kind = "f"
    else:
        raise Unlistable("a special file (device, fifo or socket)")
    return Node(kind, stat.S_IMODE(mode) if kind != "l" else 0,
                st.st_size if kind == "f" else 0, st.st_mtime_ns, st.st_uid, st.st_gid, target)


def local_listing(stats: Mapping[str, os.stat_result],
                  entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Node]:
    """The artifact's listing, from its scan (manifest.scan_tree: the entries and the
    lstat of each, after excludes); no I/O.

    Not root itself: rsync given "." in a file list copies the whole top level (its --dirs
    rule), so the release directory keeps the live one's mode and times.
    """
    if not stats.keys() >= entries.keys():  # an artifact made without its scan's stats
        raise Unlistable("the artifact's scan kept no stats")
    out: dict[str, Node] = {}
    for rel, st in stats.items():
        if not _faithful(rel):
            raise Unlistable(f"a name this listing cannot carry: {rel!r}")
        target = entries[rel]["target"] if stat.S_ISLNK(st.st_mode) else ""
        out[rel] = _node(st, target)
    return out


def parse_listing(text: str) -> dict[str, Node]:
    """The host's listing: FIELDS NUL-terminated fields per entry (commands.clone_release)."""
    # A name that is not UTF-8 arrives with U+FFFD in it; a carriage return as a newline.
    if "\n" in text or "\ufffd" in text:
        raise Unlistable("a name this listing cannot carry (not UTF-8, or a line break)")
    parts = text.split("\0")
    if parts and parts[-1] == "":
        parts.pop()
    if len(parts) % FIELDS:
        raise Unlistable("the host's listing is cut short")
    out: dict[str, Node] = {}
    try:
        for kind, mode, size, mtime, uid, gid, path, target in zip(
                *(parts[i::FIELDS] for i in range(FIELDS)), strict=True):
            if kind == "f":
                out[path] = Node("f", int(mode, 8), int(size), _ns(mtime), int(uid), int(gid))
            elif kind == "d":
                out[path] = Node("d", int(mode, 8), 0, _ns(mtime), int(uid), int(gid))
            elif kind == "l":
                out[path] = Node("l", 0, 0, _ns(mtime), int(uid), int(gid), target)
            else:  # a socket or fifo left by the app: never in an artifact listed here
                out[path] = Node(kind)
    except ValueError:
        raise Unlistable("an entry of the host's listing does not parse") from None
    for path in out:
        # find prints names under the clone: never empty, absolute or going up
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise Unlistable(f"an entry of the host's listing is not under the clone: {path!r}")
    return out


def check_reset(remote: Mapping[str, Node]) -> None:
    """Every directory of a clone must be writable by its user and at time 0, as the clone
    script leaves them (commands._RESET_DIRS): rsync then sets each one's mode and time. A
    spare clone changed by hand since it was made would not be: such a clone is not patched
    (the whole tree is sent)."""
    for path, n in remote.items():
        if n.kind == "d" and (n.mode & 0o700 != 0o700 or n.mtime_ns != 0):
            raise Unlistable("a directory of the clone is not as the clone script leaves it"
                             f" (writable, at time 0): {path!r}")


def _ns(stamp: str) -> int:
    """find's %T@ ("1732871234.1234567890") as nanoseconds."""
    sec, _, frac = stamp.partition(".")
    if not sec.lstrip("-").isdigit() or (frac and not frac.isdigit()):
        raise ValueError(stamp)
    return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])


@dataclass(frozen=True)
class Owners:
    """What the host's rsync does with owners: as root it sets owners and groups, by name
    (a local id without a name, or with a name the host does not know, stays the number);
    as another user it sets a file's group only if it is one of that user's groups."""

    uids: Mapping[int, int]  # local id -> the host's id of the same name
    gids: Mapping[int, int]
    root: bool
    groups: frozenset[int]  # the host user's groups

    def differ(self, n: Node, r: Node) -> bool:
        """Whether rsync would give `n` other owners than the clone's `r` has."""
        gid = self.gids.get(n.gid, n.gid)
        if self.root:
            return (self.uids.get(n.uid, n.uid), gid) != (r.uid, r.gid)
        return gid in self.groups and gid != r.gid


def names(local: Mapping[str, Node]) -> tuple[dict[str, int], dict[str, int]]:
    """The local user and group names the tree's entries carry, with their local ids."""
    users: dict[str, int] = {}
    groups: dict[str, int] = {}
    for uid in {n.uid for n in local.values()}:
        with contextlib.suppress(KeyError):
            users[pwd.getpwuid(uid).pw_name] = uid
    for gid in {n.gid for n in local.values()}:
        with contextlib.suppress(KeyError):
            groups[grp.getgrgid(gid).gr_name] = gid
    return users, groups


def parse_ids(lines: list[str], users: Mapping[str, int], groups: Mapping[str, int]) -> Owners:
    """The ids section of commands.clone_release: "G ID ..." (the user's groups), "root",
    "u NAME ID" / "g NAME ID" (ID empty where the host has no such name)."""
    uids: dict[int, int] = {}
    gids: dict[int, int] = {}
    member: frozenset[int] = frozenset()
    root = False
    for line in lines:
        if line == "root":
            root = True
            continue
        kind, _, rest = line.partition(" ")
        if kind == "G":
            member = frozenset(int(g) for g in rest.split() if g.isdigit())
            continue
        name, _, value = rest.rpartition(" ")
        if not value.isdigit():
            continue
        if kind == "u" and name in users:
            uids[users[name]] = int(value)
        elif kind == "g" and name in groups:
            gids[groups[name]] = int(value)
    return Owners(uids, gids, root, member)


def plan(local: Mapping[str, Node], remote: Mapping[str, Node],
         live_files: Mapping[str, Mapping[str, Any]], new_files: Mapping[str, Mapping[str, Any]],
         owners: Owners | None) -> Patch:
    """What turns the clone (`remote`) into the artifact (`local`).

    `live_files` / `new_files`: the live release's manifest and the artifact's (sha256 per
    file). `owners`: what the host's rsync does with owners (None: leave them alone).
    Nothing is ever empty to send: the root directory's mode and times are set with the
    first entry (see transport.base.files_from), and the clone's are not the artifact's.
    """
    patch = Patch()
    gone: list[str] = []
    for path, r in remote.items():
        n = local.get(path)
        if n is None or n.kind != r.kind or (n.kind == "l" and _differs(n, r, owners)):
            # A symlink is replaced, not updated: rsync would set its times in place, on an
            # inode the clone shares with the live release.
            gone.append(path)
    # Removing a directory removes what is under it: list only the topmost.
    tops: set[str] = set()
    for path in sorted(gone, key=lambda p: p.count("/")):
        if not _under(path, tops):
            tops.add(path)
    patch.remove = sorted(tops)
    removed = set(gone)
    for path in sorted(local):
        n = local[path]
        r = remote.get(path)
        if (n.kind == "d" or r is None or path in removed or (tops and _under(path, tops))
                or (n.kind == "f" and _file_differs(n, r, owners, live_files.get(path),
                                                    new_files.get(path)))):
            patch.send.append(path)
    if not patch.send and local:
        # Nothing changed: still one entry, so that the root directory gets its attributes.
        patch.send.append(min(local, key=lambda p: (local[p].kind != "d", p.count("/"), p)))
    return patch


def _differs(n: Node, r: Node, owners: Owners | None) -> bool:
    if (n.mode, n.size, n.mtime_ns, n.target) != (r.mode, r.size, r.mtime_ns, r.target):
        return True
    return owners is not None and owners.differ(n, r)


def _file_differs(n: Node, r: Node, owners: Owners | None, live: Mapping[str, Any] | None,
                  new: Mapping[str, Any] | None) -> bool:
    return _differs(n, r, owners) or not _same_content(live, new)


def _same_content(live: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> bool:
    """Whether the clone's file holds the artifact's content, by the manifests' sha256. A
    file the live manifest does not know (it appeared on the host) is sent again."""
    if live is None or new is None or live.get("type") != "file":
        return False
    sha = live.get("sha256")
    return isinstance(sha, str) and sha == new.get("sha256")


def _under(path: str, tops: set[str]) -> bool:
    parts = path.split("/")
    return any("/".join(parts[:i]) in tops for i in range(1, len(parts)))
