"""Turn the configured build output into a clean local tree ready to upload.

A directory is used as it is; a tarball is checked entry by entry and extracted into a
temporary directory. Anything that could escape the release or smuggle in privileges is
refused before a host is touched (exit 2).
"""

from __future__ import annotations

import hashlib
import itertools
import lzma
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from switchover import manifest
from switchover.errors import ArtifactError
from switchover.hashcache import file_sha256

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@dataclass
class Artifact:
    """A local tree to upload, with what we know about it."""

    tree: Path
    source: Path
    sha256: str
    files: int
    size: int
    # Every file's path, size, mode and sha256 (manifest.scan_tree): read once, stored with the
    # release on each host, and the basis of `sha256` for a directory artifact.
    entries: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    # The lstat of every entry uploaded, from the same walk (for the clone listing).
    stats: dict[str, os.stat_result] = field(default_factory=dict, repr=False)
    _tmp: str | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def run_build(command: str, cwd: Path) -> None:
    """Run the configured local build command (the operator's own command line)."""
    proc = subprocess.run(["sh", "-c", command], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ArtifactError(
            f"build command failed (exit {proc.returncode}): {command}\n{tail}".rstrip()
        )


def _check_member(m: tarfile.TarInfo) -> str | None:
    """Why a tar entry must be refused, or None if it is safe."""
    name = m.name
    p = PurePosixPath(name)
    if name.startswith("/") or p.is_absolute():
        return "absolute path"
    if ".." in p.parts:
        return "'..' in path"
    if m.ischr() or m.isblk():
        return "device file"
    if m.isfifo():
        return "FIFO"
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        return "unsupported entry type"
    if m.mode & (stat.S_ISUID | stat.S_ISGID):
        return "setuid/setgid bit"
    if m.issym() or m.islnk():
        target = PurePosixPath(m.linkname)
        if target.is_absolute():
            return f"link to absolute path {m.linkname!r}"
        base = p.parent if m.issym() else PurePosixPath(".")
        depth = 0
        for part in (*base.parts, *target.parts):
            if part == "..":
                depth -= 1
            elif part != ".":
                depth += 1
            if depth < 0:
                return f"link {m.linkname!r} points outside the release"
    return None


def _norm(name: str) -> str:
    return posixpath.normpath(name).lstrip("/") if name else name


def _check_archive(members: Sequence[tarfile.TarInfo]) -> tuple[str, str] | None:
    """(entry, reason) for the first entry refused in the context of the whole archive.

    Beyond each entry's own checks: no entry may be written *through* a symlink of the
    archive (legitimate archives never need to; hostile ones escape that way), and a hard
    link must name a regular file that came earlier in the archive.
    """
    symlinks: set[str] = set()
    files: set[str] = set()
    for m in members:
        reason = _check_member(m)
        if reason:
            return m.name, reason
        name = _norm(m.name)
        for parent in PurePosixPath(name).parents:
            if str(parent) in symlinks:
                return m.name, f"its path goes through the symlink {str(parent)!r}"
        if m.islnk() and _norm(m.linkname) not in files:
            return m.name, (f"hard link to {m.linkname!r}, which is not a regular file "
                            "earlier in the archive")
        if m.issym():
            symlinks.add(name)
        else:
            symlinks.discard(name)
        if m.isfile() or m.islnk():
            files.add(name)
    return None


def _check_complete(tar: tarfile.TarFile, path: Path) -> None:
    """Refuse an archive cut short: tarfile itself stops quietly at a missing header.

    After the last entry a tar archive has an end-of-archive block of zeros. An archive cut
    at an entry boundary lacks it (and loses every later entry without a word); reading
    the compressed stream to its end checks the compressor's own trailer and checksum.
    """
    f = tar.fileobj
    assert f is not None
    f.seek(tar.offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise ArtifactError(f"{path}: truncated archive: no end-of-archive marker after "
                            f"the last entry")
    while f.read(1 << 20):
        pass


def check_links_inside(root: Path, label: str | Path) -> None:
    """Every symlink under root must resolve inside root, following links on the way.

    A per-link look at the target text is not enough: `s -> .` and `p -> s/..` each look
    harmless, yet p resolves to root's parent.
    """
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) and _escapes(p, real_root):
                raise _escape_error(label, root, p)


def _escapes(link: str, real_root: str) -> bool:
    resolved = os.path.realpath(link)
    return resolved != real_root and not resolved.startswith(real_root + os.sep)


def _escape_error(label: str | Path, root: Path, link: str) -> ArtifactError:
    return ArtifactError(f"{label}: refusing entry {os.path.relpath(link, root)!r}: symlink "
                         f"{os.readlink(link)!r} resolves outside the release")


def extract_tarball(path: Path, into: Path) -> None:
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            refused = _check_archive(members)
            if refused:
                raise ArtifactError(f"{path}: refusing entry {refused[0]!r}: {refused[1]}")
            # The data filter is a second line of defence behind our own checks.
            tar.extractall(into, members=members, filter="data")
            _check_complete(tar, path)
    except ArtifactError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        raise ArtifactError(f"{path}: corrupt or truncated archive: {e}") from None
    check_links_inside(into, path)


def check_scanned(root: Path, scanned: manifest.TreeScan) -> None:
    """Refuse a directory artifact holding things that do not belong in a release.

    Every entry counts, excluded ones too (see TreeScan.excluded_stats), and the scan's
    lstat of each is used: no walk of its own. A link resolving outside the tree (what
    check_links_inside looks for) is reported only after every other check has passed.
    """
    real_root = os.path.realpath(root)
    escaping: str | None = None
    for rel, st in itertools.chain(scanned.stats.items(), scanned.excluded_stats.items()):
        mode = st.st_mode
        if stat.S_ISREG(mode) and not mode & (stat.S_ISUID | stat.S_ISGID):
            continue  # nearly every entry
        p = os.path.join(root, rel)
        if stat.S_ISLNK(mode):
            target = os.readlink(p)
            if os.path.isabs(target):
                raise ArtifactError(f"{root}: refusing {rel}: link to absolute path {target!r}")
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
            if resolved == ".." or resolved.startswith("../"):
                raise ArtifactError(f"{root}: refusing {rel}: link points outside the release")
            if escaping is None and _escapes(p, real_root):
                escaping = p
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise ArtifactError(f"{root}: refusing {rel}: device file")
        elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise ArtifactError(f"{root}: refusing {rel}: FIFO or socket")
        elif mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(mode):
            raise ArtifactError(f"{root}: refusing {rel}: setuid/setgid bit")
    if escaping is not None:
        raise _escape_error(root, root, escaping)


def _scan(tree: Path, exclude: Sequence[str], label: Path, *,
          cache: bool = False) -> manifest.TreeScan:
    try:
        return manifest.scan_tree(tree, exclude, cache=cache)
    except OSError as e:
        where = os.path.relpath(e.filename, tree) if e.filename else tree
        raise ArtifactError(f"{label}: cannot read {where}: {e.strerror or e}") from None


def tree_digest(entries: Mapping[str, Mapping[str, Any]]) -> tuple[str, int, int]:
    """A sha256 over every path, mode and content of a scanned tree, its files and bytes.

    Not over mtimes: rebuilding or touching the same files gives the same digest."""
    h = hashlib.sha256()
    size = 0
    for rel in sorted(entries):
        e = entries[rel]
        if e["type"] == "link":
            h.update(f"{rel}\0link\0{e['target']}\n".encode())
        else:
            h.update(f"{rel}\0{e['mode']}\0{e['sha256']}\n".encode())
            size += e["size"]
    return h.hexdigest(), len(entries), size


def prepare(source: Path, exclude: Sequence[str]) -> Artifact:
    """Check and unpack the artifact; the caller must call `cleanup()` when done."""
    if not source.exists():
        raise ArtifactError(f"artifact {source} does not exist")
    if source.is_dir():
        if not any(source.iterdir()):
            raise ArtifactError(f"artifact {source} is an empty directory")
        scanned = _scan(source, exclude, source, cache=True)
        check_scanned(source, scanned)
        digest, files, size = tree_digest(scanned.entries)
        if files == 0:
            raise ArtifactError(f"artifact {source} has no files (after excludes)")
        return Artifact(tree=source, source=source, sha256=digest, files=files, size=size,
                        entries=scanned.entries, stats=scanned.stats)
    if not source.is_file() or not source.name.endswith(TAR_SUFFIXES):
        raise ArtifactError(
            f"artifact {source} is not a directory or a tarball ({', '.join(TAR_SUFFIXES)})"
        )
    if source.stat().st_size == 0:
        raise ArtifactError(f"artifact {source} is empty")
    tmp = tempfile.mkdtemp(prefix="switchover-artifact-")
    try:
        tree = Path(tmp, "tree")
        tree.mkdir()
        extract_tarball(source, tree)
        top = list(tree.iterdir())
        # A tarball of one top-level directory (`tar czf app.tgz app/`) deploys its contents.
        if len(top) == 1 and top[0].is_dir() and not top[0].is_symlink():
            tree = top[0]
        # No hash cache: the tree is extracted afresh every time, every file is new.
        scanned = _scan(tree, exclude, source)
        _, files, size = tree_digest(scanned.entries)
        if files == 0:
            raise ArtifactError(f"artifact {source} holds no files")
        return Artifact(tree=tree, source=source, sha256=file_sha256(str(source)), files=files,
                        size=size, entries=scanned.entries, stats=scanned.stats, _tmp=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
