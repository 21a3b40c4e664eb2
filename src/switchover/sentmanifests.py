"""A local copy of the manifests this machine uploaded, found again by their sha256.

Each host stores the manifest of every release (manifest.py). When a host reports the
digest of its live release's manifest and we hold a copy with that digest, we know what
every file of the live release contains without asking the host, and the upload can use
rsync's cheap quick check instead of --checksum (see quickcheck.py). A miss, a corrupt
copy or an unwritable cache only costs time: the upload falls back to --checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from switchover.cache import cache_dir, write_private
from switchover.manifest import decode

KEEP = 32  # manifests kept; a fleet in drift needs one per release it runs


def _dir() -> Path:
    return cache_dir("manifests")


def store(data: bytes) -> str:
    """Keep a copy of manifest bytes as they were sent; return their sha256."""
    digest = hashlib.sha256(data).hexdigest()
    with contextlib.suppress(OSError):
        write_private(_dir() / f"{digest}.json", data)
        _prune(_dir())
    return digest


def load(digest: str | None) -> dict[str, dict[str, Any]] | None:
    """The file entries of the manifest with this digest, or None if we have no good copy."""
    if not digest:
        return None
    path = _dir() / f"{digest}.json"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        return None  # damaged: never trust it
    try:
        doc = decode(data)
    except ValueError:
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by _prune
    return files


def newest() -> str | None:
    """The digest of the copy stored or loaded last (the likeliest live one), if any."""
    copies = _newest_first(_dir())
    return copies[0].stem if copies else None


def _newest_first(directory: Path) -> list[Path]:
    """The copies, by last use (store writes, load touches), newest first."""
    entries = []
    with contextlib.suppress(OSError):  # no cache dir yet
        for p in directory.glob("*.json"):
            with contextlib.suppress(OSError):
                entries.append((p.stat().st_mtime, p))
    entries.sort(reverse=True)
    return [p for _, p in entries]


def _prune(directory: Path) -> None:
    for p in _newest_first(directory)[KEEP:]:
        with contextlib.suppress(OSError):
            p.unlink()
