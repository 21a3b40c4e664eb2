"""Release ids and what the history says about each release. Pure logic, no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

RELEASE_RE = re.compile(r"[0-9]{8}_[0-9]{6}(?:_[0-9]{2,})?")  # ASCII digits only; fullmatch

# History events that leave the named release live on the host.
SWITCH_EVENTS = frozenset({"switched", "rolled_back", "rollback"})


def is_release_id(value: str) -> bool:
    return bool(RELEASE_RE.fullmatch(value))


def new_release_id(existing: Iterable[str], now: datetime | None = None) -> str:
    """A UTC `YYYYMMDD_HHMMSS` id that sorts after every existing one.

    Two deploys in one second, or a clock that stepped back, get a zero-padded suffix
    (`_02`, `_03`, ...) so that string order stays deploy order.
    """
    now = now or datetime.now(UTC)
    base = now.strftime("%Y%m%d_%H%M%S")
    newest = max((r for r in existing if is_release_id(r)), default=None)
    if newest is None or base > newest:
        return base
    stem, suffix = newest[:15], newest[16:]
    if base > stem:
        return base
    n = int(suffix) + 1 if suffix else 2
    return f"{stem}_{n:02d}"


def choose_release_id(candidate: str, used: Iterable[str],
                      now: datetime | None = None) -> str:
    """The id for a deploy that proposed `candidate` before it knew the hosts' ids: the
    candidate if it is unused and newer than every id in use, else a new one after all."""
    used = set(used)
    if candidate not in used and all(candidate > u for u in used if is_release_id(u)):
        return candidate
    return new_release_id(used | {candidate}, now)


@dataclass
class ReleaseStates:
    """Every release on a host with its state, derived from the history and the disk."""

    live: str | None
    previous: str | None  # the rollback target
    failed: set[str] = field(default_factory=set)
    good: set[str] = field(default_factory=set)
    on_disk: list[str] = field(default_factory=list)

    def state_of(self, release: str) -> str:
        if release == self.live:
            return "live"
        if release == self.previous:
            return "previous"
        if release in self.failed:
            return "failed"
        return "available"

    def listing(self) -> list[dict[str, str]]:
        return [{"id": r, "state": self.state_of(r)} for r in self.on_disk]


def analyze(
    history: Sequence[dict[str, Any]], on_disk: Iterable[str], live: str | None
) -> ReleaseStates:
    """Work out failed and known-good releases and the rollback target.

    A release is known-good once a deploy of it succeeded (it was live and passed its
    checks), or once we rolled back to it. A failed deploy marks it failed. The rollback
    target is the newest known-good release older than the live one that is still on disk:
    never chosen by directory name or mtime alone, never a failed or never-activated one.
    """
    disk = sorted(r for r in set(on_disk) if is_release_id(r))
    good: set[str] = set()
    failed: set[str] = set()
    for entry in history:
        release = entry.get("release")
        if not isinstance(release, str):
            continue
        event = entry.get("event")
        if event == "deploy_succeeded":
            good.add(release)
            failed.discard(release)
        elif event == "deploy_failed":
            failed.add(release)
            good.discard(release)
        elif event in ("rolled_back", "rollback") and release not in failed:
            good.add(release)
    candidates = [r for r in disk if r in good and r not in failed and (live is None or r < live)]
    previous = candidates[-1] if candidates and live is not None else None
    return ReleaseStates(live=live, previous=previous, failed=failed, good=good, on_disk=disk)


def select_prune(states: ReleaseStates, keep: int, protect: Iterable[str] = ()) -> list[str]:
    """Releases cleanup may delete: every failed one, and healthy ones beyond the newest `keep`.

    Failed releases do not count toward `keep`; the live release, the rollback target and
    anything in `protect` are never selected.
    """
    keep = max(1, keep)
    protected = {r for r in (states.live, states.previous, *protect) if r}
    healthy = [r for r in states.on_disk if r not in states.failed]
    kept = set(healthy[-keep:])
    return [r for r in states.on_disk if r not in protected and r not in kept]


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
