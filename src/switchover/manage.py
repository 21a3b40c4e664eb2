"""Every command but deploy: rollback, status, releases, history, cleanup, unlock, setup."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from switchover import commands as C
from switchover import locks
from switchover.config import Environment
from switchover.context import RunContext
from switchover.errors import (
    DeployFailed,
    HostError,
    RollbackFailed,
    SwitchoverError,
    UsageError,
    as_error,
)
from switchover.fanout import Outcome, fan_out
from switchover.hostops import HostOps, HostState, describe_owner
from switchover.output import Reporter
from switchover.releases import is_release_id, select_prune
from switchover.session import hook_environment, report_step_hooks

T = TypeVar("T")


@dataclass
class CommandResult:
    """What a command produced: a JSON document, and the exit code it earned."""

    doc: Any
    exit_code: int = 0
    lines: list[str] = field(default_factory=list)


def _on_hosts(hosts: Sequence[HostOps], env: Environment,
              fn: Callable[[HostOps], T]) -> list[Outcome[T]]:
    def wrapped(h: HostOps) -> T:
        h.connect()
        return fn(h)

    try:
        return fan_out(hosts, wrapped, env.parallel)
    finally:
        for h in hosts:
            h.close()


def _worst(errors: Sequence[BaseException | None]) -> int:
    codes = [as_error(e).code for e in errors if e is not None]
    return int(max(codes)) if codes else 0


def _error_text(e: BaseException | None) -> str | None:
    return None if e is None else as_error(e).message


# -- read-only views ------------------------------------------------------------------------


def status(env: Environment, hosts: Sequence[HostOps]) -> CommandResult:
    outcomes = _on_hosts(hosts, env, lambda h: h.read_state())
    rows = []
    for h, o in zip(hosts, outcomes, strict=True):
        st: HostState | None = o.value
        if st is None:
            rows.append({"host": h.name, "reachable": False, "current": None, "previous": None,
                         "locked": None, "error": _error_text(o.error)})
            continue
        states = st.states()
        # A lock whose owner is provably gone is not a deploy in progress.
        live_lock = st.live_lock(env.lock_timeout)
        stale = None if st.lock is None or live_lock is not None else locks.stale_reason(
            st.lock, st.lock_heartbeat_age, env.lock_timeout)
        rows.append({
            "host": h.name,
            "reachable": True,
            "current": st.current,
            "current_target": st.current_target,
            "previous": states.previous,
            "locked": st.lock is not None,
            "lock_owner": st.lock,
            "releases": len(st.releases),
            "lock_stale": stale,
            "last_deploy": last_deploy(st.history, None if stale else st.lock),
            "error": None,
        })
    live = {r["current"] for r in rows if r["reachable"]}
    doc = {"environment": env.name, "app": env.app, "drift": len(live) > 1, "hosts": rows}
    return CommandResult(doc, _worst([o.error for o in outcomes]))


def releases(env: Environment, hosts: Sequence[HostOps]) -> CommandResult:
    outcomes = _on_hosts(hosts, env, lambda h: h.read_state())
    rows = []
    for h, o in zip(hosts, outcomes, strict=True):
        if o.value is None:
            rows.append({"host": h.name, "error": _error_text(o.error), "releases": []})
        else:
            rows.append({"host": h.name, "error": None,
                         "releases": o.value.states().listing()})
    live = {next((r["id"] for r in row["releases"] if r["state"] == "live"), None)
            for row in rows if not row["error"]}
    return CommandResult({"environment": env.name, "drift": len(live) > 1, "hosts": rows},
                         _worst([o.error for o in outcomes]))


ENDINGS = frozenset({"deploy_succeeded", "deploy_failed"})


def mark_interrupted(entries: list[dict[str, Any]], lock: dict[str, Any] | None) -> None:
    """Flag deploy_started entries that never got an ending (and are not running now)."""
    ended = {(e.get("deploy_id"), e.get("release")) for e in entries if e.get("event") in ENDINGS}
    running = (lock or {}).get("deploy_id")
    for e in entries:
        if e.get("event") == "deploy_started":
            key = (e.get("deploy_id"), e.get("release"))
            if key not in ended and e.get("deploy_id") != running:
                e["interrupted"] = True


def last_deploy(entries: list[dict[str, Any]], lock: dict[str, Any] | None
                ) -> dict[str, Any] | None:
    """The host's latest deploy and how it ended: succeeded, failed, running or interrupted."""
    started = next((e for e in reversed(entries) if e.get("event") == "deploy_started"), None)
    if started is None:
        return None
    key = (started.get("deploy_id"), started.get("release"))
    state = "interrupted"
    for e in entries:
        if e.get("event") in ENDINGS and (e.get("deploy_id"), e.get("release")) == key:
            state = "succeeded" if e.get("event") == "deploy_succeeded" else "failed"
    if state == "interrupted" and (lock or {}).get("deploy_id") == started.get("deploy_id"):
        state = "running"
    return {"release": started.get("release"), "deploy_id": started.get("deploy_id"),
            "user": started.get("user"), "origin": started.get("origin"),
            "time": started.get("time"), "state": state}


