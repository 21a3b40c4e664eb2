"""A corpus of hostile and broken artifacts, each refused through the CLI with exit 2.

Every archive is built here, entry by entry, so the test says exactly what is inside. A
refusal must name the entry and the reason, and leave the hosts untouched: no deploy_to on a
fresh target, the same release, history and lock state on a live one.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from project import Project, local_target, ssh_target

Entry = tuple[str, bytes | None, dict]  # name, file data (None: not a regular file), TarInfo attrs


def reg(name: str, data: bytes = b"x\n", mode: int = 0o644) -> Entry:
    return name, data, {"mode": mode}


def special(name: str, type_: bytes, linkname: str = "", mode: int = 0o644) -> Entry:
    return name, None, {"type": type_, "linkname": linkname, "mode": mode}


def tar_bytes(entries: list[Entry], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data, attrs in entries:
            ti = tarfile.TarInfo(name)
            for k, v in attrs.items():
                setattr(ti, k, v)
            if data is not None:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return buf.getvalue()


BASE = [reg("index.html", b"hostile\n"), special("static", tarfile.DIRTYPE, mode=0o755)]


def tarball(*extra: Entry, suffix: str = ".tar") -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = d / f"app{suffix}"
        p.write_bytes(tar_bytes([*BASE, *extra], "w:gz" if suffix == ".tar.gz" else "w"))
        return p
    return build


def raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        p = d / name
        p.write_bytes(data)
        return p
    return build


def truncated_gzip(d: Path) -> Path:
    big = [*BASE, reg("blob.bin", os.urandom(64 * 1024))]
    data = tar_bytes(big, "w:gz")
    p = d / "app.tar.gz"
    p.write_bytes(data[: len(data) // 2])
    return p


def gzip_without_trailer(d: Path) -> Path:
    data = tar_bytes([*BASE, reg("blob.bin", os.urandom(8 * 1024))], "w:gz")
    p = d / "app.tgz"
    p.write_bytes(data[:-8])  # every tar byte is there; the CRC and length are not
    return p


def cut_at_entry_boundary(d: Path) -> Path:
    # tarfile reads such an archive without a word and simply loses the later entries
    first = tar_bytes([reg("index.html", b"a" * 512)])
    whole = tar_bytes([reg("index.html", b"a" * 512), reg("second.html", b"b" * 512)])
    p = d / "app.tar"
    p.write_bytes(whole[: 2 * 512])  # header + data of the first entry only
    assert whole.startswith(first[:1024])
    return p


def directory(*make: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        root = d / "build"
        root.mkdir()
        (root / "index.html").write_text("hostile\n")
        for m in make:
            m(root)
        return root
    return build


S, H = tarfile.SYMTYPE, tarfile.LNKTYPE
CORPUS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "traversal": (tarball(reg("../evil")), ["'../evil'", "'..' in path"]),
    "nested traversal": (tarball(reg("static/../../evil")), ["static/../../evil", "'..'"]),
    "absolute path": (tarball(reg("/tmp/switchover-evil-abs")), ["/tmp/switchover-evil-abs",
                                                                 "absolute path"]),
    "symlink escape": (tarball(special("static/passwd", S, "../../etc/passwd")),
                       ["static/passwd", "points outside the release"]),
    "absolute symlink": (tarball(special("passwd", S, "/etc/passwd")),
                         ["'passwd'", "link to absolute path"]),
    # each link alone looks harmless: `s -> .` and `p -> s/..`; together p is the parent
    "symlink chain escape": (tarball(special("p", S, "s/.."), special("s", S, ".")),
                             ["'p'", "resolves outside the release"]),
    "write through symlink": (tarball(special("out", S, "static"), reg("out/x")),
                              ["'out/x'", "goes through the symlink 'out'"]),
    "hard link escape": (tarball(special("h", H, "../outside")), ["'h'", "points outside"]),
    "absolute hard link": (tarball(special("shadow", H, "/etc/shadow")),
                           ["'shadow'", "link to absolute path"]),
    "hard link to nothing earlier": (tarball(special("h", H, "later"), reg("later")),
                                     ["'h'", "not a regular file earlier in the archive"]),
    "char device": (tarball(special("static/null", tarfile.CHRTYPE)),
                    ["static/null", "device file"]),
    "block device": (tarball(special("sda", tarfile.BLKTYPE)), ["'sda'", "device file"]),
    "fifo": (tarball(special("pipe", tarfile.FIFOTYPE)), ["'pipe'", "FIFO"]),
    "setuid": (tarball(reg("bin-su", mode=0o4755)), ["bin-su", "setuid/setgid"]),
    "setgid": (tarball(reg("bin-sg", mode=0o2755), suffix=".tar.gz"),
               ["bin-sg", "setuid/setgid"]),
    "truncated gzip": (truncated_gzip, ["corrupt or truncated"]),
    "gzip without trailer": (gzip_without_trailer, ["corrupt or truncated"]),
    "cut at an entry boundary": (cut_at_entry_boundary, ["truncated archive",
                                                         "end-of-archive"]),
    "not an archive": (raw("app.tar.gz", os.urandom(4096)), ["corrupt or truncated"]),
    "gzip of garbage": (raw("app.tgz", gzip.compress(os.urandom(4096))), ["corrupt"]),
    "empty file": (raw("app.tar.gz", b""), ["app.tar.gz", "is empty"]),
    "unsupported type": (raw("app.zip", b"PK\x03\x04"), ["app.zip",
                                                           "not a directory or a tarball"]),
    "missing path": (lambda d: d / "nope.tar.gz", ["nope.tar.gz", "does not exist"]),
    "empty directory": (lambda d: (d / "empty").mkdir() or d / "empty", ["empty directory"]),
    "dir: symlink escape": (directory(lambda r: os.symlink("../../etc", r / "etc")),
                            ["refusing etc", "points outside"]),
    "dir: symlink chain escape": (
        directory(lambda r: os.symlink(".", r / "s"), lambda r: os.symlink("s/..", r / "p")),
        ["'p'", "resolves outside the release"]),
    "dir: fifo": (directory(lambda r: os.mkfifo(r / "pipe")), ["refusing pipe", "FIFO"]),
    "dir: setuid": (directory(lambda r: (r / "su").write_text("x"),
                              lambda r: os.chmod(r / "su", 0o4755)),
                    ["refusing su", "setuid/setgid"]),
}


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    deploy_to: Path
    base: Path


@pytest.fixture(scope="module")
def corpus_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Run the whole corpus through the CLI once, a few processes at a time (each CLI run
    is mostly interpreter start-up; the cases are independent)."""

    def one(case: str) -> Outcome:
        base = tmp_path_factory.mktemp("hostile")
        project = Project(base / "proj", local_target(base))
        work = base / "work"
        work.mkdir()
        artifact = CORPUS[case][0](work)
        r = project.run("deploy", "test", "--artifact", str(artifact))
        return Outcome(r, Path(project.target.deploy_to), base)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CORPUS, pool.map(one, CORPUS), strict=True))


