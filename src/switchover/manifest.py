"""Release manifests: what a release held when it was uploaded, and drift against it.

A manifest lists every file (path, size, mode, sha256, mtime) and symlink (path, target)
of the uploaded tree, computed here from the local artifact. It is stored on each host
under .switchover/manifests/<release>.json: outside the release, so an app never serves or
trips over it, and removed only together with its release. `verify ENV` lists the live
release on each host (hashing there) and compares. Shared items ([shared] files and dirs,
linked in at finalize) are expected differences, not drift. mtime is a hint for the next
upload (quickcheck.py), never compared: older manifests and the hosts' listings lack it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from switchover.hashcache import HashCache, file_sha256
from switchover.releases import utc_now_iso
from switchover.transport.local import excluded

VERSION = 1


@dataclass
class TreeScan:
    """One walk of a tree: the manifest's entries, and the lstat of every entry (the
    directories and special files too), so that the artifact checks and the clone listing
    need no walk of their own."""

    entries: dict[str, dict[str, Any]]
    stats: dict[str, os.stat_result]  # what is uploaded; a directory before what it holds
    # What the excludes leave out: not uploaded, but still refused if hostile (an exclude
    # may mean less to rsync than to `excluded`: a pattern must never hide a bad entry).
    excluded_stats: dict[str, os.stat_result]


def scan(root: Path, exclude: Sequence[str], *,
         cache: bool = False) -> dict[str, dict[str, Any]]:
    """Every file and symlink under root (after excludes), keyed by relative path.

    A file entry also has `mtime` (whole seconds): what rsync's quick check compares, for
    quickcheck.py. It is not part of the release's identity: tree_digest, compare and the
    host's listing leave it out. `cache`: reuse the sha256 of files unchanged since the
    last scan of this directory (hashcache.py); pointless for a tree made afresh each time.
    """
    return scan_tree(root, exclude, cache=cache).entries


def scan_tree(root: Path, exclude: Sequence[str], *, cache: bool = False) -> TreeScan:
    """`scan`, keeping every entry's lstat too, excluded ones included (excluded
    directories are walked, nothing in them is read). Special files (devices, FIFOs,
    sockets) are never opened. OSError if a directory to upload cannot be read: a tree
    scanned in part would deploy in part."""
    hashes = HashCache(root) if cache else None
    entries: dict[str, dict[str, Any]] = {}
    stats: dict[str, os.stat_result] = {}
    left_out: dict[str, os.stat_result] = {}
    hidden: set[str] = set()  # excluded directories, and every directory under one

    def unreadable(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else ""
        if rel not in hidden:  # what is not uploaded is not missed
            raise e

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()  # os.walk does not descend into symlinks to directories
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        inside_hidden = rel_dir in hidden
        for name in dirnames:
            rel = os.path.join(rel_dir, name)
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if inside_hidden or excluded(rel, name, exclude, is_dir=stat.S_ISDIR(st.st_mode)):
                left_out[rel] = st
                hidden.add(rel)
                continue
            stats[rel] = st
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = {"type": "link", "target": os.readlink(p)}
        for name in sorted(filenames):
            rel = os.path.join(rel_dir, name)
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if inside_hidden or excluded(rel, name, exclude):
                left_out[rel] = st
                continue
            stats[rel] = st
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = {"type": "link", "target": os.readlink(p)}
            elif stat.S_ISREG(st.st_mode):
                sha = hashes.sha256(rel, p, st) if hashes is not None else file_sha256(p)
                # Whole seconds, rounded down like a time_t.
                entries[rel] = {"type": "file", "size": st.st_size,
                                "mode": f"{stat.S_IMODE(st.st_mode):04o}", "sha256": sha,
                                "mtime": st.st_mtime_ns // 1_000_000_000}
    if hashes is not None:
        hashes.save()
    return TreeScan(entries, stats, left_out)


def build(release: str, files: dict[str, dict[str, Any]], shared_files: Iterable[str],
          shared_dirs: Iterable[str]) -> dict[str, Any]:
    return {
        "version": VERSION,
        "release": release,
        "created": utc_now_iso(),
        "shared": {"files": list(shared_files), "dirs": list(shared_dirs)},
        "files": files,
    }


def encode(doc: Mapping[str, Any]) -> bytes:
    """The manifest as stored: ASCII JSON with sorted keys (the bytes are what its digest
    names). msgspec encodes 2000 entries in ~1.5 ms, json in ~9, but writes other
    characters as they are: a name with U+2028 in it would split the manifest's line when
    `verify` reads it back as text. Those manifests, and names that are not UTF-8
    (surrogates here), are written by json, with escapes."""
    with contextlib.suppress(UnicodeEncodeError):
        data = msgspec.json.encode(doc, order="sorted") + b"\n"
        if data.isascii():
            return data
    return (json.dumps(doc, ensure_ascii=True, sort_keys=True) + "\n").encode()


def decode(data: bytes) -> Any:
    """A stored manifest's JSON (ValueError if it is not JSON): msgspec, or json for the
    escapes only json reads back (see encode)."""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return json.loads(data)


# -- what the host holds ---------------------------------------------------------------------


def _mode_from_ls(perms: str) -> str | None:
    """`rwxr-sr-x` (ls -l columns 2-10) -> "2755"."""
    if len(perms) != 9:
        return None
    bits = 0
    special = {2: (0o4000, "sS"), 5: (0o2000, "sS"), 8: (0o1000, "tT")}
    for i, ch in enumerate(perms):
        bit = 1 << (8 - i)
        if i in special:
            extra, marks = special[i]
            if ch in marks:
                bits |= extra
                if ch == marks[0]:  # lower case: the execute bit is set too
                    bits |= bit
                continue
        if ch != "-":
            bits |= bit
    return f"{bits:04o}"


def parse_listing(lines: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The host's listing: JSON lines (python3 lister) or tab-separated (sh fallback)."""
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            path = rec.pop("p", None)
            if not isinstance(path, str):
                continue
            kind = rec.pop("t", "other")
            out[path] = {"type": kind, **rec}
        elif line.startswith("L\t"):
            parts = line.split("\t", 2)
            if len(parts) == 3:
                out[parts[1]] = {"type": "link", "target": parts[2]}
        elif line.startswith("F\t"):
            parts = line.split("\t", 4)
            if len(parts) == 5:
                size = int(parts[2]) if parts[2].isdigit() else -1
                out[parts[4]] = {"type": "file", "size": size, "mode": _mode_from_ls(parts[1]),
                                 "sha256": parts[3]}
    return out


