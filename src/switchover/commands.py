"""Build the POSIX sh scripts a deploy runs on a host. Pure: nothing here touches a host.

Every value that reaches the shell goes through `q` (shlex.quote). Scripts report problems
with the exit codes below so the caller can tell a held lock from a broken layout.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from switchover.layout import Layout
from switchover.transport.base import PARTIAL_DIR

q = shlex.quote

# Exit codes of our own scripts (chosen away from sh's 126/127 and ssh's 255).
RC_LOCKED = 70
RC_CURRENT_IS_DIR = 71
RC_RELEASE_EXISTS = 72
RC_NOT_WRITABLE = 73
RC_SHARED_MISSING = 74
RC_NO_RSYNC = 75
RC_BUSY = 77  # a dead deploy's detached switch step is still running on the host
RC_PENDING = 78  # the detached switch step has not finished yet: wait again
RC_NOT_STARTED = 79  # the detached switch step never started (we claimed its slot)
RC_STEP_DIED = 80  # the detached switch step died on the host without a result
RC_NO_CURRENT = 81
RC_NO_HASH = 82
RC_NO_CLONE = 83  # the live release cannot be cloned there: upload the whole tree
CLONE_LOCK_WAIT = 60  # seconds reset_staging waits for a cut-off clone to end
RC_LOCK_HELD = 98  # flock's exit (-E) when another process holds the staging lock

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
    # A line torn by a crash or a full disk (no trailing newline) would swallow our entry:
    # end it first. Then one printf per entry: each append is a single small O_APPEND write.
    return _lines(
        f"if [ -s {h} ] && [ -n \"$(tail -c 1 {h})\" ]; then echo >> {h}; fi",
        *(f"printf '%s\\n' {q(history_line(e))} >> {h}" for e in entries),
    )


def _names(directory: str, collect: bool = False) -> str:
    """Print the names in a directory, one per line (a glob: no `ls` process). `collect`:
    also add those that are release ids to $ids (see dump_state), from the same listing."""
    keep = f' case "${{f##*/}}" in {_ID}|{_ID}_*) ids="$ids ${{f##*/}}";; esac;' if collect else ""
    return (f'for f in {q(directory)}/*; do [ -e "$f" ] || [ -L "$f" ] || continue;'
            f' printf \'%s\\n\' "${{f##*/}}";{keep} done')


# A release id (YYYYMMDD_HHMMSS) as a `case` pattern; `{_ID}_*` are the suffixed ones.
_ID = "[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]_[0-9][0-9][0-9][0-9][0-9][0-9]"
HISTORY_TAIL = 5000  # history lines a state read looks at, at most
RECENT_HISTORY = 200  # of those, the newest kept whatever they name (see dump_state)
HISTORY_ERROR = "history_error"  # the section a failed history filter prints

# Of the history lines read, print those naming a release id in $ids (in quotes, as a JSON
# value: "ID" never matches "ID_02") and the newest `keep` ones, in file order: lines
# leaving the window of the newest `keep` are printed only if they name one. Then, in a
# section of its own, the newest release id any line read names: a new id must sort
# after it, whether or not its line was sent.
_RELEVANT_AWK = r"""
BEGIN { n = split(ids, id, " ") }
function named(line,  i) {
  for (i = 1; i <= n; i++) if (index(line, "\"" id[i] "\"") > 0) return 1
  return 0
}
{
  v = ""
  if (match($0, /"release": *"[0-9][0-9_]*"/)) {
    v = substr($0, RSTART + 10, RLENGTH - 10); gsub(/[ :"]/, "", v); if (v > top) top = v
  }
  if (v != "" && $0 ~ /"event": *"deploy_started"/) last = v
  if (NR > keep) {
    old = buf[NR % keep]
    if (named(old) || (last != "" && index(old, "\"" last "\"") > 0)) print old
  }
  buf[NR % keep] = $0
}
END {
  s = NR - keep + 1; if (s < 1) s = 1
  for (i = s; i <= NR; i++) print buf[i % keep]
  print "@@switchover:newest_id"; print top
}
"""


def dump_state(layout: Layout, lock: bool = True, full_history: bool = False) -> str:
    """Print the host's state in marked sections (see `parse_sections`).

    `lock=False` leaves out the lock section: right after taking the lock we know its owner.
    Every process counts here (a fleet deploy runs this on every host at once), so names
    are listed with globs and the live link is read once.

    The history section is what decisions need, not the whole file: lines naming a release
    on disk or in staging (their states, the rollback target, what to prune), the newest
    RECENT_HISTORY lines, and older lines naming the release of the newest deploy_started
    read so far (the last deploy and how it ended, its release gone or not), out of the
    last HISTORY_TAIL.
    A long-lived host's history (thousands of lines) would otherwise be sent, and parsed,
    on every deploy. `full_history` sends all HISTORY_TAIL lines (the `history` command).
    """
    d = layout
    h = q(d.history)
    whole = f"tail -n {HISTORY_TAIL} {h}"
    # Without awk (a minimal host), the whole tail as before; an awk that fails says so, and
    # the read fails: an empty history would hide every release's state.
    history = whole if full_history else (
        f'if command -v awk >/dev/null 2>&1; then {whole} | awk -v keep={RECENT_HISTORY}'
        f' -v ids="$ids" {q(_RELEVANT_AWK)} || echo {q(SECTION + HISTORY_ERROR)};'
        f" else {whole}; fi")
    return _lines(
        f"echo {q(SECTION + 'current')}; t=",
        f"if [ -L {q(d.current)} ]; then echo link; t=$(readlink {q(d.current)});"
        ' printf \'%s\\n\' "$t";'
        f" elif [ -d {q(d.current)} ]; then echo dir;"
        f" elif [ -e {q(d.current)} ]; then echo other; else echo none; fi",
        f"echo {q(SECTION + 'releases')}; ids=",
        _names(d.releases, collect=True),
        f"echo {q(SECTION + 'staging')}",
        _names(d.staging_root, collect=True),
        # A lock section only while the lock is held (the same report a refused lock gives).
        f"if [ -d {q(d.lock)} ]; then\n{lock_report(layout)}fi" if lock else "",
        # The digest of the live release's manifest: if this machine still has that exact
        # manifest cached (sentmanifests.py), the upload can skip rsync's --checksum.
        f"echo {q(SECTION + 'live_manifest')}",
        f"if [ -L {q(d.current)} ]; then t=${{t%/}}; m={q(d.manifests)}/\"${{t##*/}}\".json;"
        ' if [ -f "$m" ]; then sha256sum < "$m" 2>/dev/null; fi; fi',
        f"echo {q(SECTION + 'history')}",
        # The trailing echo ends a torn last line so it cannot swallow the end marker.
        f"if [ -f {h} ]; then {history}; echo; fi",
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
    missing = " || ".join(f"[ ! -d {q(p)} ]" for p in (d.releases, d.shared, d.staging_root,
                                                      d.switch_dir))
    return _lines(
        f"if {missing}; then",
        f"mkdir -p {dirs} 2>/dev/null || {{ echo 'cannot create '{q(d.deploy_to)}"
        f"' (permission denied or read-only?)' >&2; exit {RC_NOT_WRITABLE}; }}",
        "fi",
        f"[ -w {q(d.deploy_to)} ] && [ -w {q(d.releases)} ] || {{ echo {q(d.deploy_to)}"
        f"' is not writable' >&2; exit {RC_NOT_WRITABLE}; }}",
    )


def acquire(layout: Layout, owner: Mapping[str, Any], then: str = "") -> str:
    """Create the layout, take the lock with mkdir (atomic), clear debris, dump state,
    then run `then` (see `begin_if_fresh`) with the lock held."""
    d = layout
    return _lines(
        "umask 022",
        make_layout(layout),
        # mkdir either creates the lock or fails: there is no window between test and write.
        f"if mkdir {q(d.lock)} 2>/dev/null; then",
        _write_owner(layout, owner),
        "else",
        lock_report(layout),
        f"  exit {RC_LOCKED}",
        "fi",
        _after_lock(layout),
        then,
    )


def _write_owner(layout: Layout, owner: Mapping[str, Any]) -> str:
    d = layout
    return _lines(
        f"printf '%s\\n' {q(history_line(owner))} > {q(d.lock_owner)}",
        f"date +%s > {q(d.heartbeat)}",
    )


def lock_report(layout: Layout) -> str:
    """Print who holds the lock and how many seconds ago (host clock) its heartbeat beat."""
    d = layout
    return _lines(
        f"echo {q(SECTION + 'lock')}; cat {q(d.lock_owner)} 2>/dev/null; echo",
        f"echo {q(SECTION + 'heartbeat_age')}",
        f"hb=$(cat {q(d.heartbeat)} 2>/dev/null)",
        'case "$hb" in \'\'|*[!0-9]*) ;; *) echo $(( $(date +%s) - hb ));; esac',
    )


def _after_lock(layout: Layout) -> str:
    """With the lock held: clear debris of dead deploys, then dump the state."""
    d = layout
    debris = (f"{q(d.staging_root)}/* {q(d.switch_dir)}/current {q(d.manifests)}/*.tmp"
              f" {q(d.meta)}/lock.stale.*")
    return _lines(
        # Anything left in staging or the switch dir is debris of a dead deploy. A stale temp
        # link must go: `ln -s` onto it would create the link *inside* the old release and
        # publish the wrong version.
        # (Tested with a glob first: no `rm` process when there is nothing to remove.)
        f"for f in {debris}; do if [ -e \"$f\" ] || [ -L \"$f\" ]; then rm -rf {debris};"
        " break; fi; done",
        # Finished detached switch steps of earlier deploys (a running one is never touched).
        f"for r in {q(d.run_dir)}/*/; do if [ -f \"${{r}}status\" ]; then rm -rf \"$r\"; fi; done",
        # Pruned releases a host reboot interrupted the deletion of: finish it, off the path.
        _empty_trash(layout),
        dump_state(layout, lock=False),
    )


def release_lock(layout: Layout, deploy_id: str) -> str:
    """Remove the lock only if it is ours (matched by deploy id)."""
    d = layout
    return _lines(
        f"if [ -d {q(d.lock)} ] && {_owner_is(layout, deploy_id)}; then",
        f"  rm -rf {q(d.lock)} {q(d.run_dir + '/' + deploy_id)}-*",
        "fi",
    )


def force_unlock(layout: Layout) -> str:
    d = layout
    return _lines(
        f"if [ -d {q(d.lock)} ]; then echo {q(SECTION + 'lock')}; cat {q(d.lock_owner)}"
        f" 2>/dev/null; echo; rm -rf {q(d.lock)}; fi",
    )


def _history_names(layout: Layout, release: str) -> str:
    """A test that is true if any line of the whole history file names `release` as its
    release (`"release":"ID"`, as every history line spells it)."""
    h = q(layout.history)
    named = history_line({"release": release})[1:-1]
    return f"[ -f {h} ] && grep -qF {q(named)} {h}"


def begin(layout: Layout, release: str, entry: Mapping[str, Any]) -> str:
    """Record deploy_started and make an empty staging dir for the upload.

    An id the history names was used before (a release since removed): never again, or
    two deploys would share it. The state read sends only the history's relevant lines,
    so the id was chosen without seeing every old one: checked here, on the whole file.
    """
    d = layout
    return _lines(
        f"if [ -e {q(d.release(release))} ]; then echo 'release '{q(release)}' already exists'"
        f" >&2; exit {RC_RELEASE_EXISTS}; fi",
        f"if {_history_names(layout, release)}; then echo 'release id '{q(release)}"
        f"' was used before on this host (its history names it)' >&2;"
        f" exit {RC_RELEASE_EXISTS}; fi",
        append_history(layout, [entry]),
        f"rm -rf {q(d.staging(release))}",
        f"mkdir -p {q(d.staging(release))}",
    )


_PREVIOUS = "@@switchover-previous@@"


def begin_if_fresh(layout: Layout, release: str, entry: Mapping[str, Any]) -> str:
    """`begin` in the lock's round trip, for an id chosen before the host state was known.

    Runs after `dump_state` (it reuses `$t`, the live link's target) and begins only if
    `release` is fresh here: no such release, no history line naming it, and newer than
    every release on disk (ids sort in deploy order). Prints a `begun` section: yes or no.
    The entry's `previous` is filled in from the live link, as `HostState.current` reads it.
    """
    d = layout
    h = q(d.history)
    line = history_line({**entry, "previous": _PREVIOUS})
    head, tail = line.split(json.dumps(_PREVIOUS), 1)
    return _lines(
        f"echo {q(SECTION + 'begun')}; fresh=yes",
        f"[ -e {q(d.release(release))} ] && fresh=no",
        f"for f in {q(d.releases)}/*; do b=${{f##*/}}; case \"$b\" in {_ID}|{_ID}_*)"
        f" [ \"$b\" \\< {q(release)} ] || fresh=no;; esac; done",
        f"if {_history_names(layout, release)}; then fresh=no; fi",
        "if [ $fresh = yes ]; then",
        "  p=null; b=${t##*/}",
        '  case "${t%/*}" in releases|*/releases)',
        f'    case "$b" in {_ID}) p="\\"$b\\"";;',
        f'      {_ID}_[0-9][0-9]*) case "${{b#*_*_}}" in *[!0-9]*) ;; *) p="\\"$b\\"";; esac;;',
        "    esac;;",
        "  esac",
        f"  if [ -s {h} ] && [ -n \"$(tail -c 1 {h})\" ]; then echo >> {h}; fi",
        f"  printf '%s%s%s\\n' {q(head)} \"$p\" {q(tail)} >> {h}",
        f"  mkdir -p {q(d.staging(release))}",
        "  echo yes",
        "else",
        "  echo no",
        "fi",
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
            f"if [ ! -e {q(src)} ]; then mkdir -p {q(posixpath.dirname(src))};"
            f" if [ -d {q(dst)} ] && [ ! -L {q(dst)} ]; then cp -R {q(dst)} {q(src)};"
            f" else mkdir -p {q(src)}; fi; fi",
            _replace_with_link(src, dst),
        ]
    for item in files:
        src, dst = f"{d.shared}/{item}", f"{rel}/{item}"
        out += [
            f"if [ ! -e {q(src)} ]; then",
            f"  if [ -f {q(dst)} ] && [ ! -L {q(dst)} ]; then mkdir -p {q(posixpath.dirname(src))};"
            f" cp -p {q(dst)} {q(src)};",
            f"  else echo 'shared file '{q(item)}' is missing: create '{q(src)}' on the host'"
            f" >&2; exit {RC_SHARED_MISSING}; fi",
            "fi",
            _replace_with_link(src, dst),
        ]
    return _lines(*out)


def _replace_with_link(src: str, dst: str) -> str:
    # A relative target keeps working if deploy_to is moved or mounted elsewhere.
    # The parent is computed here, not with `$(dirname ...)`: command substitution drops
    # trailing newlines, and a name may end in one.
    parent = posixpath.dirname(dst)
    target = posixpath.relpath(src, parent)
    # `|| exit`: under `set -e` a failure inside an && list is not fatal, and a release
    # must never go live with its own copy where the shared item belongs.
    return (f"{{ mkdir -p {q(parent)} && rm -rf {q(dst)} && ln -s {q(target)} {q(dst)}; }} ||"
            f" {{ echo 'cannot link shared item '{q(dst)} >&2; exit 1; }}")


def clone_release(layout: Layout, source: str, release: str, users: Iterable[str] = (),
                  groups: Iterable[str] = (), spare: str | None = None) -> str:
    """Make the release's staging dir a hard-linked clone of `source` (the live release) and
    list it (clonepatch.py).

    `spare`: a clone of `source` made ahead (build_spare), moved into staging if it is
    there and no builder holds it: the `cp` and the directory reset (~40 ms for 2000 files)
    are then off the deploy's path. A "clone" section says which it was: spare or copy.

    Prints an "ids" section: the host user's groups ("G ID ID ..."), whether it is root
    ("root"), and the host's ids of these user and group names ("u NAME ID", "g NAME ID",
    ID empty if unknown there): rsync sets owners as root, and a group the user is in.
    Then clonepatch.FIELDS NUL-terminated fields per entry.

    Exits RC_NO_CLONE where that cannot be done: no GNU find, cp or flock on the host, `cp
    -l` refused (a disk full, hard links to other users' files refused by
    fs.protected_hardlinks), or a clone still running there (see below). The caller empties
    staging (reset_staging) and uploads the whole tree.

    The script holds a lock (flock on the staging root) while it, or any process it
    started, changes staging; it lets go before it prints anything. A clone cut off by a
    dropped link keeps running on the host until it next writes to the dead channel;
    reset_staging waits for that lock, so it never empties staging while an orphaned
    `cp -l` still fills it with the live release's inodes (which a whole-tree rsync would
    then chmod and touch in place).
    """
    staging = layout.staging(release)
    lookups = [f"printf 'u %s %s\\n' {q(u)} \"$(id -u -- {q(u)} 2>/dev/null)\"" for u in users]
    lookups += [f"printf 'g %s %s\\n' {q(g)} \"$(getent group -- {q(g)} 2>/dev/null |"
                " cut -d: -f3)\"" for g in groups]
    return _lines(
        f"find {q(source)} -maxdepth 0 -printf '' >/dev/null 2>&1 || exit {RC_NO_CLONE}",
        f"[ -d {q(layout.staging_root)} ] && command -v flock >/dev/null 2>&1 ||"
        f" exit {RC_NO_CLONE}",
        # `command`: a redirection that fails must not end the shell (dash would), only
        # this clone.
        # (Braces: a 2>/dev/null on `exec` itself would stay for the rest of the script.)
        f"{{ command exec 9<{q(layout.staging_root)}; }} 2>/dev/null || exit {RC_NO_CLONE}",
        # util-linux flock: -E tells a lock held by another apart from a flock that cannot
        # lock here (BusyBox's has no -E; some filesystems refuse locks): no clone either way.
        f"flock -n -E {RC_LOCK_HELD} 9 2>/dev/null; rc=$?",
        f'if [ "$rc" -eq {RC_LOCK_HELD} ]; then echo \'a cut-off clone is still running\' >&2;'
        f" exit {RC_NO_CLONE}; fi",
        f'if [ "$rc" -ne 0 ]; then echo \'flock cannot lock the staging directory\' >&2;'
        f" exit {RC_NO_CLONE}; fi",
        _remove_dir(staging),
        "c=copy",
        _take_spare(layout, spare, staging) if spare else "",
        # Hard links to the files and symlinks; directories made anew, not copied with their
        # ACLs or extended attributes (rsync -a, which this stands in for, sets neither).
        f'if [ "$c" = copy ]; then cp -PRl {q(source)} {q(staging)} ||'
        f" {{ {_empty_dir(staging)}; exit {RC_NO_CLONE}; }}; fi",
        f"cd {q(staging)} || exit 1",
        f'if [ "$c" = copy ]; then {_RESET_DIRS} 2>/dev/null ||'
        f" {{ cd / && {_empty_dir(staging)}; exit {RC_NO_CLONE}; }}; fi",
        # Staging is made: let the lock go before the output. A link that stalls (rather
        # than drops) would keep this script blocked on writing its listing for as long as
        # sshd takes to notice, and the fallback must not wait for that.
        "exec 9<&-",
        f"echo {q(SECTION + 'clone')}; echo \"$c\"",
        f"echo {q(SECTION + 'ids')}",
        'echo "G $(id -G)"; if [ "$(id -u)" = 0 ]; then echo root; fi',
        *lookups,
        f"echo {q(SECTION + 'listing')}",
        # Numeric ids: names would be looked up once per entry (3x slower here).
        r"find . -mindepth 1 -printf '%y\0%m\0%s\0%T@\0%U\0%G\0%P\0%l\0'",
    )


# Every directory of a clone writable (as whoever runs this) so paths can be removed from
# and written into it, and at time 0: rsync, which is sent every one, resets both, but leaves
# a time that differs by less than a second alone (its --modify-window). chmod only for
# those that need it: usually none, and no chmod process then. Run in the clone's root.
_RESET_DIRS = ("find . -type d \\( -perm -u=rwx -o -exec chmod u+rwx {} + \\)"
               " -exec touch -d @0 {} +")


def _take_spare(layout: Layout, spare: str, staging: str) -> str:
    """Move a spare clone into staging (sets c=spare) if one is there and its lock is free:
    a builder that still holds it is not done."""
    root = q(layout.spare_root)
    return (f"if [ -d {q(spare)} ] && [ ! -L {q(spare)} ] && [ ! -L {root} ] &&"
            f" {{ command exec 8<{root}; }} 2>/dev/null;"
            f" then if flock -n 8 2>/dev/null && [ -d {q(spare)} ] &&"
            f" mv {q(spare)} {q(staging)} 2>/dev/null; then c=spare; fi; exec 8<&-; fi")


SPARE_WAIT = 60  # seconds a spare build waits for the deploy's connection to close


def build_spare(layout: Layout, release: str) -> str:
    """Start making, in the background, a spare clone of `release` (now live) for the next
    deploy to start from (clone_release's `spare`), and remove any other spare.

    Detached like the trash delete (stdio to /dev/null, nice 19), under a lock (flock on
    the spare dir) that a deploy taking the spare tests without waiting. Made under a
    temporary name and renamed when whole, so a cut-off build is never taken: the next
    build removes it. Quietly nothing where a clone cannot be made (no flock, no GNU find,
    `cp -l` refused). It costs the directories' inodes and blocks (the files are hard links
    to the live release's); pruning a release removes its spare too.
    """
    # $PPID: what runs this script (sshd for the connection, or switchover itself): the
    # build waits for it to end. nice 19, as the trash delete, not SCHED_IDLE: that also
    # puts it in the idle I/O class, where a busy disk can starve it, and its flock and its
    # links to pruned releases' files with it.
    return (f"(cd / && nohup nice -n 19 sh -c {q(spare_script(layout, release))} sh"
            ' "$PPID" </dev/null >/dev/null 2>&1 &)')


def spare_script(layout: Layout, release: str) -> str:
    """What build_spare runs in the background (exit 0 whatever happens).

    It first waits (GNU tail, at most SPARE_WAIT seconds) for process $1 to end, the
    deploy's connection to this host (it closes once the whole fleet is done), then one
    second more. Made at once, the spares of a fleet's first hosts were made while the
    others still deployed: with 50 test hosts on one 2-core machine and one disk, that was
    ~1 s of the deploy, their link() calls contending in the kernel whatever their CPU
    priority. On a real fleet the wait costs nothing: deploys are further apart.
    """
    root, src, spare = q(layout.spare_root), q(layout.release(release)), q(layout.spare(release))
    tmp = q(layout.spare(release) + ".tmp")
    return _lines(
        # (Not init, nor anything but a number: then nothing to wait for.)
        f'case "$1" in ""|1|*[!0-9]*) ;; *) timeout {SPARE_WAIT} tail --pid="$1" -s 0.1'
        " -f /dev/null >/dev/null 2>&1;; esac",
        "sleep 1",
        "command -v flock >/dev/null 2>&1 || exit 0",
        f"find {src} -maxdepth 0 -printf '' >/dev/null 2>&1 || exit 0",
        f"[ -L {root} ] && exit 0",  # not ours: never follow it
        f"[ -d {root} ] || mkdir -p {root} || exit 0",
        f"{{ command exec 9<{root}; }} 2>/dev/null || exit 0",
        "flock -n 9 2>/dev/null || exit 0",
        'rmtree() { find "$1" -type d -exec chmod u+rwx {} + 2>/dev/null; rm -rf "$1"; }',
        f'for f in {root}/*; do [ "$f" = {spare} ] && [ ! -L "$f" ] && continue;'
        ' if [ -e "$f" ] || [ -L "$f" ]; then rmtree "$f"; fi; done',
        f"[ -d {spare} ] && exit 0",
        f"cp -PRl {src} {tmp} && cd {tmp} && {_RESET_DIRS} 2>/dev/null && cd / &&"
        f" mv {tmp} {spare} || {{ cd /; rmtree {tmp}; }}",
        "exit 0",
    )


def _remove_dir(path: str) -> str:
    """Remove `path` or fail (exit 1): directories of a clone may be read-only, and rm -rf
    cannot remove what is in them. The usual case, begin's empty staging dir, costs one
    `rmdir`; nothing there costs no process."""
    p = q(path)
    return (f"if [ -d {p} ] && [ ! -L {p} ]; then rmdir {p} 2>/dev/null ||"
            f" {{ find {p} -type d -exec chmod u+rwx {{}} + 2>/dev/null; rm -rf {p}; }} ||"
            f" exit 1; elif [ -e {p} ] || [ -L {p} ]; then rm -rf {p} || exit 1; fi")


def _empty_dir(path: str) -> str:
    """Make `path` an empty directory or fail (exit 1)."""
    return f"{_remove_dir(path)}; mkdir {q(path)} || exit 1"


def reset_staging(layout: Layout, release: str) -> str:
    """Empty the release's staging dir (a clone the caller will not patch), once no clone
    script holds the staging lock (see clone_release): waits up to CLONE_LOCK_WAIT seconds
    for one cut off by a dropped link, then fails rather than race it. Where flock cannot
    lock (none, BusyBox's, a filesystem without locks) no clone can have run: go on."""
    root = q(layout.staging_root)
    return _lines(
        f"if [ -d {root} ] && command -v flock >/dev/null 2>&1 &&"
        f" {{ command exec 9<{root}; }} 2>/dev/null; then"
        f" flock -w {CLONE_LOCK_WAIT} -E {RC_LOCK_HELD} 9 2>/dev/null;"
        f' if [ "$?" -eq {RC_LOCK_HELD} ]; then echo \'a cut-off clone of the live release'
        f" is still running on the host' >&2; exit 1; fi; fi",
        _empty_dir(layout.staging(release)),
    )


def remove_paths(layout: Layout, release: str) -> str:
    """Remove the NUL-separated paths on stdin from the release's staging dir."""
    return f"cd {q(layout.staging(release))} && xargs -0 rm -rf --\n"


def finalize(layout: Layout, release: str, files: Iterable[str], dirs: Iterable[str],
             manifest_size: int | None = None) -> str:
    """Move the complete upload into releases/<id> (one rename) and link shared items.

    With `manifest_size`, the release's manifest (that many bytes) arrives on stdin and is
    stored under .switchover/manifests/ (outside the release), renamed into place once the
    release is. A manifest cut short (the client or the link went away while sending it:
    `cat` sees only an early end) fails the step before the release is published.
    """
    d = layout
    tmp = d.manifest(release) + ".tmp"
    receive = publish = ""
    if manifest_size is not None:
        receive = "\n".join((
            f"[ -d {q(d.manifests)} ] || mkdir -p {q(d.manifests)}; cat > {q(tmp)}",
            # (unquoted: BSD wc pads the count with spaces)
            f"[ $(wc -c < {q(tmp)}) -eq {int(manifest_size)} ] || {{ rm -f {q(tmp)};"
            " echo 'the manifest arrived incomplete (the connection or the client went"
            " away)' >&2; exit 1; }"))
        publish = f"mv -f {q(tmp)} {q(d.manifest(release))}"
    return _lines(
        "set -e",
        f"if [ -e {q(d.release(release))} ]; then echo 'release '{q(release)}' already exists'"
        f" >&2; exit {RC_RELEASE_EXISTS}; fi",
        receive,
        # rsync removes its partial dir once an upload completes; a leftover is never app data.
        f"if [ -e {q(d.staging(release) + '/' + PARTIAL_DIR)} ]; then"
        f" rm -rf {q(d.staging(release) + '/' + PARTIAL_DIR)}; fi",
        f"mv {q(d.staging(release))} {q(d.release(release))}",
        link_shared(layout, release, files, dirs),
        publish,
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
            f"[ -d {q(d.switch_dir)} ] || mkdir -p {q(d.switch_dir)}",
            # A stale temp link (see the module notes) goes first; tested, since `rm` is a
            # process and this runs on every host of a fleet at once.
            f"if [ -e {q(tmp)} ] || [ -L {q(tmp)} ]; then rm -rf {q(tmp)}; fi",
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


def remove_releases(layout: Layout, releases: Iterable[str], background: bool = False) -> str:
    """Delete releases (and their manifests, which go with them and only with them, and
    their spare clones if any, see build_spare).

    `background`: rename each into .switchover/trash/ (one rename, so it leaves releases/ at
    once) and delete the trash in a detached process: a deploy does not wait for thousands
    of unlinks per host. Its stdio goes to /dev/null so the session can close.
    """
    d = layout
    releases = list(releases)
    if not releases:
        return ""
    if not background:
        return _lines(*(f"rm -rf {q(d.release(r))} {q(d.manifest(r))};"
                        f" if [ ! -L {q(d.spare_root)} ]; then rm -rf {q(d.spare(r))}; fi"
                        for r in releases))
    moves = [
        f"if [ -e {q(d.release(r))} ]; then mv {q(d.release(r))} {q(d.trash)}/{q(r)}.$$; fi;"
        f" rm -f {q(d.manifest(r))};"
        # Its spare (a release rolled back from) would keep its files on disk
        f" if [ -d {q(d.spare(r))} ] && [ ! -L {q(d.spare_root)} ]; then"
        f" mv {q(d.spare(r))} {q(d.trash)}/{q(r)}.spare.$$; fi"
        for r in releases
    ]
    return _lines(f"[ -d {q(d.trash)} ] || mkdir -p {q(d.trash)}", *moves, _empty_trash(layout))


def _empty_trash(layout: Layout) -> str:
    t = q(layout.trash)
    # Trash entries are release ids (no dotfiles): a glob finds them without an `ls`.
    # Deleting a release is thousands of unlinks: at the lowest CPU priority (and so the
    # lowest best-effort I/O priority, which Linux derives from it) it does not compete
    # with the live app, or with the rest of this deploy, for the host. Not the idle I/O
    # class: on a busy disk that can starve the delete, and the space, for good.
    return (f"for f in {t}/*; do if [ -e \"$f\" ]; then"
            f" (cd / && nohup nice -n 19 rm -rf {t}/* </dev/null >/dev/null 2>&1 &);"
            " break; fi; done")


def check_prerequisites(layout: Layout, need_rsync: bool) -> str:
    out = [make_layout(layout)]
    if need_rsync:
        out.append(
            "command -v rsync >/dev/null 2>&1 || { echo 'rsync is not installed on the host'"
            f" >&2; exit {RC_NO_RSYNC}; }}"
        )
    out.append(disk_free(layout))
    return _lines(*out)


# -- resilience: stale locks, the detached switch step, manifests --------------------------


def _owner_is(layout: Layout, deploy_id: str | None) -> str:
    """A test that is true while the lock's owner.json names `deploy_id` (None: no owner)."""
    if deploy_id is None:
        return f"[ ! -e {q(layout.lock_owner)} ]"
    # owner.json is one JSON line (`_write_owner`, compact; json.dumps' default spacing
    # accepted too): the shell's `read` and a `case` match it without a grep process. The
    # patterns are quoted, so they match as plain text.
    value = json.dumps(deploy_id)
    compact, spaced = q(f'"deploy_id":{value}'), q(f'"deploy_id": {value}')
    # One compound command, so `! test` and `test && ...` negate and chain all of it.
    return (f"{{ {{ o=; read -r o < {q(layout.lock_owner)} || [ -n \"$o\" ]; }} 2>/dev/null"
            f" && case \"$o\" in *{compact}*|*{spaced}*) true;; *) false;; esac; }}")


def heartbeat(layout: Layout, deploy_id: str) -> str:
    """Refresh the lock's heartbeat, only while the lock is still ours (never recreate it)."""
    d = layout
    tmp = d.heartbeat + ".tmp"
    return _lines(
        f"if [ -d {q(d.lock)} ] && {_owner_is(layout, deploy_id)}; then",
        f"  date +%s > {q(tmp)} 2>/dev/null && mv -f {q(tmp)} {q(d.heartbeat)} 2>/dev/null",
        "fi",
        "exit 0",
    )


def take_over(layout: Layout, stale_id: str | None, owner: Mapping[str, Any],
              entry: Mapping[str, Any], then: str = "") -> str:
    """Replace a lock judged stale (its owner `stale_id` is gone) with ours, race-free.

    Contenders first claim the stale lock by `mkdir lock/takeover`: one wins. The winner
    checks the lock is still the one judged stale (a contender may already have replaced
    it), renames it to a unique tomb and `mkdir`s a fresh lock; a plain `mkdir` by someone
    else in between wins instead, and we back off. A dead deploy's detached switch step
    that is still running keeps its lock alive (RC_BUSY).
    """
    d = layout
    claim = d.lock + "/takeover"
    tomb = f"{d.meta}/lock.stale.{owner.get('deploy_id', 'x')}"
    locked = _lines(lock_report(layout), f"exit {RC_LOCKED}")
    return _lines(
        "umask 022",
        f"if ! mkdir {q(claim)} 2>/dev/null; then",
        locked,
        "fi",
        f"if ! {_owner_is(layout, stale_id)}; then",
        f"  rmdir {q(claim)} 2>/dev/null",
        locked,
        "fi",
        f"for p in {q(d.run_dir)}/*/pid; do",
        '  [ -f "$p" ] || continue',
        '  [ -f "${p%/pid}/status" ] && continue',
        '  if kill -0 "$(cat "$p")" 2>/dev/null; then',
        f"    rmdir {q(claim)} 2>/dev/null",
        f"    {lock_report(layout).strip()}",
        f"    exit {RC_BUSY}",
        "  fi",
        "done",
        f"rm -rf {q(tomb)}",
        f"if ! mv {q(d.lock)} {q(tomb)} 2>/dev/null; then",
        locked,
        "fi",
        f"if ! mkdir {q(d.lock)} 2>/dev/null; then",
        f"  rm -rf {q(tomb)}",
        locked,
        "fi",
        _write_owner(layout, owner),
        f"rm -rf {q(tomb)}",
        append_history(layout, [entry]),
        _after_lock(layout),
        then,
    )


def _run_slot(layout: Layout, token: str) -> str:
    return f"{layout.run_dir}/{token}"


def _wait_for_step(slot: str, seconds: float) -> str:
    """Wait (bounded) for a detached step's status file, then print its status and log.

    Most steps take milliseconds and processes cost on a busy fleet: the pid is read once
    with the shell's `read`, and the clock (`date`) only every tenth round.
    """
    limit = max(0, round(seconds))
    # No wait asked: report at once. Else the clock starts at the first check (round 10,
    # ~35 ms in): a `date` process only for steps that are not done by then. (Where `sleep`
    # takes whole seconds only, that start is ~9 s late: the bound is looser, not gone.)
    clock = (f"exit {RC_PENDING}" if limit == 0 else
             '  if [ $((i % 10)) -eq 0 ] || [ $i -gt 50 ]; then\n'
             '    now=$(date +%s); [ -n "$end" ] || end=$((now + ' + str(limit) + '))\n'
             f'    [ "$now" -ge "$end" ] && exit {RC_PENDING}\n'
             "  fi")
    return _lines(
        f"D={q(slot)}",
        "n=0; i=0; pid=; end=",
        'while [ ! -f "$D/status" ]; do',
        '  if [ -z "$pid" ] && [ -f "$D/pid" ]; then read -r pid < "$D/pid" || pid=; fi',
        '  if [ -z "$pid" ]; then',
        "    n=$((n + 1))",
        "    if [ $n -gt 100 ]; then",
        f"      echo 'the switch step never started on the host' >&2; exit {RC_STEP_DIED}",
        "    fi",
        '  elif ! kill -0 "$pid" 2>/dev/null; then',
        '    [ -f "$D/status" ] && break',
        f"    echo 'the switch step died on the host without a result' >&2; exit {RC_STEP_DIED}",
        "  fi",
        "  i=$((i + 1))",
        clock,
        # Poll fast at first (most steps take milliseconds: a switch without hooks is done
        # ~5-15 ms after its launch here), then gently.
        '  if [ $i -le 10 ]; then t=0.002; elif [ $i -le 50 ]; then t=0.01; else t=0.2; fi',
        '  sleep "$t" 2>/dev/null || sleep 1',
        "done",
        f"echo {q(SECTION + 'status')}",
        'read -r st < "$D/status"; printf \'%s\\n\' "$st"',  # one line: no `cat` process
        'cat "$D/log" 2>/dev/null',
        f"echo {q(SECTION + 'end')}",
    )


def switch_detached(layout: Layout, token: str, release: str,
                    entries: Iterable[Mapping[str, Any]], hooks: Sequence[str],
                    env: Mapping[str, str], timeout: float | None, wait: float) -> str:
    """Start the switch and the after_switch hooks as ONE detached step on the host.

    The step runs under nohup, in a session of its own where setsid exists, with no tie to
    this connection, so a dropped link or a dead client cannot leave the new release
    live without its restart: the host finishes the step and writes its result to
    .switchover/run/<token>/status
    (`ok`, `switch RC` or `hook N RC`; hook output in `log`, one section per hook). The
    script then waits up to `wait` seconds for that result (see `wait_detached`).
    """
    slot = _run_slot(layout, token)
    steps = [
        f"echo {q(SECTION + 'switch')}",
        # A subshell, not `sh -c`: the same isolation (its `set -e` and `exit` stay inside)
        # without starting another shell.
        f"(\n{switch(layout, release, entries)}\n)",
        'rc=$?; if [ "$rc" -ne 0 ]; then st "switch $rc"; exit 0; fi',
    ]
    for i, hook in enumerate(hooks):
        steps += [
            f"echo {q(SECTION + f'hook:{i}')}",
            f"sh -c {q(run_in_release(layout, release, hook, env, timeout))}",
            f'rc=$?; if [ "$rc" -ne 0 ]; then st "hook {i} $rc"; exit 0; fi',
        ]
    # No umask here: the hooks run with the session's own, as they would over plain ssh.
    runner = _lines(
        f"D={q(slot)}",
        'echo $$ > "$D/pid.tmp" && mv -f "$D/pid.tmp" "$D/pid"',
        'st() { printf \'%s\\n\' "$1" > "$D/status.tmp" && mv -f "$D/status.tmp" "$D/status"; }',
        *steps,
        "st ok",
    )
    return _lines(
        f"[ -d {q(layout.run_dir)} ] || mkdir -p {q(layout.run_dir)} || exit 1",
        # The slot is claimed with mkdir: a reconnecting client that finds no slot claims it
        # itself (see wait_detached), so a launch delayed past that point never runs. Mode
        # 700: hook output in its log may hold secrets.
        f"mkdir -m 700 {q(slot)} 2>/dev/null || {{ echo 'switch step '{q(token)}' was already"
        f" claimed' >&2; exit {RC_NOT_STARTED}; }}",
        f"printf '%s' {q(runner)} > {q(slot + '/runner.sh')}",
        # nohup as well as setsid: what the hooks start (a restarted server) inherits an
        # ignored SIGHUP, as it always did.
        "if command -v setsid >/dev/null 2>&1; then S=setsid; else S=; fi",
        f"nohup $S sh {q(slot + '/runner.sh')} </dev/null >>{q(slot + '/log')} 2>&1 &",
        _wait_for_step(slot, wait),
    )


def wait_detached(layout: Layout, token: str, wait: float) -> str:
    """Wait again for a detached step (after a reconnect). If its slot does not exist, the
    launch never happened: claim the slot so it never will, and say so (RC_NOT_STARTED)."""
    slot = _run_slot(layout, token)
    return _lines(
        f"if [ ! -d {q(slot)} ]; then",
        f"  mkdir -p {q(layout.run_dir)}",
        f"  if mkdir -m 700 {q(slot)} 2>/dev/null; then",
        f"    echo 'never started' > {q(slot + '/status')}; exit {RC_NOT_STARTED}",
        "  fi",
        "fi",
        _wait_for_step(slot, wait),
    )


def kill_detached(layout: Layout, token: str) -> str:
    """Stop a detached step we gave up waiting for (its process group, else the runner)."""
    slot = _run_slot(layout, token)
    return _lines(
        f"D={q(slot)}",
        'if [ -f "$D/pid" ] && [ ! -f "$D/status" ]; then',
        '  p=$(cat "$D/pid")',
        # The runner leads its own session (setsid); hooks under coreutils `timeout` sit in
        # process groups of their own inside it, so kill by session where pkill can.
        '  pkill -TERM -s "$p" 2>/dev/null || kill -TERM -- "-$p" 2>/dev/null'
        ' || kill -TERM "$p" 2>/dev/null',
        "  printf 'killed\\n' > \"$D/status\"",
        "fi",
        "exit 0",
    )


# The live release's files, listed and hashed on the host: python3 where present (exact for
# any file name), else find + sha256sum/shasum/openssl (names with newlines unsupported).
_PY_LISTER = """\
import hashlib, json, os, stat, sys
def digest(p):
    h = hashlib.sha256()
    with open(p, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()
for root, dirs, files in os.walk('.'):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(root, name)
        rel = p[2:]
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                rec = {'p': rel, 't': 'link', 'target': os.readlink(p)}
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif stat.S_ISREG(st.st_mode):
                rec = {'p': rel, 't': 'file', 'size': st.st_size,
                       'mode': '%04o' % stat.S_IMODE(st.st_mode), 'sha256': digest(p)}
            else:
                rec = {'p': rel, 't': 'other'}
        except OSError as e:
            rec = {'p': rel, 't': 'unreadable', 'error': str(e)}
        sys.stdout.write(json.dumps(rec) + '\\n')
"""


def _sh_lister() -> str:
    return _lines(
        "if command -v sha256sum >/dev/null 2>&1; then H=sha256sum",
        "elif command -v shasum >/dev/null 2>&1; then H='shasum -a 256'",
        "elif command -v openssl >/dev/null 2>&1; then H='openssl dgst -sha256 -r'",
        "else echo 'no sha256 tool on the host (sha256sum, shasum, openssl)' >&2;"
        f" exit {RC_NO_HASH}",
        "fi",
        "find . \\( -type f -o -type l \\) -print | while IFS= read -r f; do",
        '  if [ -L "$f" ]; then',
        '    printf \'L\\t%s\\t%s\\n\' "${f#./}" "$(readlink "$f")"; continue',
        "  fi",
        '  m=$(ls -ld "$f" | cut -c2-10); s=$(wc -c < "$f" | tr -d \' \')',
        '  h=$($H "$f" | cut -d\' \' -f1); h=${h#\\\\}',
        '  printf \'F\\t%s\\t%s\\t%s\\t%s\\n\' "$m" "$s" "$h" "${f#./}"',
        "done",
    )


def live_listing(layout: Layout, python: bool = True) -> str:
    """Print the live release id, its stored manifest and the listing of its files."""
    d = layout
    lister = (f"if command -v python3 >/dev/null 2>&1; then python3 -c {q(_PY_LISTER)}; else\n"
              + _sh_lister() + "fi") if python else _sh_lister()
    return _lines(
        f"t=$(readlink {q(d.current)} 2>/dev/null) || {{ echo 'no current release on the host'"
        f" >&2; exit {RC_NO_CURRENT}; }}",
        'id=${t##*/}',
        f"echo {q(SECTION + 'release')}",
        'echo "$id"',
        f"echo {q(SECTION + 'manifest')}",
        f"cat {q(d.manifests)}/\"$id\".json 2>/dev/null; echo",
        f"cd {q(d.releases)}/\"$id\" 2>/dev/null || {{ echo \"current points at $t, which is"
        f" not on the host\" >&2; exit {RC_NO_CURRENT}; }}",
        f"echo {q(SECTION + 'listing')}",
        lister,
        f"echo {q(SECTION + 'end')}",
    )


def disk_free(layout: Layout) -> str:
    """POSIX df of the filesystem holding deploy_to: one line, sizes in kB."""
    return f"df -Pk {q(layout.deploy_to)} 2>/dev/null | tail -n 1\n"


def parse_disk_free(line: str) -> tuple[int, int] | None:
    """(total, free) in kB from the last line `disk_free` prints, if it is readable."""
    fields = line.split()
    if len(fields) >= 4 and fields[1].isdigit() and fields[3].isdigit():
        return int(fields[1]), int(fields[3])
    return None
