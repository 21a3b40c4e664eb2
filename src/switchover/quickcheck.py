"""When rsync's quick check is safe, and which files it could get wrong.

rsync's default quick check calls a file unchanged when size and mtime match, and with
--link-dest hard-links the live release's copy. A file whose content changed but whose
size and mtime did not (pinned mtimes: reproducible builds, `git archive`,
SOURCE_DATE_EPOCH; or two writes within one timestamp tick) would ship stale. --checksum
avoids that by reading every file on both sides, on every host, on every deploy.

Knowing the live release's manifest (what every file contained when it was uploaded) and
the new tree's, only the files that differ in content but not in size and mtime second
can fool the quick check. Those few are sent again with --ignore-times after the main
pass; everything else is left to the quick check. Pure logic: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Entries = Mapping[str, Mapping[str, Any]]


def suspects(live: Entries, new: Entries) -> list[str]:
    """Paths of files the quick check could wrongly take for unchanged, sorted.

    A file qualifies when the live release has a regular file at the same path with the
    same size, a different sha256, and the same mtime second (or no recorded mtime: then
    nothing rules it out). rsync compares mtimes to the nanosecond, so a different second
    is always seen as a change. A file under a directory that is a symlink in the live
    release qualifies too: rsync looks its basis up through that link, at a path the live
    manifest knows under another name.
    """
    linked_dirs = {p for p, e in live.items() if e.get("type") == "link"}
    out = []
    for path, entry in new.items():
        if entry.get("type") != "file":
            continue
        if linked_dirs and _under_link(path, linked_dirs):
            out.append(path)
            continue
        old = live.get(path)
        if old is None or old.get("type") != "file":
            continue  # new or a different kind of entry: the quick check sends it
        if old.get("size") != entry.get("size"):
            continue
        if old.get("sha256") == entry.get("sha256"):
            continue
        if "mtime" in old and "mtime" in entry and old["mtime"] != entry["mtime"]:
            continue
        out.append(path)
    return sorted(out)


def _under_link(path: str, links: set[str]) -> bool:
    parts = path.split("/")
    return any("/".join(parts[:i]) in links for i in range(1, len(parts)))


def usable(live: Entries | None, new: Entries, exclude: Sequence[str] = ()) -> bool:
    """Whether suspects() can be trusted: both manifests carry sizes and hashes, and every
    exclude pattern means the same to rsync as to manifest.scan (else a file rsync sends
    could be missing from the manifest, and so from the suspects)."""
    if live is None or not all(_simple_pattern(p) for p in exclude):
        return False
    return all(e.get("type") != "file" or (isinstance(e.get("sha256"), str)
                                          and isinstance(e.get("size"), int))
               for e in (*live.values(), *new.values()))


def _simple_pattern(pattern: str) -> bool:
    """A name pattern (`.git`, `*.log`, `node_modules`), optionally anchored (`/build`):
    the kinds rsync and manifest.scan's matcher agree on. Patterns with an inner or a
    trailing '/', `**`, or rsync rule prefixes are left to --checksum."""
    if pattern.startswith(("+ ", "- ", "!")) or "**" in pattern or pattern.endswith("/"):
        return False
    return "/" not in pattern.lstrip("/")
