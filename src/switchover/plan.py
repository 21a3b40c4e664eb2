"""`deploy --dry-run` and `diff`: what a deploy would do, read from the hosts, changing nothing.

Each host is read with `HostOps.read_state` (never `acquire`, which creates the layout and
takes the lock) and compared with an rsync dry run against its live release. No directory,
lock, staging upload or history line is created anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text

from switchover.artifact import Artifact, prepare
from switchover.config import Environment
from switchover.errors import ArtifactError, HostError, LockedError, SwitchoverError, as_error
from switchover.fanout import fan_out
from switchover.health import expand_url
from switchover.hostops import HostOps, HostState, describe_owner
from switchover.output import Reporter
from switchover.releases import analyze, new_release_id, select_prune
from switchover.treediff import TreeDiff, everything
from switchover.units import human_size


def compare_excludes(env: Environment) -> list[str]:
    """The artifact's excludes plus the shared items (anchored): in a release those are links
    into shared/, so comparing them with the artifact's copies would report noise."""
    shared = [*env.shared.files, *env.shared.dirs]
    return [*env.artifact.exclude, *("/" + item.strip("/") for item in shared)]


@dataclass
class HostView:
    """One host as read for a plan: its state and how the artifact differs from its live
    release (everything is new when nothing is live)."""

    ops: HostOps
    state: HostState
    live: str | None
    diff: TreeDiff


def read_hosts(env: Environment, hosts: Sequence[HostOps], artifact: Artifact,
               out: Reporter) -> list[HostView | SwitchoverError]:
    """Connect, read the state and compare, on every host in parallel; close them after."""
    excludes = compare_excludes(env)

    def read(h: HostOps) -> HostView:
        with out.activity(h.name, "reading state and comparing with the live release",
                          announce=False):
            h.connect()
            st = h.read_state()
            live = st.current if st.current in st.releases else None
            diff = h.compare(artifact.tree, live, excludes) if live else everything(
                artifact.tree, excludes)
        return HostView(h, st, live, diff)

    try:
        outcomes = fan_out(hosts, read, env.parallel)
    finally:
        for h in hosts:
            h.close()
    views: list[HostView | SwitchoverError] = []
    for h, o in zip(hosts, outcomes, strict=True):
        if o.value is not None:
            views.append(o.value)
        else:
            assert o.error is not None
            # Anything unexpected here kept us from reading the host: unreachable (3).
            views.append(as_error(o.error, h.name, HostError))
    return views


def _worst(codes: Sequence[int]) -> int:
    return max(codes, default=0)


def _artifact_doc(artifact: Artifact) -> dict[str, Any]:
    return {"source": str(artifact.source), "files": artifact.files, "bytes": artifact.size,
            "sha256": artifact.sha256}


def _blocker(view: HostView) -> tuple[str, int] | None:
    """Why the deploy would stop at this host before changing anything, if it would."""
    st, layout = view.state, view.ops.layout
    held = st.live_lock(view.ops.locking.timeout)
    if held is not None:  # a stale lock would be taken over, as `deploy` does
        return f"locked by {describe_owner(held)}", int(LockedError.code)
    if st.current_kind == "dir":
        return f"{layout.current} is a real directory, not a symlink", int(HostError.code)
    if st.current_kind == "other":
        return f"{layout.current} exists and is not a symlink", int(HostError.code)
    return None


