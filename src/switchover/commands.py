"""Build the POSIX sh scripts a deploy runs on a host. Pure: nothing here touches a host.

Every value that reaches the shell goes through `q` (shlex.quote). Scripts report problems
with the exit codes below so the caller can tell a held lock from a broken layout.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from switchover.layout import Layout

q = shlex.quote

# Exit codes of our own scripts (chosen away from sh's 126/127 and ssh's 255).
RC_LOCKED = 70
RC_CURRENT_IS_DIR = 71
RC_RELEASE_EXISTS = 72
RC_NOT_WRITABLE = 73
RC_SHARED_MISSING = 74
RC_NO_RSYNC = 75
RC_NOT_OURS = 76

SECTION = "@@switchover:"


def _lines(*parts: str) -> str:
    return "\n".join(p for p in parts if p) + "\n"


def history_line(entry: Mapping[str, Any]) -> str:
    """One history entry as a single JSON line (ASCII only, so no raw newline can slip in)."""
    return json.dumps(entry, ensure_ascii=True, sort_keys=False, separators=(",", ":"))


def append_history(layout: Layout, entries: Iterable[Mapping[str, Any]]) -> str:
    entries = list(entries)
    if not entries:
        return ""
    h = q(layout.history)
    # A line torn by a crash (no trailing newline) would swallow our entry: end it first.
    # Then one printf per entry: each append is a single small O_APPEND write.
    return _lines(
        f"if [ -s {h} ] && [ -n \"$(tail -c 1 {h})\" ]; then echo >> {h}; fi",
        *(f"printf '%s\\n' {q(history_line(e))} >> {h}" for e in entries),
    )


def dump_state(layout: Layout, history_tail: int = 5000) -> str:
    """Print the host's state in marked sections (see `parse_sections`)."""
    d = layout
    return _lines(
        f"echo {q(SECTION + 'current')}",
        f"if [ -L {q(d.current)} ]; then echo link; readlink {q(d.current)};"
        f" elif [ -d {q(d.current)} ]; then echo dir;"
        f" elif [ -e {q(d.current)} ]; then echo other; else echo none; fi",
        f"echo {q(SECTION + 'releases')}",
        f"if [ -d {q(d.releases)} ]; then ls -1 {q(d.releases)}; fi",
        f"echo {q(SECTION + 'staging')}",
        f"if [ -d {q(d.staging_root)} ]; then ls -1 {q(d.staging_root)}; fi",
        f"echo {q(SECTION + 'lock')}",
        f"if [ -d {q(d.lock)} ]; then echo held; cat {q(d.lock_owner)} 2>/dev/null; echo; fi",
        f"echo {q(SECTION + 'history')}",
        # The trailing echo ends a torn last line so it cannot swallow the end marker.
        f"if [ -f {q(d.history)} ]; then tail -n {int(history_tail)} {q(d.history)}; echo; fi",
        f"echo {q(SECTION + 'end')}",
    )


