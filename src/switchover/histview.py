"""`history` filters (--since, --host) and its table. Pure: no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.markup import escape
from rich.table import Table

from switchover.errors import UsageError

_RELATIVE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
ENDINGS = ("deploy_succeeded", "deploy_failed")
STYLES = {"deploy_succeeded": "green", "deploy_failed": "bold red", "rolled_back": "yellow",
          "rollback": "yellow", "unlock": "magenta"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`2h`, `30m`, `3d`, `1w`, `45s` ago, or an ISO date / date-time (UTC when it says `Z`
    or an offset, else local time). Returns an aware UTC datetime."""
    text = value.strip()
    m = _RELATIVE.match(text)
    if m:
        now = now or datetime.now(UTC)
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {value!r}: expected an ISO date or time (2026-01-31, "
                         "2026-01-31T14:00, ...Z) or an age like 30m, 2h, 3d, 1w") from None
    if when.tzinfo is None:
        when = when.astimezone()  # an operator's bare date means their own clock
    return when.astimezone(UTC)


def entry_time(entry: dict[str, Any]) -> datetime | None:
    value = entry.get("time")
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def since_filter(entries: Iterable[dict[str, Any]], since: datetime) -> list[dict[str, Any]]:
    """Entries at or after `since`; entries without a readable time are left out."""
    return [e for e in entries if (t := entry_time(e)) is not None and t >= since]


def durations(entries: Sequence[dict[str, Any]]) -> dict[int, float]:
    """id(entry) -> seconds for entries that end a deploy: the recorded `seconds`, else the
    time since the same deploy's `deploy_started` on the same host (whole seconds)."""
    started: dict[tuple[Any, Any], datetime] = {}
    out: dict[int, float] = {}
    for e in entries:
        key = (e.get("deploy_id"), e.get("host"))
        if e.get("event") == "deploy_started":
            t = entry_time(e)
            if t is not None:
                started[key] = t
        elif e.get("event") in ENDINGS:
            if isinstance(e.get("seconds"), int | float):
                out[id(e)] = float(e["seconds"])
            elif key in started and (t := entry_time(e)) is not None:
                out[id(e)] = (t - started[key]).total_seconds()
    return out


def _seconds_text(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    minutes, secs = divmod(round(s), 60)
    return f"{minutes}m{secs:02d}s"


def table(entries: Sequence[dict[str, Any]],
          everything: Sequence[dict[str, Any]] | None = None) -> Table:
    """time, host, event, release, user, duration, message. `everything`: the unfiltered
    entries `entries` were taken from, so a duration can reach back past a filter."""
    t = Table()
    for name in ("time", "host", "event", "release", "user", "duration"):
        t.add_column(name, no_wrap=True)  # narrow terminals wrap the message, not these
    t.add_column("message")
    took = durations(everything if everything is not None else entries)
    for e in entries:
        event = str(e.get("event", "?"))
        label = escape(event + (" (interrupted)" if e.get("interrupted") else ""))
        style = STYLES.get(event)
        when = str(e.get("time") or "").replace("T", " ")
        t.add_row(
            escape(when), escape(str(e.get("host") or "")),
            f"[{style}]{label}[/]" if style else label,
            escape(str(e.get("release") or "")), escape(str(e.get("user") or "")),
            _seconds_text(took[id(e)]) if id(e) in took else "",
            escape(str(e.get("message") or "")),
        )
    return t