def history(env: Environment, hosts: Sequence[HostOps]) -> CommandResult:
    """Every host's history merged in time order (the CLI filters and limits it)."""
    outcomes = _on_hosts(hosts, env, lambda h: h.read_state(full_history=True))
    entries: list[dict[str, Any]] = []
    for h, o in zip(hosts, outcomes, strict=True):
        if o.value is not None:
            st = o.value
            own = [dict(e, host=e.get("host") or h.name) for e in st.history]
            # A stale lock (its owner provably gone) is not a deploy still running.
            mark_interrupted(own, st.live_lock(env.lock_timeout))
            entries.extend(own)
    # Stable sort: equal timestamps keep each host's own append order.
    entries.sort(key=lambda e: str(e.get("time", "")))
    errors = [o.error for o in outcomes]
    lines = [f"{h.name}: {_error_text(o.error)}" for h, o in zip(hosts, outcomes, strict=True)
             if o.error]
    return CommandResult(entries, _worst(errors), lines)


# -- commands that change hosts -------------------------------------------------------------


def _locked(env: Environment, hosts: Sequence[HostOps], ctx: RunContext, command: str,
            act: Callable[[HostOps, HostState], T],
            check: Callable[[HostOps, HostState], None] | None = None) -> list[Outcome[T]]:
    """Lock every host and run `check` on each; only if all passed, run `act` on each.

    A host that cannot be locked, or fails its check, means nothing changes anywhere.
    Locks are released on every path out.
    """
    states: dict[str, HostState] = {}

    def take(h: HostOps) -> None:
        h.connect()
        states[h.name] = h.acquire(ctx.owner(command))
        if check is not None:
            check(h, states[h.name])

    try:
        first = fan_out(hosts, take, env.parallel)
        if any(not o.ok for o in first):
            return [Outcome(error=o.error) if not o.ok else
                    Outcome(error=HostError("not changed: another host failed", host=h.name))
                    for h, o in zip(hosts, first, strict=True)]
        return fan_out(hosts, lambda h: act(h, states[h.name]), env.parallel)
    finally:
        locked = [h for h in hosts if h.name in states]
        fan_out(locked, lambda h: h.release_lock(ctx.deploy_id), env.parallel)
        for h in hosts:
            h.close()