def parse_sections(output: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(SECTION):
            current = sections.setdefault(line[len(SECTION) :], [])
        elif current is not None:
            current.append(line)
    return sections


def make_layout(layout: Layout) -> str:
    d = layout
    dirs = " ".join(q(p) for p in (d.releases, d.shared, d.staging_root, d.switch_dir))
    return _lines(
        f"mkdir -p {dirs} 2>/dev/null || {{ echo 'cannot create '{q(d.deploy_to)}"
        f"' (permission denied or read-only?)' >&2; exit {RC_NOT_WRITABLE}; }}",
        f"[ -w {q(d.deploy_to)} ] && [ -w {q(d.releases)} ] || {{ echo {q(d.deploy_to)}"
        f"' is not writable' >&2; exit {RC_NOT_WRITABLE}; }}",
    )


def acquire(layout: Layout, owner: Mapping[str, Any]) -> str:
    """Create the layout, take the lock with mkdir (atomic), clear debris, dump state."""
    d = layout
    return _lines(
        "umask 022",
        make_layout(layout),
        # mkdir either creates the lock or fails: there is no window between test and write.
        f"if mkdir {q(d.lock)} 2>/dev/null; then",
        f"  printf '%s\\n' {q(history_line(owner))} > {q(d.lock_owner)}",
        "else",
        f"  echo {q(SECTION + 'lock')}; cat {q(d.lock_owner)} 2>/dev/null; echo; exit {RC_LOCKED}",
        "fi",
        # We hold the lock, so anything left in staging or the switch dir is debris of a dead
        # deploy. A stale temp link must go: `ln -s` onto it would create the link *inside*
        # the old release and publish the wrong version.
        f"rm -rf {q(d.staging_root)}/* {q(d.switch_dir)}/current",
        dump_state(layout),
    )


def release_lock(layout: Layout, deploy_id: str) -> str:
    """Remove the lock only if it is ours (matched by deploy id)."""
    d = layout
    return _lines(
        f"if [ -d {q(d.lock)} ] && grep -q {q(deploy_id)} {q(d.lock_owner)} 2>/dev/null; then",
        f"  rm -rf {q(d.lock)}",
        "fi",
    )


def force_unlock(layout: Layout) -> str:
    d = layout
    return _lines(
        f"if [ -d {q(d.lock)} ]; then echo {q(SECTION + 'lock')}; cat {q(d.lock_owner)}"
        f" 2>/dev/null; echo; rm -rf {q(d.lock)}; fi",
    )


def begin(layout: Layout, release: str, entry: Mapping[str, Any]) -> str:
    """Record deploy_started and make an empty staging dir for the upload."""
    d = layout
    return _lines(
        f"if [ -e {q(d.release(release))} ]; then echo 'release '{q(release)}' already exists'"
        f" >&2; exit {RC_RELEASE_EXISTS}; fi",
        append_history(layout, [entry]),
        f"rm -rf {q(d.staging(release))}",
        f"mkdir -p {q(d.staging(release))}",
    )


def link_shared(layout: Layout, release: str, files: Iterable[str], dirs: Iterable[str]) -> str:
    """Link shared files and dirs into a release, replacing what the artifact shipped there.

    A shared item missing from shared/ is seeded from the release's copy on first use. A
    shared dir with nothing to seed from is created empty; a shared file with nothing to seed
    from is an error: an app starting with an empty .env is worse than a failed deploy.
    """
    d = layout
    rel = d.release(release)
    out: list[str] = []
    for item in dirs:
        src, dst = f"{d.shared}/{item}", f"{rel}/{item}"
        out += [
            f"if [ ! -e {q(src)} ]; then mkdir -p \"$(dirname {q(src)})\";"
            f" if [ -d {q(dst)} ] && [ ! -L {q(dst)} ]; then cp -R {q(dst)} {q(src)};"
            f" else mkdir -p {q(src)}; fi; fi",
            _replace_with_link(src, dst),
        ]
    for item in files:
        src, dst = f"{d.shared}/{item}", f"{rel}/{item}"
        out += [
            f"if [ ! -e {q(src)} ]; then",
            f"  if [ -f {q(dst)} ] && [ ! -L {q(dst)} ]; then mkdir -p \"$(dirname {q(src)})\";"
            f" cp -p {q(dst)} {q(src)};",
            f"  else echo 'shared file '{q(item)}' is missing: create '{q(src)}' on the host'"
            f" >&2; exit {RC_SHARED_MISSING}; fi",
            "fi",
            _replace_with_link(src, dst),
        ]
    return _lines(*out)


def _replace_with_link(src: str, dst: str) -> str:
    # A relative target keeps working if deploy_to is moved or mounted elsewhere.
    target = posixpath.relpath(src, posixpath.dirname(dst))
    return f"mkdir -p \"$(dirname {q(dst)})\" && rm -rf {q(dst)} && ln -s {q(target)} {q(dst)}"


def finalize(layout: Layout, release: str, files: Iterable[str], dirs: Iterable[str]) -> str:
    """Move the complete upload into releases/<id> (one rename) and link shared items."""
    d = layout
    return _lines(
        "set -e",
        f"if [ -e {q(d.release(release))} ]; then echo 'release '{q(release)}' already exists'"
        f" >&2; exit {RC_RELEASE_EXISTS}; fi",
        f"mv {q(d.staging(release))} {q(d.release(release))}",
        link_shared(layout, release, files, dirs),
    )


def switch(layout: Layout, release: str | None, entries: Iterable[Mapping[str, Any]]) -> str:
    """Point `current` at a release with one rename(2), then record it.

    `ln -s` makes the link under .switchover/switch/, and `mv` of that link into deploy_to
    replaces `current` in one rename: at no instant is `current` missing or half-made. This
    works with GNU, BSD and macOS `mv` alike (no `-T` needed). `release=None` removes
    `current` (a failed first deploy has nothing to go back to).
    """
    d = layout
    tmp = f"{d.switch_dir}/current"
    guard = (
        f"if [ -d {q(d.current)} ] && [ ! -L {q(d.current)} ]; then echo {q(d.current)}"
        f"' is a real directory, not a symlink: refusing to replace it' >&2;"
        f" exit {RC_CURRENT_IS_DIR}; fi"
    )
    if release is None:
        body = f"if [ -L {q(d.current)} ]; then rm -f {q(d.current)}; fi"
    else:
        body = _lines(
            f"[ -d {q(d.release(release))} ] || {{ echo 'release '{q(release)}' is not on the host'"
            " >&2; exit 1; }",
            f"mkdir -p {q(d.switch_dir)}",
            f"rm -rf {q(tmp)}",
            f"ln -s {q('releases/' + release)} {q(tmp)}",
            f"mv {q(tmp)} {q(d.deploy_to + '/')}",
        )
    return _lines("set -e", guard, body, append_history(layout, entries))


def hook_env(env: Mapping[str, str]) -> str:
    return "".join(f"export {k}={q(v)}\n" for k, v in env.items())


def run_in_release(
    layout: Layout,
    release: str,
    command: str,
    env: Mapping[str, str],
    timeout: float | None = None,
) -> str:
    """Run an operator's command with cwd = the release and the SWITCHOVER_* variables set.

    stdin is closed so a command waiting for input fails instead of hanging the deploy. A
    timeout is enforced on the host too (coreutils `timeout`, where present) so a stuck check
    does not linger there after we gave up on it.
    """
    rel = layout.release(release)
    limit = ""
    if timeout:
        secs = max(1, round(timeout))
        limit = f"if command -v timeout >/dev/null 2>&1; then set -- timeout {secs}; fi\n"
    return (
        f"cd {q(rel)} || exit 1\n"
        + hook_env(env)
        + "set --\n"
        + limit
        + f'exec "$@" sh -c {q(command)} </dev/null 2>&1\n'
    )


def remove_releases(layout: Layout, releases: Iterable[str]) -> str:
    d = layout
    return _lines(*(f"rm -rf {q(d.release(r))}" for r in releases))


def check_prerequisites(layout: Layout, need_rsync: bool) -> str:
    out = [make_layout(layout)]
    if need_rsync:
        out.append(
            "command -v rsync >/dev/null 2>&1 || { echo 'rsync is not installed on the host'"
            f" >&2; exit {RC_NO_RSYNC}; }}"
        )
    out.append(f"df -Pk {q(layout.deploy_to)} | tail -n 1")
    return _lines(*out)
