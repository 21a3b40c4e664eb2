"""A deploy across every host of an environment, in phases.

1. prepare: connect, lock, read state, and begin the release under an id proposed from
   this machine's clock (one round trip per host). A host that fails here stops the others
   at once; what they staged is removed and `current` is untouched everywhere.
2. stage: upload into staging, move it into releases/<id>, link shared, run before_switch
   hooks. Pipelined with prepare: a host uploads as soon as it holds its lock; the id is
   fixed (and anything finalized) once every host holds its lock. Any failure: staged
   releases removed, `current` untouched.
3. switch: one rename per host, after_switch hooks, health checks, batch by batch.
4. verify: if any host failed, every switched host goes back to the release it ran before,
   so the fleet ends on one release. Otherwise: record success, prune and unlock.
Locks are released on every path out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from switchover import clonepatch, sentmanifests
from switchover import manifest as M
from switchover.artifact import Artifact
from switchover.config import Environment
from switchover.context import RunContext
from switchover.errors import (
    DeployFailed,
    ExitCode,
    HostError,
    Interrupted,
    LockedError,
    RollbackFailed,
    SwitchoverError,
    as_error,
)
from switchover.fanout import fan_out
from switchover.health import CheckOutcome, expand_url, fetch_url, with_retries
from switchover.hostops import HostOps, HostState
from switchover.output import Reporter
from switchover.releases import analyze, choose_release_id, new_release_id, select_prune
from switchover.secrets import SECRETS_FILE, Secrets
from switchover.secrets import upload as upload_secrets
from switchover.session import hook_environment, report_step_hooks, run_hooks
from switchover.strategy import plan_batches
from switchover.transport import SyncStats
from switchover.units import human_size


class HookFailed(DeployFailed):
    pass


@dataclass
class HostRun:
    ops: HostOps
    state: HostState | None = None
    locked: bool = False
    begun_id: str | None = None  # the release this host recorded deploy_started for
    prepare_failed: bool = False  # failed to connect / lock / read its state
    switched: bool = False
    passed: bool = False  # switched, and its hooks and checks passed
    finish_started: bool = False  # its success is being (or was) recorded
    previous: str | None = None  # the release that was live before this deploy
    status: str = "pending"
    error: SwitchoverError | None = None
    stats: SyncStats | None = None
    checks: list[CheckOutcome] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.ops.name

    @property
    def begun(self) -> bool:
        return self.begun_id is not None

    def fail(self, error: BaseException) -> None:
        self.error = as_error(error, self.name)

    def summary(self) -> dict[str, Any]:
        return {
            "host": self.name,
            "status": self.status,
            "previous": self.previous,
            "error": self.error.message if self.error else None,
            "files_transferred": self.stats.files_transferred if self.stats else None,
            "bytes_transferred": self.stats.bytes_transferred if self.stats else None,
            "checks": [
                {"name": c.name, "ok": c.ok, "attempts": c.attempts, "detail": c.detail}
                for c in self.checks
            ],
            "pruned": self.pruned,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class DeployReport:
    status: str
    exit_code: int
    release: str | None
    message: str
    hosts: list[HostRun]
    seconds: float
    ctx: RunContext

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "app": self.ctx.app,
            "environment": self.ctx.env,
            "deploy_id": self.ctx.deploy_id,
            "release": self.release,
            "message": self.message,
            "seconds": round(self.seconds, 3),
            "hosts": [h.summary() for h in self.hosts],
        }


class Deployer:
    def __init__(
        self,
        env: Environment,
        hosts: Sequence[HostOps],
        reporter: Reporter,
        ctx: RunContext,
        *,
        artifact: Artifact,
        checks: Sequence[str] = (),
        urls: Sequence[str] = (),
        message: str = "",
        secrets: Secrets | None = None,
    ) -> None:
        self.env = env
        self.secrets = secrets  # written to shared/.env on each host before finalize
        self.runs = [HostRun(h) for h in hosts]
        self.out = reporter
        self.ctx = ctx
        self.artifact = artifact
        self.checks = [*env.health.commands, *checks]
        self.urls = [*env.health.urls, *urls]
        self.message = message
        self.release: str | None = None
        self.candidate = new_release_id(())  # proposed to every host with the lock
        self.cancel = threading.Event()  # Ctrl-C
        # Stops every step before the switch at once: Ctrl-C, or any host failing there.
        self.halt = threading.Event()
        self._halted_by_failure = False  # halt set because a host failed (not by Ctrl-C)
        self._acquired = threading.Event()  # every host is past prepare (or one failed)
        self._arrived = 0
        self._prepare_ok = True
        self._memo_lock = threading.RLock()
        self._live_manifests: dict[str, dict[str, dict[str, Any]] | None] = {}
        self._manifests: dict[str, bytes] = {}  # release id -> the manifest's bytes
        self._manifest_lock = threading.Lock()
        self._manifest_stored = False
        self._listed = False
        self._listing_lock = threading.Lock()
        self._plans = clonepatch.PlanCache()
        self._local_listing: dict[str, clonepatch.Node] | None = None
        self.cleaning_up = False  # set once a rollback or cleanup has begun
        self.committed = False  # set once every host switched and passed its checks
        self.t0 = time.monotonic()

    # -- helpers -------------------------------------------------------------------------

    def _each(self, runs: Sequence[HostRun], fn: Any,
              cancel: threading.Event | None = None, *, run_all: bool = False) -> None:
        """Run fn(run) on every host in parallel, recording failures on the run. Ctrl-C
        sets `cancel` (default: self.cancel); with `run_all` every host still runs fn."""
        def timed(run: HostRun) -> Any:
            try:
                return fn(run)
            finally:
                run.seconds = time.monotonic() - run.started

        with self.out.ordered([r.name for r in runs]):
            outcomes = fan_out(runs, timed, self.env.parallel,
                               self.cancel if cancel is None else cancel, run_all=run_all)
        for run, outcome in zip(runs, outcomes, strict=True):
            if outcome.error is not None:
                run.fail(outcome.error)

    def _check_cancel(self) -> None:
        if self.cancel.is_set() or self.halt.is_set():
            raise Interrupted("interrupted")

    def _entry(self, event: str, run: HostRun, **kw: Any) -> dict[str, Any]:
        kw.setdefault("release", self.release)
        kw.setdefault("previous", run.previous)
        return self.ctx.entry(event, run.name, **kw)

    def _env_for(self, run: HostRun, release: str) -> dict[str, str]:
        return hook_environment(self.env, run.name, release,
                                run.ops.layout.release(release), run.previous)

    def _run_hooks(self, run: HostRun, stage: str, hooks: Sequence[str], release: str) -> None:
        failed = run_hooks(run.ops, self.out, stage, hooks, release,
                           self._env_for(run, release), self.env.timeout, self._check_cancel)
        if failed is not None:
            hook, r = failed
            raise HookFailed(f"{stage} hook failed (exit {r.rc}): {hook}: {r.message}",
                             host=run.name)

    def _live_files(self, digest: str | None) -> dict[str, dict[str, Any]] | None:
        """The live release's manifest entries from our local copy (read once per digest:
        a fleet on one release shares it)."""
        if digest is None:
            return None
        with self._memo_lock:
            if digest in self._live_manifests:
                return self._live_manifests[digest]
        # Read outside the lock: hosts arriving (_arrive) must not wait for it. Two readers
        # of one digest read the same file; the first one kept is used by all.
        files = sentmanifests.load(digest)
        with self._memo_lock:
            return self._live_manifests.setdefault(digest, files)

    def _listing(self) -> dict[str, clonepatch.Node] | None:
        """The artifact's full listing for clone uploads, made once for every host (begun
        while the hosts log in, see _prefetch); None if it cannot be listed faithfully
        (every host then uploads the whole tree)."""
        with self._listing_lock:  # not _memo_lock: hosts arriving must not wait for this
            if not self._listed:
                self._listed = True
                try:
                    self._local_listing = clonepatch.local_listing(
                        self.artifact.stats, self.artifact.entries)
                except clonepatch.Unlistable as e:
                    self.out.note(f"uploading whole trees: {e}")
            return self._local_listing

    def _manifest_bytes(self, release: str) -> bytes:
        """The manifest of `release`, built once for every host (see _prefetch)."""
        with self._manifest_lock:  # not _memo_lock: uploads must not wait for this
            if release not in self._manifests:
                shared = self.env.shared
                self._manifests[release] = M.encode(M.build(release, self.artifact.entries,
                                                            shared.files, shared.dirs))
            return self._manifests[release]

    def _finalize_manifest(self) -> bytes:
        """The manifest for a host's finalize; the first one also keeps it locally, so the
        next deploy can trust rsync's quick check against it (sentmanifests.py)."""
        assert self.release is not None
        data = self._manifest_bytes(self.release)
        with self._manifest_lock:
            if not self._manifest_stored:
                self._manifest_stored = True
                sentmanifests.store(data)
        return data

    # -- phases --------------------------------------------------------------------------

    def _started(self, run: HostRun, release: str) -> dict[str, Any]:
        return self._entry("deploy_started", run, release=release, message=self.message,
                           artifact=self.artifact.source.name,
                           artifact_sha256=self.artifact.sha256)

    def _prepare(self, run: HostRun) -> None:
        self._check_cancel()
        # This step is never cut off (only bounded by its timeout): killed after the host
        # took the lock but before we heard so, it would leave a lock nobody releases.
        run.ops.transport.abort = None
        try:
            with self.out.activity(run.name, "connecting, taking the lock", announce=False):
                run.ops.connect()
                # The release is begun in the lock's round trip under an id proposed before
                # any host was seen; choose_release_id keeps it unless some host rules it out.
                run.state = run.ops.acquire(
                    self.ctx.owner("deploy"),
                    begin=(self.candidate, self._started(run, self.candidate)))
        finally:
            if not self.cleaning_up:  # a cleanup (second Ctrl-C) owns the transport now
                run.ops.transport.abort = self.halt
        run.locked = True
        if run.state.begun:
            run.begun_id = self.candidate
        run.previous = run.state.current
        if run.state.current_kind == "dir":
            raise HostError(f"{run.ops.layout.current} is a real directory, not a symlink: "
                            "refusing to replace it (move it aside first)", host=run.name)
        if run.state.current_kind == "other":
            raise HostError(f"{run.ops.layout.current} exists and is not a symlink",
                            host=run.name)

    def _prepare_and_stage(self, run: HostRun) -> None:
        """One host from connect to before_switch hooks, pipelined: a host that began the
        proposed id uploads at once, while others are still connecting. The id is fixed
        once every host holds its lock (the last to arrive chooses it)."""
        self._prepare_part(run)
        self._stage_part(run, early=True)

    def _prepare_part(self, run: HostRun) -> None:
        try:
            self._prepare(run)
        except BaseException:
            run.prepare_failed = True
            self._arrive(ok=False)
            raise
        self._arrive(ok=True)

    def _stage_part(self, run: HostRun, early: bool = False) -> None:
        # A failure here does not stop the other hosts: each one's own result (a hook's
        # output, say) is worth seeing, and all staged releases are removed after.
        uploaded = None
        if early and run.begun_id is not None:
            self._upload(run, run.begun_id)
            uploaded = run.begun_id
        release = self._wait_for_release()
        if uploaded != release:
            if run.begun_id != release:
                self._rebegin(run, release)
            self._upload(run, release)
        self._finalize(run, release)

    def _arrive(self, ok: bool) -> None:
        """Count a host through prepare; the last one fixes the release id. A host that
        could not be reached or locked stops every other host's staging at once: the deploy
        cannot go on (nothing is live yet, so an upload can be cut off)."""
        with self._memo_lock:
            self._arrived += 1
            self._prepare_ok = self._prepare_ok and ok
            last = self._arrived == len(self.runs)
        if not ok:
            self._halt_for_failure()
        if last:
            try:
                if self._prepare_ok:
                    # Never reuse an id a killed deploy used in the same second: its orphaned
                    # rsync may still write to that staging path; its history lines name it.
                    used = {i for r in self.runs if r.state for i in r.state.used_ids()}
                    self.release = choose_release_id(self.candidate, used)
                    if self.release != self.candidate:  # (the candidate's is prefetched)
                        self._start_manifest(self.release)
            finally:
                self._acquired.set()  # whatever happened: no host may wait for it forever

    def _start_manifest(self, release: str) -> None:
        """Encode the manifest of a release id other than the candidate (~10 ms of JSON for
        2000 files) while the hosts upload. Best effort, as in _prefetch."""

        def build() -> None:
            with contextlib.suppress(Exception):
                self._manifest_bytes(release)

        with contextlib.suppress(RuntimeError):  # no thread to spare: finalize builds it
            threading.Thread(target=build, name="manifest", daemon=True).start()

    def _prefetch(self) -> None:
        """Work for the first upload and finalize, done while the hosts log in (this
        process is idle then; done after the lock, it held up the upload ~15 ms at 1 host):
        the artifact's listing, the candidate release's manifest, and the manifest copy the
        hosts most likely run (the one this machine sent or used last). Best effort: each
        is made again where it is needed if this did not, and errors are reported there;
        nothing is stored from here."""
        self._listing()
        with contextlib.suppress(Exception):
            self._manifest_bytes(self.candidate)
        with contextlib.suppress(Exception):
            self._live_files(sentmanifests.newest())

    def _halt_for_failure(self) -> None:
        with self._memo_lock:
            if not self.halt.is_set():  # a Ctrl-C first stays a Ctrl-C
                self._halted_by_failure = True
                self.halt.set()

    def _wait_for_release(self) -> str:
        while not self._acquired.wait(0.1):
            self._check_cancel()
        self._check_cancel()
        if self.release is None:
            raise Interrupted("stopped: another host failed before the switch")
        return self.release

    def _rebegin(self, run: HostRun, release: str) -> None:
        """Begin `release` on a host that has not (or began the proposed id, which some host
        ruled out: close that start first)."""
        ops = run.ops
        self._check_cancel()
        if run.begun_id is not None:
            ops.abandon(run.begun_id, self._entry(
                "deploy_failed", run, release=run.begun_id,
                message=f"release id {run.begun_id} is not usable on every host: "
                        f"this deploy continues as {release}"))
            run.begun_id = None
        ops.begin(release, self._started(run, release))
        run.begun_id = release

    def _upload(self, run: HostRun, release: str) -> None:
        assert run.state is not None
        ops = run.ops
        link_dest = None
        if run.previous and run.previous in run.state.releases:
            link_dest = ops.layout.release(run.previous)
        art = self.artifact
        self.out.step(run.name, f"uploading {art.source.name} "
                                f"({human_size(art.size)}, {art.files} files)...")
        self._check_cancel()
        live = self._live_files(run.state.live_manifest_sha) if link_dest else None
        with self.out.transfer(run.name, self.artifact.files, self.artifact.size) as progress:
            run.stats = ops.upload(self.artifact.tree, release, link_dest,
                                   self.env.artifact.exclude, progress, self.artifact.entries,
                                   live_files=live,
                                   listing=self._listing() if live is not None else None,
                                   plans=self._plans)
        sent = run.stats.files_transferred
        files = f"{sent} file{'' if sent == 1 else 's'}"
        size = human_size(run.stats.bytes_transferred)
        if link_dest is None:  # a first release on this host: nothing to hard-link from
            self.out.step(run.name, f"uploaded: {files} ({size})")
        else:
            self.out.step(run.name, f"uploaded: {files} changed ({size}), the rest hard-linked")

    def _finalize(self, run: HostRun, release: str) -> None:
        ops = run.ops
        self._check_cancel()
        if self.secrets is not None:
            # Before finalize: it links shared/.env into the release and needs it there.
            self.out.step(run.name, f"writing secrets to shared/{SECRETS_FILE} (mode 0600)")
            upload_secrets(ops, self.secrets)
            self._check_cancel()
        with self.out.activity(run.name, "moving the release into place", announce=False):
            ops.finalize(release, self.env.shared.files, self.env.shared.dirs,
                         self._finalize_manifest())
        self._run_hooks(run, "before_switch", self.env.hooks.before_switch, release)

    def _switch(self, run: HostRun) -> None:
        assert self.release is not None
        release = self.release
        self._check_cancel()
        hooks = list(self.env.hooks.after_switch)
        # The switch and the after_switch hooks run on the host as ONE detached step: a link
        # that drops (or a client that dies) in between cannot leave the release live without
        # its restart. A step in flight runs to its end; Ctrl-C is seen before the checks.
        with self.out.activity(run.name, "switching" + (", after_switch hooks" if hooks else ""),
                               announce=False):
            step = run.ops.switch_with_hooks(release, [self._entry("switched", run)], hooks,
                                             self._env_for(run, release), self.env.timeout,
                                             token=self.ctx.deploy_id)
        if not step.switched:
            raise SwitchoverError(f"switch failed: {step.message}", host=run.name)
        run.switched = True
        self.out.step(run.name, f"switched current to release {release}")
        failure = report_step_hooks(run.ops, self.out, "after_switch", hooks, step)
        if failure is not None:
            raise HookFailed(failure, host=run.name)
        self._health(run)
        # Passed only if no Ctrl-C came first: a Ctrl-C while checks run still rolls back.
        run.passed = not self.cancel.is_set()
        run.ops.checkpoint("after_health")

    def _health(self, run: HostRun, quiet: bool = False) -> None:
        """Run every check (each with its retries); raise if any failed."""
        assert self.release is not None
        release = self.release
        hc = self.env.health
        outcomes: list[CheckOutcome] = []
        for cmd in self.checks:
            self._check_cancel()

            def attempt(cmd: str = cmd) -> tuple[bool, str]:
                self._check_cancel()
                r = run.ops.run_in_release(release, cmd, self._env_for(run, release), hc.timeout)
                return r.ok, r.message if not r.ok else "ok"

            with self.out.activity(run.name, f"health check: {cmd}", announce=False):
                outcomes.append(with_retries(cmd, attempt, hc))
        for url in self.urls:
            self._check_cancel()
            target = expand_url(url, run.ops.spec.host)
            with self.out.activity(run.name, f"health check: {target}", announce=False):
                outcomes.append(with_retries(target, lambda t=target: fetch_url(t, hc.timeout),
                                             hc))
        run.checks = outcomes
        failed = [c for c in outcomes if not c.ok]
        if failed:
            c = failed[0]
            raise DeployFailed(f"health check failed after {c.attempts} attempts: "
                               f"{c.name}: {c.detail}", host=run.name)
        if outcomes and not quiet:
            self.out.good(run.name, "health check passed")

    def _soak(self, canaries: Sequence[HostRun]) -> None:
        """Keep re-checking the canaries for canary_wait seconds before going on."""
        wait = self.env.canary_wait
        if wait <= 0:
            return
        names = ", ".join(r.name for r in canaries)
        self.out.step(names, f"canary: watching for {wait:g} s before the rest of the fleet")
        deadline = time.monotonic() + wait
        every = max(1.0, self.env.health.interval)
        while not self.cancel.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                time.sleep(min(every, left))
            except KeyboardInterrupt:
                self.cancel.set()
                break
            if self.checks or self.urls:
                self._each(canaries, lambda r: self._health(r, quiet=True))
                if any(r.error for r in canaries):
                    return
        if not self.cancel.is_set() and (self.checks or self.urls):
            self.out.good(names, "canary healthy")

    def _rollback(self, run: HostRun, reason: str) -> None:
        """Put back the release that was live before this deploy (or none, on a first deploy)."""
        release, target = self.release, run.previous
        entries = [self._entry("deploy_failed", run, message=reason)]
        if target is not None:
            entries.append(self._entry("rolled_back", run, release=target, previous=release,
                                       message=f"automatic rollback: {reason}"))
        if target is None:
            try:
                run.ops.switch(None, entries)
            except SwitchoverError as e:
                raise RollbackFailed(f"rollback to (nothing) failed: {e.message}",
                                     host=run.name) from None
            self.out.bad(run.name, "no previous release to roll back to: current removed")
            return
        hooks = list(self.env.hooks.after_rollback)
        # Like the deploy's switch: the switch back and its restart are ONE detached step,
        # so a dying client or link cannot leave the old release live without its restart.
        try:
            step = run.ops.switch_with_hooks(target, entries, hooks,
                                             self._env_for(run, target), self.env.timeout,
                                             token=self.ctx.deploy_id, rollback=True)
        except SwitchoverError as e:
            raise RollbackFailed(f"rollback to {target} failed: {e.message}",
                                 host=run.name) from None
        if not step.switched:
            raise RollbackFailed(f"rollback to {target} failed: switch failed: {step.message}",
                                 host=run.name)
        self.out.step(run.name, f"rolled back to release {target}")
        failure = report_step_hooks(run.ops, self.out, "after_rollback", hooks, step)
        if failure is not None:
            raise RollbackFailed(f"rolled back to {target}, but {failure}", host=run.name)

    def _abort_staged(self, run: HostRun, reason: str) -> None:
        """Undo a stage that never reached the switch: remove the upload, record why."""
        release = run.begun_id
        assert release is not None
        run.ops.remove_staging(release)
        run.ops.remove_releases([release])
        run.ops.record([self._entry("deploy_failed", run, release=release, message=reason)])

    def _finish(self, run: HostRun) -> None:
        assert self.release is not None and run.state is not None
        run.finish_started = True
        seconds = round(time.monotonic() - self.t0, 3)
        done = self._entry("deploy_succeeded", run, message=self.message, seconds=seconds)
        states = analyze([*run.state.history, done], [*run.state.releases, self.release],
                         self.release)
        run.pruned = select_prune(states, self.env.keep_releases, protect=[self.release])
        entries = [done]
        if run.pruned:
            entries.append(self._entry("cleanup", run, message="removed " + " ".join(run.pruned),
                                       removed=run.pruned))
        run.ops.prune_and_record(run.pruned, entries, unlock=self.ctx.deploy_id,
                                 spare=self.release)
        run.locked = False

    def _unlock_all(self) -> None:
        held = [r for r in self.runs if r.locked]

        def unlock(run: HostRun) -> None:
            run.ops.release_lock(self.ctx.deploy_id)
            run.locked = False

        # Not cancellable: a lock must be released even after Ctrl-C.
        outcomes = fan_out(held, unlock, self.env.parallel)
        for run, o in zip(held, outcomes, strict=True):
            if not o.ok:
                self.out.warn(f"{run.name}: could not release the lock: {o.error}")

    # -- the whole deploy ----------------------------------------------------------------

    def run(self) -> DeployReport:
        try:
            return self._run()
        finally:
            for r in self.runs:
                r.ops.transport.abort = None  # unlocking must never be cut short
            try:
                self._unlock_all()
            finally:
                fan_out(self.runs, lambda r: r.ops.close(), self.env.parallel)

    def _report(self, status: str, code: int, message: str) -> DeployReport:
        return DeployReport(status, int(code), self.release, message, self.runs,
                            time.monotonic() - self.t0, self.ctx)

    def _failed(self) -> list[HostRun]:
        return [r for r in self.runs if r.error is not None]

    def _all_passed(self) -> bool:
        """Every host switched and passed its hooks and checks: nothing left to undo."""
        return bool(self.runs) and all(r.passed for r in self.runs) and not self._failed()

    def _run(self) -> DeployReport:
        try:
            return self._phases()
        except KeyboardInterrupt:
            if self.committed or self._all_passed():
                # The release passed everywhere: a first Ctrl-C undoes nothing (the success
                # is still recorded); a second one aborts the recording.
                if self.cancel.is_set():
                    raise
                self.cancel.set()
                return self._succeed()
            if self.cleaning_up:
                raise  # a second Ctrl-C during the rollback or cleanup: abort now
            # Ctrl-C between two phases (outside a fan-out): end as a fan-out would have.
            self.cancel.set()
            if any(r.switched for r in self.runs):
                return self._roll_back_fleet(self._failed())
            if any(r.begun for r in self.runs):
                return self._abort_stage()
            return self._report("interrupted", ExitCode.INTERRUPTED,
                                "interrupted before upload: nothing was changed")

    def _prepare_failed(self, failed: list[HostRun]) -> DeployReport:
        """A host could not be reached, locked or read: remove what the others staged."""
        self.cleaning_up = True
        names = ", ".join(r.name for r in failed)
        for r in self.runs:
            r.ops.transport.abort = None  # this cleanup must run to its end
        begun = [r for r in self.runs if r.begun]
        outcomes = fan_out(begun, lambda r: self._abort_staged(r, f"prepare failed on {names}"),
                           self.env.parallel)
        for r, o in zip(begun, outcomes, strict=True):
            if not o.ok:
                self.out.warn(f"{r.name}: could not remove the staged release: {o.error}")
        for r in self.runs:
            if r.error is not None:
                self.out.bad(r.name, r.error.message if isinstance(r.error, SwitchoverError)
                             else str(r.error))
            r.status = "failed" if r.error else "unchanged"
        code = ExitCode.LOCKED if any(isinstance(r.error, LockedError) for r in failed) \
            else ExitCode.UNREACHABLE
        return self._report("failed", code,
                            f"prepare failed on {names}: current unchanged on every host")

    def _abort_stage(self) -> DeployReport:
        """Undo every staged release after a failure or Ctrl-C before any switch."""
        self.cleaning_up = True
        runs = self.runs
        interrupted = self.cancel.is_set()
        reason = "interrupted before the switch" if interrupted else "; ".join(
            str(r.error) for r in self._failed()
        )
        for r in runs:
            r.ops.transport.abort = None
        begun = [r for r in runs if r.begun]
        outcomes = fan_out(begun, lambda r: self._abort_staged(r, reason), self.env.parallel)
        for r, o in zip(begun, outcomes, strict=True):
            if not o.ok:
                self.out.warn(f"{r.name}: could not remove the staged release: {o.error}")
        for r in runs:
            if r.error and not isinstance(r.error, Interrupted):
                self.out.bad(r.name, r.error.message)
            r.status = "failed" if r.error else "unchanged"
        if interrupted:
            return self._report("interrupted", ExitCode.INTERRUPTED,
                                "interrupted before the switch: current unchanged")
        hook = any(isinstance(r.error, HookFailed) for r in runs)
        code = ExitCode.DEPLOY_FAILED if hook else ExitCode.UNREACHABLE
        return self._report("failed", code, f"{reason}: current unchanged on every host")

    def _phases(self) -> DeployReport:
        runs = self.runs
        # A bad strategy (an unknown canary host) is a usage error before any host is touched.
        self.batches = plan_batches(self.env.strategy, [r.name for r in runs],
                                    self.env.batch_size, self.env.canary_hosts)
        # Before the switch nothing live depends on a step: Ctrl-C (or a host failing) kills
        # the steps in flight at once.
        for r in runs:
            r.ops.transport.abort = self.halt
        with contextlib.suppress(RuntimeError):  # no thread to spare: made when needed
            threading.Thread(target=self._prefetch, name="prefetch", daemon=True).start()
        # 1 + 2. prepare and stage: pipelined per host when every host has a worker (see
        # _prepare_and_stage); in two waves when `parallel` is smaller than the fleet (a
        # worker waiting for a host that has none would wait forever).
        if self.env.parallel >= len(runs):
            self._each(runs, self._prepare_and_stage, cancel=self.halt)
        else:
            self._each(runs, self._prepare_part, cancel=self.halt)
            if not self.halt.is_set():
                self._each(runs, self._stage_part, cancel=self.halt)
        if self.halt.is_set() and not self._halted_by_failure:
            self.cancel.set()  # halted by Ctrl-C, not by a failure
        elif self._halted_by_failure:
            for r in runs:  # cut off because another host failed: not failures themselves
                if isinstance(r.error, Interrupted):
                    r.error = None
        if self.cancel.is_set() or self._failed():
            failed = [r for r in runs if r.prepare_failed and r.error is not None]
            if failed and not self.cancel.is_set():
                return self._prepare_failed(failed)
            return self._abort_stage()

        # 3. switch, hooks, health, batch by batch as the strategy says. From here on a
        # step in flight runs to its end: a restart killed halfway is worse than a wait.
        for r in runs:
            r.ops.transport.abort = None
        batches = self.batches
        for n, batch in enumerate(batches):
            group = [runs[i] for i in batch]
            if len(batches) > 1:
                label = "canary" if self.env.strategy == "canary" and n == 0 else (
                    f"batch {n + 1}/{len(batches)}")
                self.out.step(", ".join(r.name for r in group), f"{label}: switching")
            self._each(group, self._switch)
            if not self.cancel.is_set() and not self._failed() and (
                    self.env.strategy == "canary" and n == 0 and len(batches) > 1):
                self._soak(group)
            # A Ctrl-C once every host has passed (it can land while the last check's output
            # is written) has nothing left to stop.
            if self._failed() or (self.cancel.is_set() and not self._all_passed()):
                return self._roll_back_fleet(self._failed())

        # 4. success: every host switched and passed its checks. From here on Ctrl-C undoes
        # nothing; the success is recorded on every host (a second Ctrl-C aborts that).
        return self._succeed()

    def _succeed(self) -> DeployReport:
        """Record the success, prune and unlock on every host, even after a Ctrl-C (entered
        again if a Ctrl-C lands outside the fan-out: each host is recorded once)."""
        # Committed: a host whose recording fails has still passed, so a later Ctrl-C must
        # not take it for a failed deploy and roll back.
        self.committed = True
        runs = self.runs
        self._each([r for r in runs if not r.finish_started], self._finish, run_all=True)
        if self.cancel.is_set():
            self.out.warn("interrupted after every host passed its checks: the release stays "
                          "live, and its success was recorded")
        for r in runs:
            r.status = "succeeded"
            if r.error:  # the release is live and healthy; only bookkeeping failed
                self.out.warn(f"{r.name}: {r.error.message}")
                r.error = None
        n = len(runs)
        msg = f"release {self.release} is live on {n} host{'s' if n != 1 else ''}"
        return self._report("succeeded", ExitCode.OK, msg)

    def _roll_back_fleet(self, failed: list[HostRun]) -> DeployReport:
        self.cleaning_up = True
        interrupted = self.cancel.is_set()
        for r in failed:
            if r.error and not isinstance(r.error, Interrupted):
                self.out.bad(r.name, r.error.message)
        if interrupted:
            reason = "interrupted after the switch"
        else:
            reason = "; ".join(str(r.error) for r in failed)
        # Every host that may have switched goes back, healthy ones too: one release fleet-wide.
        targets = [r for r in self.runs if r.switched or r.error is not None]
        self.cancel.clear()  # the rollback itself must run to the end
        # Hosts of later batches never switched: drop their staged release.
        waiting = [r for r in self.runs if r.begun and r not in targets]
        dropped = fan_out(waiting, lambda r: self._abort_staged(r, f"not switched: {reason}"),
                          self.env.parallel)
        for r, o in zip(waiting, dropped, strict=True):
            if not o.ok:
                self.out.warn(f"{r.name}: could not remove the staged release: {o.error}")
        outcomes = fan_out(targets, lambda r: self._rollback(r, reason), self.env.parallel)
        broken = []
        for r, o in zip(targets, outcomes, strict=True):
            if o.ok:
                r.status = "rolled_back" if r.previous else "failed"
            else:
                r.status = "rollback_failed"
                r.fail(o.error)  # type: ignore[arg-type]
                self.out.bad(r.name, f"NEEDS ATTENTION: {r.error}")
                broken.append(r)
        for r in self.runs:
            if r.status == "pending":
                r.status = "unchanged"
        if broken:
            names = ", ".join(r.name for r in broken)
            return self._report("rollback_failed", ExitCode.ROLLBACK_FAILED,
                                f"rollback failed on {names}: {reason}")
        what = "rolled back" if any(r.previous for r in targets) else "nothing to roll back to"
        code = ExitCode.INTERRUPTED if interrupted else ExitCode.DEPLOY_FAILED
        return self._report("rolled_back" if what == "rolled back" else "failed", code,
                            f"{reason}: {what}")
