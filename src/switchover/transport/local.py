"""Run on this machine: the embedded default target, no SSH involved."""

from __future__ import annotations

import errno
import filecmp
import fnmatch
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from switchover.errors import DiskFull, TransferError
from switchover.hosts import LOCAL, HostSpec
from switchover.transport.base import (
    Result,
    SyncStats,
    parse_rsync_stats,
    rsync_args,
    rsync_failure,
    run_process,
)
from switchover.transport.progress import (
    ProgressCallback,
    SyncProgress,
    run_rsync,
)

if TYPE_CHECKING:
    from switchover.treediff import TreeDiff


class LocalTransport:
    def __init__(self, host: HostSpec = LOCAL) -> None:
        self.host = host
        self.abort: threading.Event | None = None

    def connect(self) -> None:
        return None

    def open_early(self) -> None:
        return None

    def reconnect(self) -> None:
        return None

    def run(self, script: str, *, timeout: float | None = None,
            input: bytes | None = None) -> Result:
        cp = run_process(["sh", "-c", script], timeout=timeout, host=self.host.name, what="command",
                         abort=self.abort, input=input)
        return Result(cp.returncode, cp.stdout, cp.stderr)

    def sync(
        self,
        src: Path,
        dest: str,
        *,
        link_dest: str | None,
        exclude: Sequence[str],
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        checksum: bool = True,
        only: Sequence[str] | None = None,
    ) -> SyncStats:
        if shutil.which("rsync"):
            argv = [*rsync_args(src, link_dest, exclude, checksum, only is not None),
                    dest.rstrip("/") + "/"]
            cp = run_rsync(argv, timeout=timeout, host=self.host.name, what='copy',
                           abort=self.abort, progress=progress, only=only)
            if cp.returncode != 0:
                raise rsync_failure(cp.returncode, cp.stderr, self.host.name, "copy")
            return parse_rsync_stats(cp.stdout)
        if only is not None:
            return SyncStats()  # copy_tree compares content itself: nothing to correct
        try:
            return copy_tree(src, Path(dest), Path(link_dest) if link_dest else None, exclude,
                             progress)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"copy failed: no space left on the host ({e})",
                               host=self.host.name) from None
            raise TransferError(f"copy failed: {e}", host=self.host.name) from None

    def compare(
        self, src: Path, dest: str, *, exclude: Sequence[str], timeout: float | None = None
    ) -> TreeDiff:
        from switchover import treediff  # imports this module: bind late

        if not shutil.which("rsync"):
            return treediff.compare_trees(src, Path(dest), exclude)

        def rsync(args: list[str]) -> subprocess.CompletedProcess[str]:
            return run_process(["rsync", *args], timeout=timeout, host=self.host.name,
                               what="compare", abort=self.abort)

        return treediff.rsync_compare(rsync, src, dest, exclude, self.host.name)

    def close(self) -> None:
        return None

    def can_patch(self) -> bool:
        return shutil.which("rsync") is not None  # without it, sync(only=...) sends nothing


def excluded(rel: str, name: str, patterns: Sequence[str], is_dir: bool = False) -> bool:
    """rsync's --exclude matching, so the manifest lists exactly what rsync uploads.

    A pattern without '/' matches a name at any depth; one starting with '/' matches the
    path from the tree's root; any other pattern with a '/' matches the end of the path
    (`logs/*.log` excludes `app/logs/x.log` too). A pattern ending in '/' matches
    directories only (`is_dir`: a real directory, not a symlink to one, as rsync -a sees
    it).
    """
    parts = rel.split("/")
    for pattern in patterns:
        if pattern.endswith("/") and not is_dir:
            continue
        p = pattern.rstrip("/")
        if p.startswith("/"):
            if fnmatch.fnmatchcase(rel, p[1:]):
                return True
        elif "/" in p:
            if any(fnmatch.fnmatchcase("/".join(parts[i:]), p) for i in range(len(parts))):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def copy_tree(
    src: Path, dest: Path, link_dest: Path | None, exclude: Sequence[str],
    progress: ProgressCallback | None = None,
) -> SyncStats:
    """Copy src into dest, hard-linking files unchanged since link_dest (rsync-less fallback).

    "Unchanged" means same size, mode and content (like rsync --checksum): equal mtimes
    prove nothing when builds pin them. `progress` is told after each file.
    """

    def tell() -> None:
        if progress is not None:
            progress(SyncProgress(bytes_sent=sent_bytes, files_sent=sent, files_checked=total))

    total = sent = sent_bytes = 0
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in list(dirnames):
            rel = os.path.join(rel_dir, name)
            path = Path(dirpath, name)
            if excluded(rel, name, exclude, is_dir=not path.is_symlink()):
                dirnames.remove(name)
            elif path.is_symlink():
                dirnames.remove(name)
                os.symlink(os.readlink(path), dest / rel)
                total += 1
            else:
                (dest / rel).mkdir(exist_ok=True)
        for name in filenames:
            rel = os.path.join(rel_dir, name)
            if excluded(rel, name, exclude):
                continue
            s, d = Path(dirpath, name), dest / rel
            total += 1
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
                continue
            st = s.stat()
            if link_dest is not None:
                old = link_dest / rel
                try:
                    ost = old.lstat()
                    same = (
                        not old.is_symlink()
                        and ost.st_size == st.st_size
                        and ost.st_mode == st.st_mode
                        and filecmp.cmp(old, s, shallow=False)
                    )
                except OSError:
                    same = False
                if same:
                    os.link(old, d)
                    tell()
                    continue
            shutil.copy2(s, d)
            sent += 1
            sent_bytes += st.st_size
            tell()
    for dirpath, _dirnames, _ in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = dest if rel == "." else dest / rel
        if target.is_dir() and not target.is_symlink():
            shutil.copystat(dirpath, target)
    return SyncStats(total, sent, sent_bytes, sent_bytes)
