"""Operations on one host: each one builds its script (commands.py) and runs it (transport).

Errors come back as domain exceptions naming the host; the orchestrator decides what a
failure means for the fleet.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchover import commands as C
from switchover.errors import HostError, LockedError, SwitchoverError
from switchover.hosts import HostSpec
from switchover.layout import Layout
from switchover.releases import ReleaseStates, analyze, is_release_id
from switchover.transport import Result, SyncStats, Transport


@dataclass
class HostState:
    """What a host looks like right now, read in one round trip."""

    current_kind: str = "none"  # link, dir, other or none
    current_target: str | None = None  # the raw symlink target
    releases: list[str] = field(default_factory=list)
    staging: list[str] = field(default_factory=list)
    lock: dict[str, Any] | None = None  # None: not locked; {} if the owner is unreadable
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def current(self) -> str | None:
        """The live release id, if `current` is a link into releases/."""
        if self.current_kind != "link" or not self.current_target:
            return None
        target = self.current_target.rstrip("/")
        parent, name = posixpath.split(target)
        if is_release_id(name) and posixpath.basename(parent) == "releases":
            return name
        return None

    def states(self) -> ReleaseStates:
        return analyze(self.history, self.releases, self.current)


def parse_lock(lines: Sequence[str]) -> dict[str, Any] | None:
    if not lines or lines[0] != "held":
        return None
    for line in lines[1:]:
        try:
            owner = json.loads(line)
        except ValueError:
            continue
        if isinstance(owner, dict):
            return owner
    return {}


def parse_history(lines: Iterable[str]) -> list[dict[str, Any]]:
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line after a crash must not make the host unreadable
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def parse_state(output: str) -> HostState:
    s = C.parse_sections(output)
    if "end" not in s:
        raise ValueError("incomplete state output")
    current = s.get("current", [])
    kind = current[0] if current else "none"
    return HostState(
        current_kind=kind,
        current_target=current[1] if kind == "link" and len(current) > 1 else None,
        releases=sorted(r for r in s.get("releases", []) if is_release_id(r)),
        staging=[r for r in s.get("staging", []) if r],
        lock=parse_lock(s.get("lock", [])),
        history=parse_history(s.get("history", [])),
    )


def describe_owner(owner: Mapping[str, Any] | None) -> str:
    if not owner:
        return "an unknown deploy (no owner information)"
    who = owner.get("user", "?")
    origin = owner.get("origin", "?")
    return f"{who}@{origin} (pid {owner.get('pid', '?')}, since {owner.get('time', '?')})"


class HostOps:
    def __init__(self, spec: HostSpec, transport: Transport, layout: Layout, timeout: float):
        self.spec = spec
        self.transport = transport
        self.layout = layout
        self.timeout = timeout

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, script: str, timeout: float | None = None) -> Result:
        return self.transport.run(script, timeout=timeout or self.timeout)

    def _must(self, result: Result, what: str) -> Result:
        if result.rc != 0:
            raise HostError(f"{what} failed: {result.message}", host=self.name)
        return result

    def connect(self) -> None:
        self.transport.connect()

    def read_state(self) -> HostState:
        r = self._must(self.run(C.dump_state(self.layout)), "reading state")
        return self._parse(r.stdout)

    def _parse(self, out: str) -> HostState:
        try:
            return parse_state(out)
        except ValueError:
            raise HostError("could not read the host's state (unexpected output)",
                            host=self.name) from None

    def acquire(self, owner: Mapping[str, Any]) -> HostState:
        """Take the deploy lock and read the state; LockedError names the holder."""
        r = self.run(C.acquire(self.layout, owner))
        if r.rc == C.RC_LOCKED:
            held = parse_lock(["held", *C.parse_sections(r.stdout).get("lock", [])])
            raise LockedError(
                f"locked by {describe_owner(held)}",
                hint="wait for that deploy, or run `switchover unlock ENV` if it died",
                host=self.name,
            )
        self._must(r, "preparing the layout")
        return self._parse(r.stdout)

    def release_lock(self, deploy_id: str) -> None:
        self.run(C.release_lock(self.layout, deploy_id), timeout=30)

    def force_unlock(self) -> dict[str, Any] | None:
        r = self._must(self.run(C.force_unlock(self.layout)), "unlocking")
        lines = C.parse_sections(r.stdout).get("lock")
        return None if lines is None else (parse_lock(["held", *lines]) or {})

    def begin(self, release: str, entry: Mapping[str, Any]) -> None:
        self._must(self.run(C.begin(self.layout, release, entry)), "starting the release")

    def upload(self, tree: Path, release: str, link_dest: str | None,
               exclude: Sequence[str]) -> SyncStats:
        return self.transport.sync(tree, self.layout.staging(release), link_dest=link_dest,
                                   exclude=exclude, timeout=self.timeout)

    def finalize(self, release: str, files: Sequence[str], dirs: Sequence[str]) -> None:
        r = self.run(C.finalize(self.layout, release, files, dirs))
        if r.rc == C.RC_SHARED_MISSING:
            raise HostError(r.message, host=self.name)
        self._must(r, "finalizing the release")

    def run_in_release(self, release: str, command: str, env: Mapping[str, str],
                       timeout: float | None = None) -> Result:
        script = C.run_in_release(self.layout, release, command, env, timeout)
        # Give the host's own `timeout` a head start so it, not ssh, reports a stuck command.
        return self.run(script, timeout=(timeout + 10) if timeout else None)

    def switch(self, release: str | None, entries: Iterable[Mapping[str, Any]]) -> None:
        r = self.run(C.switch(self.layout, release, entries))
        if r.rc != 0:
            raise SwitchoverError(f"switch failed: {r.message}", host=self.name)

    def record(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._must(self.run(C.append_history(self.layout, entries)), "writing history")

    def remove_releases(self, releases: Iterable[str]) -> None:
        ids = list(releases)
        if ids:
            self._must(self.run(C.remove_releases(self.layout, ids)), "removing releases")

    def remove_staging(self, release: str) -> None:
        self.run(f"rm -rf {C.q(self.layout.staging(release))}", timeout=60)

    def check_prerequisites(self, need_rsync: bool) -> str:
        r = self.run(C.check_prerequisites(self.layout, need_rsync))
        if r.rc != 0:
            raise HostError(r.message, host=self.name)
        return r.stdout.strip()

    def close(self) -> None:
        # Closing must never hide the error that brought us here.
        with contextlib.suppress(Exception):
            self.transport.close()
