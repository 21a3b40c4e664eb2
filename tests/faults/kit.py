"""Fault-injection helpers: run the CLI until a named step, kill it, check the invariants.

The invariants are checked straight from the hosts' files (never through the tool under
test): `current` is a relative link to a release, and every release on the host is
complete, i.e. its files match the manifest recorded at upload, hashed here.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from project import Project

PAUSE_AT = "SWITCHOVER_TEST_PAUSE_AT"
PAUSE_MARKER = "SWITCHOVER_TEST_PAUSE_MARKER"


def masters(ssh_config: str | None) -> dict[int, str]:
    """ssh ControlMasters of ours: pid -> their ControlPath dir.

    A master started with `-F ssh_config` is matched on that config file, which keeps other
    test runs' masters out. A master opened by its first command renames itself to
    "ssh: <ControlPath> [mux]" once it goes to the background: those are matched on our
    private control dirs (/tmp/swo-*); callers compare with a list taken before.
    """
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        title = re.fullmatch(r"ssh: (/tmp/swo-[^/ ]+)/\S+ \[mux\]", argv[0])
        if title:
            found[int(entry)] = title.group(1)
            continue
        if not ssh_config or "ControlMaster=yes" not in argv or ssh_config not in argv:
            continue
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("ControlPath=")), "")
        found[int(entry)] = os.path.dirname(path)
    return found


def stop_masters(found: dict[int, str]) -> None:
    """Stop the ControlMasters a killed client left behind, and remove their dirs."""
    for pid, d in found.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if d.startswith("/tmp/swo-"):
            for f in glob.glob(os.path.join(d, "*")):
                with contextlib.suppress(OSError):
                    os.unlink(f)
            with contextlib.suppress(OSError):
                os.rmdir(d)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        ppid = int(text[text.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Client:
    """One `switchover` run in the background, with the fault-injection pause hook armed."""

    def __init__(self, project: Project, *args: str, pause_at: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.marker = project.dir / f"pause-{time.monotonic_ns()}"
        full = {**os.environ, **(env or {})}
        full.pop("SWITCHOVER_CONFIG", None)
        if pause_at:
            full[PAUSE_AT] = pause_at
            full[PAUSE_MARKER] = str(self.marker)
        m = re.search(r'^ssh_config = "(.*)"$', project.target.env_toml, re.M)
        self.ssh_config = m.group(1) if m else None
        self.before = masters(self.ssh_config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "switchover", "-c", str(project.config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full, cwd=project.dir,
        )

    def wait_paused(self, timeout: float = 60, hosts: int = 1) -> str:
        """Wait until the client reached its pause step on `hosts` hosts (each host's thread
        pauses on its own); returns the marker's first line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.marker.exists() and len(self.marker.read_text().splitlines()) >= hosts:
                return self.marker.read_text().splitlines()[0]
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"client ended (exit {self.proc.returncode}) before "
                                     f"pausing\n{out}\n{err}")
            time.sleep(0.02)
        raise AssertionError("client never reached its pause step")

    def kill(self, tree: bool = False) -> None:
        """SIGKILL the client (with `tree`: its child processes too, as if the machine died)
        and stop the ssh masters it left behind."""
        victims = descendants(self.proc.pid) if tree else []
        self.proc.kill()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.communicate(timeout=30)
        now = masters(self.ssh_config)
        stop_masters({pid: d for pid, d in now.items() if pid not in self.before})

    def finish(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        out, err = self.proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


# -- invariants ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_entries(root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = {"type": "link", "target": os.readlink(p)}
            elif stat.S_ISREG(st.st_mode):
                out[rel] = {"type": "file", "size": st.st_size,
                            "mode": f"{stat.S_IMODE(st.st_mode):04o}", "sha256": _sha256(p)}
    return out


def release_problems(root: Path, rid: str) -> list[str]:
    """Why releases/<rid> is not exactly the tree its manifest recorded (empty: it is)."""
    mpath = root / ".switchover" / "manifests" / f"{rid}.json"
    if not mpath.is_file():
        return [f"release {rid} has no manifest"]
    doc = json.loads(mpath.read_text())
    shared = [*doc.get("shared", {}).get("files", []), *doc.get("shared", {}).get("dirs", [])]

    def is_shared(path: str) -> bool:
        return any(path == s or path.startswith(s + "/") for s in shared)

    # mtime is recorded as a hint for the next upload (quickcheck.py), not as content.
    want = {p: {k: v for k, v in e.items() if k != "mtime"}
            for p, e in doc["files"].items() if not is_shared(p)}
    have = {p: e for p, e in tree_entries(root / "releases" / rid).items() if not is_shared(p)}
    problems = [f"{rid}: missing {p}" for p in sorted(set(want) - set(have))]
    problems += [f"{rid}: unexpected {p}" for p in sorted(set(have) - set(want))]
    problems += [f"{rid}: {p} differs" for p in sorted(set(want) & set(have))
                 if want[p] != have[p]]
    return problems


def check_invariants(project: Project, expect: dict[str, str | None] | None = None) -> None:
    """`current` points at a complete release on every host (the one expected, if given),
    and every release on disk is complete: a partial upload never shows under releases/."""
    for host in project.target.hosts:
        root = project.root(host)
        rid = project.current(host)  # also asserts: a relative link into releases/
        if expect is not None:
            assert rid == expect[host], f"{host}: current is {rid}, expected {expect[host]}"
        if rid is not None:
            assert (root / "releases" / rid).is_dir(), f"{host}: current dangles ({rid})"
        problems = [p for r in project.releases(host) for p in release_problems(root, r)]
        assert not problems, f"{host}: incomplete releases: {problems}"


def lock_owner(project: Project, host: str) -> dict[str, Any] | None:
    p = project.root(host) / ".switchover" / "lock" / "owner.json"
    return json.loads(p.read_text()) if p.exists() else None