def rollback(env: Environment, hosts: Sequence[HostOps], ctx: RunContext, out: Reporter,
             to: str | None) -> CommandResult:
    if to is not None and not is_release_id(to):
        raise UsageError(f"--to {to!r} is not a release id (YYYYMMDD_HHMMSS)")
    plans: dict[str, tuple[str, str | None]] = {}

    def plan(h: HostOps, st: HostState) -> tuple[str, str | None]:
        states = st.states()
        if to is not None:
            if to not in st.releases:
                raise UsageError(f"release {to} does not exist on this host", host=h.name)
            if to in states.failed:
                raise UsageError(f"release {to} failed its checks: refusing to roll back to it",
                                 host=h.name)
            if to == st.current:
                raise UsageError(f"release {to} is already live", host=h.name)
            return to, st.current
        if states.previous is None:
            raise DeployFailed("nothing to roll back to: no known-good release before "
                               f"{st.current or '(none)'}", host=h.name)
        return states.previous, st.current

    def do(h: HostOps, st: HostState) -> dict[str, Any]:
        target, live = plans[h.name]
        entry = ctx.entry("rollback", h.name, release=target, previous=live,
                          message=f"manual rollback from {live}")
        hooks = list(env.hooks.after_rollback)
        env_vars = hook_environment(env, h.name, target, h.layout.release(target), live)
        # The switch and the after_rollback restart are ONE detached step on the host (as a
        # deploy's switch is): a dropped link cannot leave it switched but not restarted.
        try:
            step = h.switch_with_hooks(target, [entry], hooks, env_vars, env.timeout,
                                       token=ctx.deploy_id, rollback=True)
        except SwitchoverError as e:
            raise RollbackFailed(e.message, host=h.name) from None
        if not step.switched:
            raise RollbackFailed(f"switch failed: {step.message}", host=h.name)
        out.step(h.name, f"rolled back: current -> {target} (was {live})")
        failure = report_step_hooks(h, out, "after_rollback", hooks, step)
        if failure is not None:
            raise RollbackFailed(f"switched to {target}, but {failure}", host=h.name)
        return {"host": h.name, "release": target, "previous": live}

    def check(h: HostOps, st: HostState) -> None:
        plans[h.name] = plan(h, st)

    outcomes = _locked(env, hosts, ctx, "rollback", do, check)
    return _result(hosts, outcomes, "rollback")


def _result(hosts: Sequence[HostOps], outcomes: Sequence[Outcome[dict[str, Any]]],
            command: str) -> CommandResult:
    """One row per host: its own fields when it worked, its error when not."""
    rows = []
    for h, o in zip(hosts, outcomes, strict=True):
        if o.ok:
            rows.append({"host": h.name, "status": "ok", **(o.value or {})})
        else:
            rows.append({"host": h.name, "status": "failed", "error": _error_text(o.error)})
    code = _worst([o.error for o in outcomes])
    return CommandResult({"command": command, "status": "ok" if code == 0 else "failed",
                          "hosts": rows}, code)


def cleanup(env: Environment, hosts: Sequence[HostOps], ctx: RunContext, out: Reporter,
            keep: int | None) -> CommandResult:
    keep_n = keep if keep is not None else env.keep_releases
    if keep_n < 1:
        raise UsageError("--keep must be at least 1")

    def do(h: HostOps, st: HostState) -> dict[str, Any]:
        prune = select_prune(st.states(), keep_n)
        if prune:
            h.remove_releases(prune)
            h.record([ctx.entry("cleanup", h.name, release=None, previous=None,
                                message="removed " + " ".join(prune), removed=prune)])
        out.step(h.name, f"removed {len(prune)} release(s)" + (f": {' '.join(prune)}"
                                                                if prune else ""))
        return {"removed": prune, "kept": [r for r in st.releases if r not in prune]}

    return _result(hosts, _locked(env, hosts, ctx, "cleanup", do), "cleanup")


def unlock(env: Environment, hosts: Sequence[HostOps], ctx: RunContext,
           out: Reporter) -> CommandResult:
    def do(h: HostOps) -> dict[str, Any]:
        owner = h.force_unlock()
        if owner is None:
            out.step(h.name, "not locked")
            return {"was_locked": False, "owner": None}
        who = describe_owner(owner)
        h.record([ctx.entry("unlock", h.name, release=owner.get("release"), previous=None,
                            message=f"removed lock held by {who}", former_owner=owner)])
        out.step(h.name, f"removed lock held by {who}")
        return {"was_locked": True, "owner": owner}

    return _result(hosts, _on_hosts(hosts, env, do), "unlock")


def setup(env: Environment, hosts: Sequence[HostOps], out: Reporter) -> CommandResult:
    def do(h: HostOps) -> dict[str, Any]:
        df = C.parse_disk_free(h.check_prerequisites(need_rsync=not env.is_local))
        free_kb = df[1] if df is not None else None
        free = f"{free_kb / 1024 / 1024:.1f} GiB free" if free_kb is not None else "free: ?"
        out.good(h.name, f"ready: {h.layout.deploy_to} ({free})")
        return {"deploy_to": h.layout.deploy_to, "free_kb": free_kb}

    return _result(hosts, _on_hosts(hosts, env, do), "setup")


__all__ = ["CommandResult", "cleanup", "history", "releases", "rollback", "setup", "status",
           "unlock"]