@pytest.fixture
def local_project(tmp_path) -> Project:
    return Project(tmp_path / "proj", local_target(tmp_path))


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_artifact_is_refused_and_nothing_is_created(corpus_outcomes, case: str):
    o = corpus_outcomes[case]
    r = o.result
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    for text in CORPUS[case][1]:
        assert text in r.stderr, (case, text, r.stderr)
    assert not o.deploy_to.exists()
    # nothing escaped the temporary extraction either
    assert not Path("/tmp/switchover-evil-abs").exists()
    assert not (o.base / "evil").exists() and not (o.base / "outside").exists()


def test_benign_links_in_a_tarball_still_deploy(local_project: Project, tmp_path: Path):
    """The checks refuse escapes, not links: internal symlinks and hard links are fine."""
    data = tar_bytes([
        special("app", tarfile.DIRTYPE, mode=0o755),
        reg("app/index.html", b"benign\n"),
        special("app/static", tarfile.DIRTYPE, mode=0o755),
        reg("app/static/a.js", b"a\n"),
        special("app/static/b.js", H, "app/static/a.js"),
        special("app/latest.js", S, "static/a.js"),
        special("app/up", S, "static/.."),
    ], "w:gz")
    artifact = tmp_path / "good.tar.gz"
    artifact.write_bytes(data)
    local_project.ok("deploy", "test", "--artifact", str(artifact))
    assert local_project.live_file("index.html") == "benign\n"
    assert local_project.live_file("latest.js") == "a\n"
    assert local_project.live_file("static/b.js") == "a\n"


def test_hostile_artifacts_leave_a_live_ssh_fleet_unchanged(ssh_fleet, tmp_path: Path):
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    p = Project(tmp_path / "proj", ssh_target(ssh_fleet, tmp_path.name, hosts=2))
    p.ok("deploy", "test")
    before = {h: (p.current(h), p.releases(h), p.history(h)) for h in p.target.hosts}
    work = tmp_path / "work"
    for case in ("traversal", "symlink chain escape", "hard link escape", "char device",
                 "setuid", "cut at an entry boundary"):
        build, expected = CORPUS[case]
        d = work / case.replace(" ", "_")
        d.mkdir(parents=True)
        r = p.run("deploy", "test", "--artifact", str(build(d)))
        assert r.returncode == 2, (case, r.stderr)
        assert expected[-1] in r.stderr, (case, r.stderr)
    for h in p.target.hosts:
        assert (p.current(h), p.releases(h), p.history(h)) == before[h]
        assert not p.locked(h)
        assert not any((p.root(h) / ".switchover" / "staging").iterdir())
    # Each refused deploy had started its hosts' logins before the artifact was checked
    # (they overlap the checks): no ssh master of theirs may outlive the run.
    assert _ssh_masters(ssh_fleet.ssh_config, within=5.0) == []


def _ssh_masters(ssh_config: Path, within: float) -> list[str]:
    """Command lines of ssh masters using `ssh_config`, once none are left or `within`
    seconds have passed (a master told to exit may take a moment to go)."""
    deadline = time.monotonic() + within
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv]
            if args and args[0].endswith("ssh") and str(ssh_config) in args \
                    and "ControlMaster=yes" in args:
                found.append(" ".join(args))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
