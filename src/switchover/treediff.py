"""File-level difference between a local tree and a release: what a deploy would change.

With rsync: an itemized dry run (`rsync -n -i --checksum`), which reads both trees and
writes nothing. Without rsync (a local target on a machine lacking it): the same answer
from walking both trees here.
"""

from __future__ import annotations

import filecmp
import os
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchover.errors import HostError
from switchover.transport.base import Result
from switchover.transport.local import excluded

# `%i` itemize string, `%l` length, `%n` name (directories end with "/").
OUT_FORMAT = "--out-format=%i %l %n"
DELETING = "*deleting"


@dataclass(frozen=True)
class Change:
    path: str
    size: int  # bytes of the new file; for a deletion, of the file that goes away


@dataclass
class TreeDiff:
    """Files (not directories) that differ. `changed`: content, type, link target, mode or
    owner; `touched`: only the modification time differs (a rebuild of the same file)."""

    added: list[Change] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    deleted: list[Change] = field(default_factory=list)
    touched: list[Change] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.deleted or self.touched)

    def stat(self) -> dict[str, dict[str, int]]:
        return {kind: {"files": len(items), "bytes": sum(c.size for c in items)}
                for kind, items in self._kinds()}

    def _kinds(self) -> list[tuple[str, list[Change]]]:
        return [("added", self.added), ("changed", self.changed), ("deleted", self.deleted),
                ("touched", self.touched)]

    def to_json(self, paths: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {"stat": self.stat()}
        if paths:
            for kind, items in self._kinds():
                doc[kind] = [{"path": c.path, "size": c.size} for c in items]
        return doc

    def sort(self) -> TreeDiff:
        for _, items in self._kinds():
            items.sort(key=lambda c: c.path)
        return self


def _split(line: str) -> tuple[str, int, str] | None:
    """`%i %l %n` -> (itemize, size, name); None for lines that are not itemized entries."""
    if line.startswith(DELETING):
        rest = line[len(DELETING):].lstrip(" ")
        size_s, _, name = rest.partition(" ")
        return (DELETING, int(size_s), name) if size_s.isdigit() and name else None
    item, _, rest = line.partition(" ")
    size_s, _, name = rest.partition(" ")
    if len(item) != 11 or item[0] not in "<>ch." or item[1] not in "fdLDS":
        return None
    if not size_s.isdigit() or not name:
        return None
    return item, int(size_s), name


def parse_itemized(output: str) -> TreeDiff:
    """Classify the lines of `rsync -n -a --checksum --delete --out-format='%i %l %n'`."""
    diff = TreeDiff()
    for line in output.splitlines():
        parts = _split(line)
        if parts is None:
            continue
        item, size, name = parts
        if name.endswith("/"):
            continue  # directories: their files are listed on their own
        if item == DELETING:
            diff.deleted.append(Change(name, size))
        elif item[1] == "d":
            continue
        elif item[2:] == "+" * 9:
            diff.added.append(Change(name, size))
        elif item[0] in "<>c" or any(item[i] not in ". " for i in (2, 3, 5, 6, 7, 9, 10)):
            # sent, made locally (links), or checksum, size, permissions, owner, group,
            # ACL or xattrs differ; only t/u (times) set means the same file, rebuilt
            diff.changed.append(Change(name, size))
        else:
            diff.touched.append(Change(name, size))
    return diff.sort()


def parse_sizes(output: str) -> dict[str, int]:
    """name -> size from an itemized listing (the reverse run that sizes deletions)."""
    sizes = {}
    for line in output.splitlines():
        parts = _split(line)
        if parts is not None and parts[0] != DELETING and not parts[2].endswith("/"):
            sizes[parts[2]] = parts[1]
    return sizes


def exclude_args(exclude: Iterable[str]) -> list[str]:
    return [f"--exclude={p}" for p in exclude]


# Runs `rsync ARGS...`: the transport adds its own options (e.g. `-e ssh ...`).
RsyncRunner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def rsync_compare(run: RsyncRunner, src: Path, dest: str, exclude: Sequence[str],
                  host: str) -> TreeDiff:
    """Itemized dry run of src/ onto dest/ (a local path or `host:path`). Writes nothing."""
    source = str(src).rstrip("/") + "/"
    target = dest.rstrip("/") + "/"
    cp = run(["-n", "-a", "--checksum", "--delete", OUT_FORMAT, *exclude_args(exclude),
              source, target])
    if cp.returncode != 0:
        raise HostError(f"comparing with the live release failed (rsync exit "
                        f"{cp.returncode}): {Result(1, '', cp.stderr).message}", host=host)
    diff = parse_itemized(cp.stdout)
    if diff.deleted:
        # rsync does not size what it would delete; the reverse direction lists those files
        # (and only those, with --ignore-existing) with their sizes.
        back = run(["-n", "-a", "--ignore-existing", OUT_FORMAT, *exclude_args(exclude),
                    target, source])
        if back.returncode == 0:
            sizes = parse_sizes(back.stdout)
            diff.deleted = [Change(c.path, sizes.get(c.path, 0)) for c in diff.deleted]
    return diff


@dataclass(frozen=True)
class _Entry:
    kind: str  # f, L
    size: int
    mode: int
    mtime: int
    target: str = ""


def _walk(root: Path, exclude: Sequence[str]) -> dict[str, _Entry]:
    """Every file and symlink under root (not following links), minus excluded paths."""
    entries: dict[str, _Entry] = {}
    if not root.is_dir():
        return entries
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        keep = []
        for name in sorted(dirnames):
            rel = os.path.join(rel_dir, name)
            if excluded(rel, name, exclude, is_dir=not Path(dirpath, name).is_symlink()):
                continue
            if Path(dirpath, name).is_symlink():
                filenames.append(name)  # os.walk lists links to dirs as dirs
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            rel = os.path.join(rel_dir, name)
            if excluded(rel, name, exclude):
                continue
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(p)
                entries[rel] = _Entry("L", len(target), 0, 0, target)
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = _Entry("f", st.st_size, stat.S_IMODE(st.st_mode),
                                      int(st.st_mtime))
    return entries


def compare_trees(src: Path, dest: Path, exclude: Sequence[str]) -> TreeDiff:
    """The rsync-less answer: same classification as `parse_itemized`, by walking both."""
    new, old = _walk(src, exclude), _walk(dest, exclude)
    diff = TreeDiff()
    for rel, e in new.items():
        o = old.get(rel)
        if o is None:
            diff.added.append(Change(rel, e.size))
        elif e.kind != o.kind or e.size != o.size or e.target != o.target or (
            e.mode != o.mode) or (
            e.kind == "f" and not filecmp.cmp(src / rel, dest / rel, shallow=False)
        ):
            diff.changed.append(Change(rel, e.size))
        elif e.mtime != o.mtime:
            diff.touched.append(Change(rel, e.size))
    diff.deleted = [Change(rel, o.size) for rel, o in old.items() if rel not in new]
    return diff.sort()


def everything(src: Path, exclude: Sequence[str]) -> TreeDiff:
    """With no live release to compare with, every file is new."""
    return TreeDiff(added=[Change(rel, e.size) for rel, e in _walk(src, exclude).items()]).sort()
