"""Remembered sha256 of artifact files, so an unchanged file is not read again.

One cache file per artifact directory (named by the sha256 of its resolved path) under
cache_dir("hashes"). Each entry maps a relative path to the file's size, mtime_ns,
ctime_ns, inode and device when it was hashed, and the digest. A remembered digest is used
only when all five still match; anything else reads the file again. ctime cannot be set by
a user, so content rewritten with its mtime pinned back (`touch -d`, os.utime, tar -x)
is still seen as changed.

"Racily clean" entries (as git calls them) are not trusted: a file written within one
timestamp tick of being hashed can change again without its stat changing. An entry counts
only if its mtime and ctime are at least RACY_NS older than the start of the scan that
hashed it (every hash of that scan was taken after that moment).

The cache is an optimisation only: a missing, unreadable, corrupt or foreign file is
treated as empty, and failing to write one is ignored. Only the entries of the latest scan
are kept, so it cannot grow beyond the artifact's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from switchover.cache import cache_dir, write_private

VERSION = 1
# Timestamp granularity and clock skew between the kernel and time.time_ns() (and a file
# server's clock) are well below this.
RACY_NS = 2_000_000_000

StatKey = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, ino, dev
_INTS = (int,) * 5


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def cache_file(root: Path) -> Path:
    name = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()
    return cache_dir("hashes") / f"{name}.json"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _load(path: Path, root: str) -> dict[str, tuple[StatKey, str]]:
    """The trusted entries of a cache file; {} for anything unexpected."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            # Only a file of ours that nobody else could have written is believed.
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return {}
            doc = json.loads(f.read())
        if doc.get("version") != VERSION or doc.get("root") != root:
            return {}
        started = doc["scan_started_ns"]
        if not isinstance(started, int):
            return {}
        limit = started - RACY_NS
        out: dict[str, tuple[StatKey, str]] = {}
        for rel, entry in doc["files"].items():
            *key, digest = entry
            if (len(key) == 5 and tuple(map(type, key)) == _INTS and type(digest) is str
                    and _SHA256.fullmatch(digest)
                    and key[1] < limit and key[2] < limit):  # mtime, ctime: not racy
                out[rel] = (tuple(key), digest)  # type: ignore[arg-type]
        return out
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


class HashCache:
    """The digests of one directory's files; use for one scan, then `save()`."""

    def __init__(self, root: Path) -> None:
        self.started_ns = time.time_ns()  # before any file is looked at or hashed
        self.root = os.path.realpath(root)
        self.path = cache_file(root)
        self._old = _load(self.path, self.root)
        self._new: dict[str, list[Any]] = {}
        self.hashed = 0  # files read this scan (the rest came from the cache)

    def sha256(self, rel: str, path: str, st: os.stat_result) -> str:
        """The file's sha256; `st` is its lstat taken before this call."""
        key = stat_key(st)
        known = self._old.get(rel)
        if known is not None and known[0] == key:
            digest = known[1]
        else:
            digest = file_sha256(path)
            self.hashed += 1
        self._new[rel] = [*key, digest]
        return digest

    def save(self) -> None:
        """Write this scan's entries (and only those). Never fails."""
        doc = {"version": VERSION, "root": self.root, "scan_started_ns": self.started_ns,
               "files": self._new}
        with contextlib.suppress(OSError, ValueError):
            write_private(self.path, json.dumps(doc, separators=(",", ":")).encode())