def deploy_plan(env: Environment, views: Sequence[HostView | SwitchoverError],
                artifact: Artifact, *, checks: Sequence[str], urls: Sequence[str],
                build: str | None) -> dict[str, Any]:
    """The plan as one JSON-able document (see `render_plan` for the text form)."""
    release = new_release_id(
        {r for v in views if isinstance(v, HostView) for r in v.state.used_ids()})
    command_checks = [*env.health.commands, *checks]
    url_checks = [*env.health.urls, *urls]
    rows: list[dict[str, Any]] = []
    codes: list[int] = []
    for v in views:
        if not isinstance(v, HostView):
            rows.append({"host": v.host, "reachable": False, "error": v.message})
            codes.append(int(v.code))
            continue
        st = v.state
        done = {"event": "deploy_succeeded", "release": release}
        after = analyze([*st.history, done], [*st.releases, release], release)
        blocked = _blocker(v)
        if blocked:
            codes.append(blocked[1])
        rows.append({
            "host": v.ops.name,
            "reachable": True,
            "error": None,
            "blocked": blocked[0] if blocked else None,
            "live": st.current,
            "rollback_target": st.states().previous,
            "new_release": release,
            "link_dest": v.live,
            "locked": st.lock is not None,
            "lock_owner": st.lock,
            "changes": v.diff.to_json(),
            "health_urls": [expand_url(u, v.ops.spec.host) for u in url_checks],
            "cleanup": select_prune(after, env.keep_releases, protect=[release]),
            "deploy_to": v.ops.layout.deploy_to,
        })
    code = _worst(codes)
    return {
        "command": "deploy",
        "dry_run": True,
        "status": "planned" if code == 0 else "blocked",
        "exit_code": code,
        "app": env.app,
        "environment": env.name,
        "release": release,
        "artifact": _artifact_doc(artifact),
        "build": build,
        "shared": {"files": list(env.shared.files), "dirs": list(env.shared.dirs)},
        "hooks": {"before_switch": list(env.hooks.before_switch),
                  "after_switch": list(env.hooks.after_switch),
                  "after_rollback": list(env.hooks.after_rollback)},
        "checks": {"commands": command_checks, "urls": url_checks},
        "keep_releases": env.keep_releases,
        "hosts": rows,
    }


def _stat_line(stat: dict[str, dict[str, int]]) -> str:
    parts = [f"{stat['added']['files']} added ({human_size(stat['added']['bytes'])})",
             f"{stat['changed']['files']} changed ({human_size(stat['changed']['bytes'])})",
             f"{stat['deleted']['files']} deleted ({human_size(stat['deleted']['bytes'])})"]
    if stat["touched"]["files"]:
        parts.append(f"{stat['touched']['files']} with only a new mtime")
    return ", ".join(parts)


def _list_lines(text: Text, changes: dict[str, Any], indent: str,
                touched: bool = False) -> None:
    marks = [("added", "+", "green"), ("changed", "M", "yellow"), ("deleted", "-", "red")]
    if touched:
        marks.append(("touched", "T", "dim"))
    for kind, mark, style in marks:
        for c in changes.get(kind, []):
            text.append(f"{indent}{mark} {c['path']}", style=style)
            text.append(f" ({human_size(c['size'])})\n", style="dim")


def render_plan(doc: dict[str, Any], verbose: int = 0) -> Text:
    """The plan as an operator reads it."""
    t = Text()
    art = doc["artifact"]
    t.append(f"Plan: deploy {doc['app']} to {doc['environment']} as release {doc['release']}",
             style="bold")
    t.append(" (dry run: nothing was changed)\n", style="dim")
    t.append(f"  artifact: {art['source']} ({art['files']} files, "
             f"{human_size(art['bytes'])})\n")
    if doc["build"]:
        t.append(f"  build (not run by --dry-run): {doc['build']}\n")
    shared = doc["shared"]
    if shared["files"] or shared["dirs"]:
        t.append(f"  shared, linked into the release: "
                 f"{', '.join([*shared['files'], *shared['dirs']])}\n")
    for stage in ("before_switch", "after_switch"):
        hooks = doc["hooks"][stage]
        t.append(f"  {stage} hooks: {'; '.join(hooks) if hooks else '(none)'}\n")
    checks = doc["checks"]
    names = [*checks["commands"], *checks["urls"]]
    t.append(f"  health checks: {'; '.join(names) if names else '(none)'}\n")
    if doc["hooks"]["after_rollback"]:
        t.append(f"  on failure, after_rollback: {'; '.join(doc['hooks']['after_rollback'])}\n")
    for h in doc["hosts"]:
        t.append(f"{h['host']}: ", style="bold")
        if not h["reachable"]:
            t.append(f"unreachable: {h['error']}\n", style="bold red")
            continue
        t.append(f"{h['live'] or '(nothing live)'} -> {h['new_release']}\n")
        if h["blocked"]:
            t.append(f"  a deploy would stop here: {h['blocked']}\n", style="bold red")
        base = f"against {h['link_dest']}" if h["link_dest"] else "nothing live to compare with"
        t.append(f"  files ({base}): {_stat_line(h['changes']['stat'])}\n")
        if verbose:
            _list_lines(t, h["changes"], "    ", touched=verbose > 1)
        if h["cleanup"]:
            t.append(f"  cleanup would remove: {' '.join(h['cleanup'])}\n")
        else:
            t.append("  cleanup would remove: nothing\n")
    t.rstrip()
    return t