@dataclass
class Drift:
    added: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    modified: list[dict[str, str]] = field(default_factory=list)  # path + what changed

    @property
    def clean(self) -> bool:
        return not (self.added or self.missing or self.modified)

    def to_json(self) -> dict[str, Any]:
        return {"added": self.added, "missing": self.missing, "modified": self.modified}


def _under(path: str, items: Iterable[str]) -> bool:
    return any(path == i or path.startswith(i.rstrip("/") + "/") for i in items)


def compare(manifest: Mapping[str, Any], actual: Mapping[str, Mapping[str, Any]]) -> Drift:
    """Drift of the host's files against the manifest; shared items are expected to differ."""
    expected: Mapping[str, Mapping[str, Any]] = manifest.get("files", {})
    shared = manifest.get("shared", {})
    skip = [*shared.get("files", []), *shared.get("dirs", [])]
    drift = Drift()
    for path in sorted(set(expected) | set(actual)):
        if _under(path, skip):
            continue
        want, have = expected.get(path), actual.get(path)
        if want is None:
            drift.added.append(path)
        elif have is None:
            drift.missing.append(path)
        else:
            what = _difference(want, have)
            if what:
                drift.modified.append({"path": path, "change": what})
    return drift


def _difference(want: Mapping[str, Any], have: Mapping[str, Any]) -> str | None:
    if want.get("type") != have.get("type"):
        return f"was a {want.get('type')}, now a {have.get('type')}"
    if want.get("type") == "link":
        if want.get("target") != have.get("target"):
            return f"link target {want.get('target')!r} -> {have.get('target')!r}"
        return None
    changes = []  # mtime is not compared: a rebuilt, identical file has not drifted
    if want.get("sha256") != have.get("sha256"):
        changes.append("content")
    if want.get("size") != have.get("size"):
        changes.append(f"size {want.get('size')} -> {have.get('size')}")
    if have.get("mode") is not None and want.get("mode") != have.get("mode"):
        changes.append(f"mode {want.get('mode')} -> {have.get('mode')}")
    return ", ".join(changes) or None
