"""A throw-away switchover project for end-to-end tests: an app, a config, a target.

The same tests run against a local target and against real sshd hosts (see sshd_harness).
Host files are read straight from disk (for SSH hosts, from the directory behind the host's
mount namespace), never through the tool under test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def spare_unlocked(spare_root: Path, seconds: float = 20) -> None:
    """Wait (bounded) until no spare build holds its lock on `spare_root`: the builder
    renames the spare into place a moment before its shell (which holds the flock) ends,
    and a deploy that finds the lock held copies instead of taking the spare. flock(2) on
    the same directory, as the builder's flock(1) takes it (through a bind mount too)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fd = os.open(spare_root, os.O_RDONLY)
        except FileNotFoundError:
            return  # no spare was ever built here: nothing holds a lock
        try:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
        finally:
            os.close(fd)  # closing drops a lock we took
        assert time.monotonic() < deadline, f"{spare_root}: a spare build still holds the lock"
        time.sleep(0.01)


def settle(deploy_roots: Iterable[Path], seconds: float = 20) -> None:
    """Wait (bounded) until no host does switchover's background work after a deploy: the
    delete of pruned releases and the spare clone of the live release for the next deploy
    (commands.build_spare), lock included. `deploy_roots`: the directories behind each
    host's deploy_to."""
    deadline = time.monotonic() + seconds
    for root in deploy_roots:
        meta, live = root / ".switchover", root / "current"
        while time.monotonic() < deadline:
            trash = meta / "trash"
            spare = meta / "spare" / os.path.basename(os.readlink(live)) \
                if live.is_symlink() else None
            busy = (trash.is_dir() and any(trash.iterdir())) or (
                spare is not None and not spare.is_dir())
            if not busy:
                break
            time.sleep(0.02)
        spare_unlocked(meta / "spare", max(0.0, deadline - time.monotonic()))


@dataclass
class Target:
    kind: str  # "local" or "ssh"
    deploy_to: str  # as written in the config
    roots: dict[str, Path]  # host name -> local directory that holds deploy_to
    env_toml: str  # the [environments.test] body, without deploy_to
    fleet: Any = None

    @property
    def hosts(self) -> list[str]:
        return list(self.roots)


@dataclass
class Project:
    dir: Path
    target: Target
    top: str = ""  # extra top-level TOML
    env_extra: str = ""  # extra keys for [environments.test]
    sections: str = ""  # extra TOML sections after the environment
    last: subprocess.CompletedProcess[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.app = self.dir / "app"
        self.app.mkdir(parents=True, exist_ok=True)
        (self.app / "index.html").write_text("v1\n")
        (self.app / "static").mkdir(exist_ok=True)
        for i in range(20):
            (self.app / "static" / f"asset{i}.js").write_text(f"// asset {i}\n" * 200)
        self.write_config()

    @property
    def config(self) -> Path:
        return self.dir / "switchover.toml"

    def write_config(self, top: str | None = None, env_extra: str | None = None,
                     sections: str | None = None) -> None:
        if top is not None:
            self.top = top
        if env_extra is not None:
            self.env_extra = env_extra
        if sections is not None:
            self.sections = sections
        text = (
            'app = "demo"\n'
            + textwrap.dedent(self.top)
            + '\n[artifact]\npath = "app"\n'
            + "\n[environments.test]\n"
            + f"deploy_to = {json.dumps(self.target.deploy_to)}\n"
            + self.target.env_toml
            + textwrap.dedent(self.env_extra)
            # failing checks should fail fast in tests
            + "\n[environments.test.health]\nretries = 1\ninterval = 0.05\n\n"
            + textwrap.dedent(self.sections)
        )
        self.config.write_text(text)

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        full_env.pop("SWITCHOVER_CONFIG", None)
        self.last = subprocess.run(
            [sys.executable, "-m", "switchover", "-c", str(self.config), *args],
            capture_output=True, text=True, timeout=timeout, env=full_env, cwd=self.dir,
        )
        return self.last

    def ok(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        r = self.run(*args, **kw)
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def json(self, *args: str, code: int = 0) -> Any:
        r = self.run("--json", *args)
        assert r.returncode == code, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return json.loads(r.stdout)

    # -- reading the hosts directly ------------------------------------------------------

    def root(self, host: str | None = None) -> Path:
        return self.target.roots[host or self.target.hosts[0]]

    def current(self, host: str | None = None) -> str | None:
        link = self.root(host) / "current"
        if not link.is_symlink():
            assert not link.exists(), "current exists but is not a symlink"
            return None
        target = os.readlink(link)
        assert not target.startswith("/"), "current must be a relative link"
        assert target.startswith("releases/")
        return target.removeprefix("releases/")

    def releases(self, host: str | None = None) -> list[str]:
        d = self.root(host) / "releases"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def history(self, host: str | None = None) -> list[dict[str, Any]]:
        p = self.root(host) / ".switchover" / "history.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def events(self, host: str | None = None) -> list[str]:
        return [e["event"] for e in self.history(host)]

    def live_file(self, name: str, host: str | None = None) -> str:
        rid = self.current(host)
        assert rid is not None
        return (self.root(host) / "releases" / rid / name).read_text()

    def settle(self, seconds: float = 20) -> None:
        """Wait (bounded) for the hosts' background work after a deploy (see settle).
        Before a test compares whole host trees."""
        settle(self.target.roots.values(), seconds)

    def locked(self, host: str | None = None) -> bool:
        return (self.root(host) / ".switchover" / "lock").exists()


def ssh_target(fleet: Any, name: str, hosts: int = 2) -> Target:
    deploy_to = f"{fleet.remote_root}/{name}"
    chosen = fleet.hosts[:hosts]
    roots = {h.alias: h.root / name for h in chosen}
    env = (
        "hosts = [" + ", ".join(json.dumps(h.alias) for h in chosen) + "]\n"
        + f"ssh_config = {json.dumps(str(fleet.ssh_config))}\n"
    )
    return Target("ssh", deploy_to, roots, env, fleet)


def local_target(base: Path) -> Target:
    deploy_to = base / "deploy"
    return Target("local", str(deploy_to), {"localhost": deploy_to}, "")