def diff_doc(env: Environment, views: Sequence[HostView | SwitchoverError], artifact: Artifact,
             *, paths: bool = True) -> tuple[dict[str, Any], int]:
    rows: list[dict[str, Any]] = []
    codes: list[int] = []
    for v in views:
        if not isinstance(v, HostView):
            rows.append({"host": v.host, "error": v.message, "live": None})
            codes.append(int(v.code))
            continue
        rows.append({"host": v.ops.name, "error": None, "live": v.live,
                     **v.diff.to_json(paths=paths)})
    code = _worst(codes)
    return ({"command": "diff", "app": env.app, "environment": env.name,
             "artifact": _artifact_doc(artifact), "hosts": rows}, code)


def render_diff(doc: dict[str, Any], stat_only: bool, verbose: int = 0) -> Text:
    t = Text()
    for h in doc["hosts"]:
        if h["error"]:
            t.append(f"{h['host']}: ", style="bold")
            t.append(f"{h['error']}\n", style="bold red")
            continue
        against = f"live release {h['live']}" if h["live"] else "nothing live (all new)"
        t.append(f"{h['host']}", style="bold")
        t.append(f" ({against}): {_stat_line(h['stat'])}\n")
        if not stat_only:
            _list_lines(t, h, "  ", touched=verbose > 0)
    t.rstrip()
    return t


def dry_run(env: Environment, hosts: Sequence[HostOps], out: Reporter, source: Path, *,
            build: str | None, checks: Sequence[str], urls: Sequence[str],
            json_mode: bool) -> int:
    """`deploy --dry-run`: print the plan (or its JSON document); return the exit code a
    deploy would meet before changing anything (3 unreachable, 4 locked, else 0)."""
    try:
        art = prepare(source, env.artifact.exclude)
    except ArtifactError as e:
        if build:
            e.hint = f"--dry-run does not run the build: run `{build}` first, or pass --artifact"
        raise
    try:
        views = read_hosts(env, hosts, art, out)
        doc = deploy_plan(env, views, art, checks=checks, urls=urls, build=build)
    finally:
        art.cleanup()
    if json_mode:
        out.emit_json(doc)
    else:
        out.print(render_plan(doc, out.verbose))
    n = len(doc["hosts"])
    if doc["exit_code"] == 0:
        out.result_line(f"{env.name}: dry run: release {doc['release']} would go live on {n} "
                        f"host{'s' if n != 1 else ''}; nothing was changed")
    else:
        why = "; ".join(f"{h['host']}: {h.get('blocked') or h.get('error')}"
                        for h in doc["hosts"] if h.get("blocked") or h.get("error"))
        out.result_line(f"{env.name}: dry run: a deploy now would stop before changing "
                        f"anything ({why}); nothing was changed", ok=False)
    return int(doc["exit_code"])
