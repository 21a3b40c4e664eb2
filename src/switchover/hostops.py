"""Operations on one host: each one builds its script (commands.py) and runs it (transport).

Errors come back as domain exceptions naming the host; the orchestrator decides what a
failure means for the fleet.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from switchover import clonepatch, locks, quickcheck
from switchover import commands as C
from switchover import manifest as M
from switchover.errors import (
    ConnectionLost,
    DiskFull,
    HostError,
    Interrupted,
    LockedError,
    SwitchoverError,
)
from switchover.faults import pause, pausing
from switchover.hosts import HostSpec
from switchover.layout import Layout
from switchover.releases import ReleaseStates, analyze, is_release_id, utc_now_iso
from switchover.secrets import redact_doc
from switchover.transport import Result, SyncStats, Transport
from switchover.transport.progress import ProgressCallback
from switchover.treediff import TreeDiff
from switchover.units import human_size


class Tracer(Protocol):
    """Told about every script a host runs (the Reporter: -vv output and the log file)."""

    def trace(self, host: str, script: str) -> None: ...

    def trace_result(self, host: str, rc: int, seconds: float) -> None: ...


@dataclass
class HostState:
    """What a host looks like right now, read in one round trip."""

    current_kind: str = "none"  # link, dir, other or none
    current_target: str | None = None  # the raw symlink target
    releases: list[str] = field(default_factory=list)
    staging: list[str] = field(default_factory=list)
    lock: dict[str, Any] | None = None  # None: not locked; {} if the owner is unreadable
    history: list[dict[str, Any]] = field(default_factory=list)
    lock_heartbeat_age: int | None = None  # seconds since the holder's last heartbeat
    live_manifest_sha: str | None = None  # sha256 of the live release's stored manifest
    begun: bool = False  # acquire(begin=...) began the release in the same round trip
    newest_id: str | None = None  # the newest release id the history read names (sent or not)

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

    def live_lock(self, lock_timeout: float) -> dict[str, Any] | None:
        """The lock, if a deploy may still hold it; None if free or its owner is provably
        gone (a deploy would take it over)."""
        if self.lock is None:
            return None
        if locks.stale_reason(self.lock, self.lock_heartbeat_age, lock_timeout) is not None:
            return None
        return self.lock

    def used_ids(self) -> set[str]:
        """Every release id this host has seen: on disk, in staging, in the history lines
        read. A new id must differ from all of them (a killed deploy's rsync may still be
        writing); `commands.begin` also checks the whole history file."""
        seen = {*self.releases, *self.staging, *(str(e.get("release")) for e in self.history)}
        return seen | {self.newest_id} if self.newest_id else seen

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
    if "end" not in s or C.HISTORY_ERROR in s:
        raise ValueError("incomplete state output")
    current = s.get("current", [])
    kind = current[0] if current else "none"
    return HostState(
        current_kind=kind,
        current_target=current[1] if kind == "link" and len(current) > 1 else None,
        releases=sorted(r for r in s.get("releases", []) if is_release_id(r)),
        staging=[r for r in s.get("staging", []) if r],
        lock=parse_lock(["held", *s["lock"]]) if "lock" in s else None,
        history=parse_history(s.get("history", [])),
        newest_id=next((r for r in s.get("newest_id", []) if is_release_id(r)), None),
        lock_heartbeat_age=_first_int(s.get("heartbeat_age", [])),
        live_manifest_sha=_digest(s.get("live_manifest", [])),
        begun=s.get("begun", [])[:1] == ["yes"],
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
        self.tracer: Tracer | None = None  # sees every script sent (-vv and the log file)
        # Masks secret values in operator-command output and in what we record on the host
        # (session.open_hosts installs a secrets.Redactor).
        self.redact: Callable[[str], str] = lambda text: text
        self.locking = locks.LockPolicy()  # stale-lock judgement (session.open_hosts sets it)
        self.warn: Callable[[str], None] | None = None  # the Reporter's warn, if any
        self._heartbeat: locks.Heartbeat | None = None
        self._manifests: dict[str, dict[str, Any]] = {}  # release -> files, set by upload

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, script: str, timeout: float | None = None,
            input: bytes | None = None) -> Result:
        if self.tracer is None:
            return self.transport.run(script, timeout=timeout or self.timeout, input=input)
        self.tracer.trace(self.name, script)
        t0 = time.monotonic()
        r = self.transport.run(script, timeout=timeout or self.timeout, input=input)
        self.tracer.trace_result(self.name, r.rc, time.monotonic() - t0)
        return r

    def _must(self, result: Result, what: str) -> Result:
        if result.rc != 0:
            raise HostError(f"{what} failed: {result.message}", host=self.name)
        return result

    def connect(self) -> None:
        self.transport.connect()

    def read_state(self, full_history: bool = False) -> HostState:
        """The host's state; its history is the lines decisions need unless `full_history`
        (see commands.dump_state)."""
        r = self._must(self.run(C.dump_state(self.layout, full_history=full_history)),
                       "reading state")
        return self._parse(r.stdout)

    def _parse(self, out: str) -> HostState:
        try:
            return parse_state(out)
        except ValueError:
            raise HostError("could not read the host's state (unexpected output)",
                            host=self.name) from None

    def acquire(self, owner: Mapping[str, Any],
                begin: tuple[str, Mapping[str, Any]] | None = None) -> HostState:
        """Take the deploy lock and read the state; LockedError names the holder.

        A lock whose owner is provably gone (see locks.py) is taken over with a warning and
        an `unlock` entry in the history; a live owner's lock never is. While we hold the
        lock a heartbeat thread keeps it fresh.

        `begin` (release, deploy_started entry) also begins that release in the same round
        trip if its id is fresh on this host; `state.begun` says whether it did.
        """
        (owner,) = self._clean([{**owner, **locks.identity()}])  # the lock is never secret
        then = ""
        if begin is not None:
            release, entry = begin
            then = C.begin_if_fresh(self.layout, release, self._clean([entry])[0])
        r = self.run(C.acquire(self.layout, owner, then))
        if r.rc == C.RC_LOCKED:
            sections = C.parse_sections(r.stdout)
            held = parse_lock(["held", *sections.get("lock", [])])
            age = _first_int(sections.get("heartbeat_age", []))
            reason = locks.stale_reason(held, age, self.locking.timeout)
            if reason is None:
                beat = f"; last heartbeat {age} s ago" if age is not None else ""
                raise LockedError(
                    f"locked by {describe_owner(held)}{beat}",
                    hint="wait for that deploy, or run `switchover unlock ENV` if it died",
                    host=self.name,
                )
            r = self._take_over(owner, held, reason, then)
        self._must(r, "preparing the layout")
        state = self._parse(r.stdout)
        self._start_heartbeat(str(owner.get("deploy_id", "")))
        pause("after_lock", self.name)
        if state.begun:
            pause("after_begin", self.name)
        return state

    def _take_over(self, owner: Mapping[str, Any], held: dict[str, Any] | None,
                   reason: str, then: str = "") -> Result:
        former = held or {}
        who = describe_owner(former)
        entry = {
            "time": utc_now_iso(), "event": "unlock", "app": self.locking.app,
            "env": self.locking.env, "host": self.name, "release": former.get("release"),
            "previous": None, "user": owner.get("user"), "origin": owner.get("origin"),
            "deploy_id": owner.get("deploy_id"),
            "message": f"took over a stale lock held by {who}: {reason}",
            "former_owner": former, "takeover": True,
        }
        stale_id = former.get("deploy_id") if former else None
        r = self.run(C.take_over(self.layout, stale_id if isinstance(stale_id, str) else None,
                                 owner, self._clean([entry])[0], then))
        if r.rc in (C.RC_LOCKED, C.RC_BUSY):
            now = parse_lock(["held", *C.parse_sections(r.stdout).get("lock", [])])
            busy = ": its detached switch step is still running on the host" \
                if r.rc == C.RC_BUSY else ""
            raise LockedError(f"locked by {describe_owner(now)}{busy}",
                              hint="wait for that deploy, or run `switchover unlock ENV`",
                              host=self.name)
        if r.ok:
            self._say(f"{self.name}: took over a stale lock held by {who}: {reason}")
        return r

    def _say(self, text: str) -> None:
        if self.warn is not None:
            self.warn(text)

    def _start_heartbeat(self, deploy_id: str) -> None:
        self._stop_heartbeat()
        script = C.heartbeat(self.layout, deploy_id)
        self._heartbeat = locks.Heartbeat(
            lambda: self.transport.run(script, timeout=30), locks.heartbeat_interval())

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def release_lock(self, deploy_id: str) -> None:
        pause("before_unlock", self.name)
        self._stop_heartbeat()
        self.run(C.release_lock(self.layout, deploy_id), timeout=30)

    def force_unlock(self) -> dict[str, Any] | None:
        r = self._must(self.run(C.force_unlock(self.layout)), "unlocking")
        lines = C.parse_sections(r.stdout).get("lock")
        return None if lines is None else (parse_lock(["held", *lines]) or {})

    def _clean(self, entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """History entries with every secret value masked: the history is never secret."""
        return [redact_doc(e, self.redact) for e in entries]

    def begin(self, release: str, entry: Mapping[str, Any]) -> None:
        (clean,) = self._clean([entry])
        self._must(self.run(C.begin(self.layout, release, clean)), "starting the release")
        pause("after_begin", self.name)

    def abandon(self, release: str, entry: Mapping[str, Any]) -> None:
        """Drop a begun release that never got an upload, and record why (one round trip)."""
        (clean,) = self._clean([entry])
        script = f"rm -rf {C.q(self.layout.staging(release))}\n" + \
            C.append_history(self.layout, [clean])
        self._must(self.run(script), "dropping the proposed release id")

    def upload(self, tree: Path, release: str, link_dest: str | None,
               exclude: Sequence[str], progress: ProgressCallback | None = None,
               entries: dict[str, dict[str, Any]] | None = None,
               live_files: Mapping[str, Mapping[str, Any]] | None = None,
               listing: Mapping[str, clonepatch.Node] | None = None,
               plans: clonepatch.PlanCache | None = None) -> SyncStats:
        """rsync the tree into the release's staging dir, unchanged files hard-linked from
        link_dest. With the live release's manifest (`live_files`), rsync's quick check is
        used and the few files it could get wrong are sent again (quickcheck.py); without
        it, --checksum. With that manifest and the tree's `listing` too, the live release
        is cloned on the host and only the difference is sent (clonepatch.py)."""
        dest = self.layout.staging(release)
        # The manifest (stored at finalize) describes the tree as it is here, not as it lands.
        scanned = entries if entries is not None else M.scan(tree, exclude)
        self._manifests[release] = scanned
        quick = link_dest is None or quickcheck.usable(live_files, scanned, exclude)
        if link_dest and quick and live_files is not None and listing is not None \
                and self.transport.can_patch():
            stats = self._clone_upload(tree, release, link_dest, live_files, scanned, listing,
                                       plans)
            if stats is not None:
                pause("after_upload", self.name)
                return stats
        force = quickcheck.suspects(live_files, scanned) if link_dest and quick and \
            live_files is not None else []
        how = "quick check" if quick else "--checksum"
        self._trace(f"# sync {tree}/ -> {dest}/ ({how}"
                    + (f"; unchanged files hard-linked from {link_dest}" if link_dest else "")
                    + ")")
        stats = self._with_retries(release, lambda: self.transport.sync(
            tree, dest, link_dest=link_dest, exclude=exclude, timeout=self.timeout,
            progress=progress, checksum=not quick))
        if force:
            self._trace(f"# sync again, ignoring size and mtime: {len(force)} file(s) "
                        "changed in content only")
            extra = self._with_retries(release, lambda: self.transport.sync(
                tree, dest, link_dest=None, exclude=(), timeout=self.timeout, only=force))
            stats = SyncStats(stats.files_total,
                              stats.files_transferred + extra.files_transferred,
                              stats.bytes_transferred + extra.bytes_transferred,
                              stats.bytes_sent + extra.bytes_sent)
        pause("after_upload", self.name)
        return stats

    def _clone_upload(self, tree: Path, release: str, source: str,
                      live_files: Mapping[str, Mapping[str, Any]],
                      scanned: Mapping[str, Mapping[str, Any]],
                      listing: Mapping[str, clonepatch.Node],
                      plans: clonepatch.PlanCache | None) -> SyncStats | None:
        """Clone `source` into staging, patch it into the tree; None: upload it whole."""
        users, groups = clonepatch.names(listing)
        spare = self.layout.spare(posixpath.basename(source.rstrip("/")))
        try:
            r = self.run(C.clone_release(self.layout, source, release, users, groups, spare))
            if r.rc == C.RC_NO_CLONE:
                why = r.stderr.strip() or "no GNU find or cp on the host"
                self._trace(f"# cannot clone the live release ({why}): the whole tree is "
                            "synced")
                return self._unclone(release)
            self._must(r, "cloning the live release")
            head, marker, data = r.stdout.partition(C.SECTION + "listing\n")
            sections = C.parse_sections(head)
            ids = sections.get("ids")
            made = "from the spare made after the last deploy" if sections.get("clone") == [
                "spare"] else "copied now"

            def make() -> clonepatch.Patch:
                if not marker:
                    raise clonepatch.Unlistable("no listing in the output")
                remote = clonepatch.parse_listing(data)
                clonepatch.check_reset(remote)
                owners = clonepatch.parse_ids(ids, users, groups) if ids is not None else None
                return clonepatch.plan(listing, remote, live_files, scanned, owners)

            # Hosts on one live release list the same clone: planned once for all of them.
            key = (id(live_files), tuple(ids) if ids is not None else None, data)
            patch = plans.get(key, make) if plans is not None else make()
            self._trace(f"# sync {tree}/ -> {self.layout.staging(release)}/ as a clone of "
                        f"{source} ({made}): {len(patch.remove)} path(s) removed, "
                        f"{len(patch.send)} sent (every directory, and the files that differ)")
            if patch.remove:
                paths = b"".join(p.encode() + b"\0" for p in patch.remove)
                self._must(self.run(C.remove_paths(self.layout, release), input=paths),
                           "removing paths from the clone")
        except clonepatch.Unlistable as e:
            self._trace(f"# the clone cannot be listed faithfully ({e}): the whole tree is "
                        "synced")
            return self._unclone(release)
        except ConnectionLost as e:
            self._say(f"{self.name}: {e.message}; uploading the whole tree instead")
            with contextlib.suppress(HostError):
                self.transport.reconnect()
            return self._unclone(release)
        stats = self._with_retries(release, lambda: self.transport.sync(
            tree, self.layout.staging(release), link_dest=None, exclude=(),
            timeout=self.timeout, only=patch.send))
        files = sum(1 for e in scanned.values() if e.get("type") == "file")
        return SyncStats(files, stats.files_transferred, stats.bytes_transferred,
                         stats.bytes_sent)

    def _unclone(self, release: str) -> None:
        """Empty staging again before the whole tree is synced into it: rsync must not take
        the clone's files (the live release's inodes) for its own and set their modes or
        times in place."""
        # It may wait CLONE_LOCK_WAIT for a clone cut off by a dropped link: let it say so
        # itself rather than time out first.
        self._must(self.run(C.reset_staging(self.layout, release),
                            timeout=max(self.timeout, C.CLONE_LOCK_WAIT + 30)),
                   "emptying staging")

    def _trace(self, text: str) -> None:
        """A note in the -vv trace (and the log file), among the scripts sent."""
        if self.tracer is not None:
            self.tracer.trace(self.name, text)

    def _with_retries(self, release: str, sync: Callable[[], SyncStats]) -> SyncStats:
        """Run one rsync pass; a dropped link is retried (resuming partial files)."""
        delay = RETRY_BACKOFF
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                return sync()
            except DiskFull as e:
                raise self._disk_full(e, release) from None
            except ConnectionLost as e:
                if attempt == UPLOAD_ATTEMPTS:
                    raise ConnectionLost(f"{e.message} (gave up after {attempt} attempts)",
                                         host=self.name) from None
                self._say(f"{self.name}: {e.message}; retrying in {delay:g} s "
                          f"(attempt {attempt + 1} of {UPLOAD_ATTEMPTS}), resuming partial files")
                self._sleep(delay)
                delay *= 2
                with contextlib.suppress(HostError):
                    self.transport.reconnect()
        raise AssertionError("unreachable")  # the loop returns or raises

    def _sleep(self, seconds: float) -> None:
        """Wait between retries; Ctrl-C (before the switch) cuts it short."""
        abort = self.transport.abort
        if abort is None:
            time.sleep(seconds)
        elif abort.wait(seconds):
            raise Interrupted("interrupted", host=self.name)

    def _disk_full(self, error: DiskFull, release: str) -> DiskFull:
        """Name the host and its free space once the partial upload is gone."""
        self.remove_staging(release)
        free = ""
        with contextlib.suppress(SwitchoverError):
            df = C.parse_disk_free(self.run(C.disk_free(self.layout), timeout=30).stdout)
            if df is not None:
                total_kb, free_kb = df
                free = (f"; {human_size(free_kb * 1024)} free of {human_size(total_kb * 1024)}"
                        f" on the filesystem holding {self.layout.deploy_to} (df)")
        need = sum(f.get("size", 0) for f in self._manifests.get(release, {}).values())
        return DiskFull(f"{error.message}{free}; the release is {human_size(need)}",
                        hint="free space on the host (or lower keep_releases), then deploy "
                             "again: the live release was not touched", host=self.name)

    def compare(self, tree: Path, release: str, exclude: Sequence[str]) -> TreeDiff:
        """What uploading `tree` would change relative to `release`; writes nothing."""
        dest = self.layout.release(release)
        self._trace(f"# compare (dry run) {tree}/ with {dest}/")
        return self.transport.compare(tree, dest, exclude=exclude, timeout=self.timeout)

    def finalize(self, release: str, files: Sequence[str], dirs: Sequence[str],
                 manifest: bytes | None = None) -> None:
        """Move the upload into releases/, link shared items, store the manifest (given,
        or built from what upload scanned)."""
        scanned = self._manifests.get(release)
        data = manifest if manifest is not None or scanned is None else \
            M.encode(M.build(release, scanned, files, dirs))
        r = self.run(C.finalize(self.layout, release, files, dirs,
                                manifest_size=None if data is None else len(data)), input=data)
        if r.rc == C.RC_SHARED_MISSING:
            raise HostError(r.message, host=self.name)
        self._must(r, "finalizing the release")
        pause("after_finalize", self.name)

    def run_in_release(self, release: str, command: str, env: Mapping[str, str],
                       timeout: float | None = None) -> Result:
        script = C.run_in_release(self.layout, release, command, env, timeout)
        # Give the host's own `timeout` a head start so it, not ssh, reports a stuck command.
        r = self.run(script, timeout=(timeout + 10) if timeout else None)
        # Hooks and checks may print secrets; everything built from their output (progress,
        # error messages, history) starts from this masked copy.
        return Result(r.rc, self.redact(r.stdout), self.redact(r.stderr))

    def switch(self, release: str | None, entries: Iterable[Mapping[str, Any]]) -> None:
        """Point `current` at a release, no hooks (`release=None`: remove it; with hooks,
        `switch_with_hooks`)."""
        pause("before_rollback_switch", self.name)
        r = self.run(C.switch(self.layout, release, self._clean(entries)))
        if r.rc != 0:
            raise SwitchoverError(f"switch failed: {r.message}", host=self.name)

    def record(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._must(self.run(C.append_history(self.layout, self._clean(entries))),
                   "writing history")

    def remove_releases(self, releases: Iterable[str]) -> None:
        ids = list(releases)
        if ids:
            self._must(self.run(C.remove_releases(self.layout, ids)), "removing releases")

    def prune_and_record(self, releases: Iterable[str], entries: Iterable[Mapping[str, Any]],
                         unlock: str | None = None, spare: str | None = None) -> None:
        """After a good deploy, in one round trip: move pruned releases out of releases/
        (deleted in the background), append the history entries and, with `unlock` (our
        deploy id), release the lock once they are written. `spare`: the live release, of
        which a clone for the next deploy is then made in the background (build_spare)."""
        script = C.remove_releases(self.layout, list(releases), background=True)
        script += C.append_history(self.layout, self._clean(entries))
        if unlock is not None:
            pause("before_finish", self.name)
            self._stop_heartbeat()  # a beat after the unlock would find no lock: harmless
            # Unlock only once the history is written; a failure leaves the lock to the
            # caller's own unlock (and the error to report).
            script = f"(\n{script}\n) || exit $?\n" + C.release_lock(self.layout, unlock)
        if spare is not None:  # after the unlock, whose status stays the script's
            script += f"\nrc=$?\n{C.build_spare(self.layout, spare)}\nexit $rc"
        self._must(self.run(script), "recording the deploy")

    def remove_staging(self, release: str) -> None:
        self.run(f"rm -rf {C.q(self.layout.staging(release))}", timeout=60)

    def check_prerequisites(self, need_rsync: bool) -> str:
        r = self.run(C.check_prerequisites(self.layout, need_rsync))
        if r.rc != 0:
            raise HostError(r.message, host=self.name)
        return r.stdout.strip()

    def switch_with_hooks(self, release: str, entries: Iterable[Mapping[str, Any]],
                          hooks: Sequence[str], env: Mapping[str, str],
                          timeout: float | None, token: str,
                          rollback: bool = False) -> SwitchStep:
        """Switch and run the hooks (after_switch, or after_rollback with `rollback`) as ONE
        detached step on the host, and wait.

        The host finishes the step even if this connection drops or this process dies (see
        commands.switch_detached): a release is never left live without its restart. We
        wait for its result in bounded rounds, reconnecting if the link drops. A launch
        that never reached the host is started again once.
        """
        before, during, after = STEP_PAUSES[rollback]
        pause(before, self.name)
        hooks = list(hooks)
        per_hook = (timeout or self.timeout) + 10
        limit = 60 + len(hooks) * per_hook
        deadline = time.monotonic() + limit
        slot = f"{token}-{release}"
        # The fault-injection hook pauses between launch and wait: launch without waiting.
        first_wait = 0.0 if pausing(during) else WAIT_ROUND
        launch = True
        relaunched = False
        reconnects = 0
        while True:
            left = max(0.0, deadline - time.monotonic())
            if launch:
                script = C.switch_detached(self.layout, slot, release, self._clean(entries),
                                           hooks, env, timeout, min(first_wait, left))
            else:
                script = C.wait_detached(self.layout, slot, min(WAIT_ROUND, left))
            try:
                r = self.run(script, timeout=min(WAIT_ROUND, left) + 30)
            except ConnectionLost as e:
                reconnects += 1
                if reconnects > SWITCH_RECONNECTS:
                    raise HostError(
                        f"lost the connection during the switch step ({e.message}); the host "
                        "finishes that step by itself: check it with `switchover status`",
                        host=self.name) from None
                self._say(f"{self.name}: {e.message}; reconnecting to wait for the switch step")
                time.sleep(RETRY_BACKOFF * reconnects)
                with contextlib.suppress(HostError):
                    self.transport.reconnect()
                launch = False
                continue
            if r.rc == C.RC_NOT_STARTED and not launch and not relaunched:
                # We claimed the slot: the launch never ran and never will. Start it anew.
                relaunched, launch, slot = True, True, slot + "-2"
                continue
            was_launch, launch = launch, False
            if r.rc == C.RC_PENDING:
                if was_launch:
                    pause(during, self.name)
                if time.monotonic() >= deadline:
                    with contextlib.suppress(SwitchoverError):
                        self.run(C.kill_detached(self.layout, slot), timeout=30)
                    raise HostError(f"the switch step did not finish within {limit:g} s: "
                                    "stopped it", host=self.name)
                continue
            if r.rc != 0:
                raise HostError(f"switch step failed: {r.message}", host=self.name)
            step = SwitchStep.parse(self.redact(r.stdout))
            pause(after, self.name)
            return step

    def checkpoint(self, step: str) -> None:
        """A named point of a deploy where fault-injection tests may pause (faults.py)."""
        pause(step, self.name)

    def live_listing(self, python: bool = True) -> tuple[str, dict[str, Any] | None,
                                                         dict[str, dict[str, Any]]]:
        """The live release, its stored manifest (None if it has none) and its files."""
        r = self.run(C.live_listing(self.layout, python))
        if r.rc != 0:
            raise HostError(r.message, host=self.name)
        s = C.parse_sections(r.stdout)
        if "end" not in s:
            raise HostError("could not list the live release (unexpected output)",
                            host=self.name)
        release = (s.get("release") or [""])[0]
        doc: dict[str, Any] | None = None
        text = "\n".join(s.get("manifest", [])).strip()
        if text:
            try:
                doc = json.loads(text)
            except ValueError:
                raise HostError(f"the manifest of release {release} is corrupt",
                                host=self.name) from None
        return release, doc, M.parse_listing(s.get("listing", []))

    def close(self) -> None:
        self._stop_heartbeat()
        # Closing must never hide the error that brought us here.
        with contextlib.suppress(Exception):
            self.transport.close()


UPLOAD_ATTEMPTS = 3  # an upload cut off by the network is retried, resuming partial files
RETRY_BACKOFF = 1.0  # seconds before the first retry, doubled for each further one
WAIT_ROUND = 20.0  # seconds one remote wait for the detached switch step may block
SWITCH_RECONNECTS = 3
# Fault-injection points (faults.py) of the detached step: before, during, after; a
# deploy's switch (False) and a rollback (True).
STEP_PAUSES = {False: ("before_switch", "during_switch", "after_hooks"),
               True: ("before_rollback_switch", "during_rollback", "after_rollback_hooks")}


def _digest(lines: Sequence[str]) -> str | None:
    """The sha256 hex digest `sha256sum` printed, if it printed one."""
    word = (lines[0].split() or [""])[0] if lines else ""
    return word if len(word) == 64 and all(c in "0123456789abcdef" for c in word) else None


def _first_int(lines: Sequence[str]) -> int | None:
    for line in lines:
        line = line.strip()
        if line.lstrip("-").isdigit():
            return int(line)
    return None


@dataclass
class SwitchStep:
    """The result of the detached switch step: did it switch, which hook failed, output."""

    status: str  # "ok", "switch" (the switch failed) or "hook" (a hook failed)
    rc: int = 0
    failed_hook: int | None = None
    switch_output: str = ""
    outputs: dict[int, str] = field(default_factory=dict)

    @property
    def switched(self) -> bool:
        return self.status != "switch"

    @property
    def hooks_run(self) -> int:
        return len(self.outputs)

    def output(self, hook: int) -> str:
        return self.outputs.get(hook, "")

    @property
    def message(self) -> str:
        text = self.switch_output if self.status == "switch" else self.output(
            self.failed_hook if self.failed_hook is not None else -1)
        return Result(self.rc or 1, text, "").message if text.strip() else \
            f"exit status {self.rc}"

    @classmethod
    def parse(cls, out: str) -> SwitchStep:
        s = C.parse_sections(out)
        words = ((s.get("status") or [""])[0]).split()
        outputs = {int(k.split(":", 1)[1]): "\n".join(v) for k, v in s.items()
                   if k.startswith("hook:") and k.split(":", 1)[1].isdigit()}
        switch_out = "\n".join(s.get("switch", []))
        if words[:1] == ["ok"]:
            return cls("ok", 0, None, switch_out, outputs)
        if words[:1] == ["switch"] and len(words) == 2 and words[1].isdigit():
            return cls("switch", int(words[1]), None, switch_out, outputs)
        if words[:1] == ["hook"] and len(words) == 3 and all(w.isdigit() for w in words[1:]):
            return cls("hook", int(words[2]), int(words[1]), switch_out, outputs)
        raise HostError(f"the switch step ended without a usable result ({' '.join(words)!r})")
