"""The `switchover` command line. The only module that prints errors and exits."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from switchover import __version__
from switchover.errors import EXIT_CODE_HELP, ExitCode, SwitchoverError, UsageError

# Start-up time is paid by every command, so this module imports only what every command
# needs; a command body imports what it uses (deploy never loads rollback's or history's
# code, --help and --version load no config or rich at all).
if TYPE_CHECKING:
    from rich.table import Table

    from switchover.config import Environment
    from switchover.context import RunContext
    from switchover.deploy import DeployReport
    from switchover.hostops import HostOps
    from switchover.manage import CommandResult
    from switchover.output import Reporter
    from switchover.transport import Transport


def _no_redaction(text: str) -> str:
    return text


def _complete_environment(ctx: click.Context, param: click.Parameter,
                          incomplete: str) -> list[str]:
    # Wrapped: scaffold (and with it the config models) is only loaded when completing.
    from switchover.scaffold import complete_environment

    return complete_environment(ctx, param, incomplete)


class Ctx:
    def __init__(self, config: str | None, json_mode: bool, verbose: int) -> None:
        self._config_option = config
        self.json = json_mode
        self.verbose = verbose
        # Filled by the per-command options below (see `host_options`, `fleet_options`).
        self.hosts: tuple[str, ...] = ()
        self.hosts_from: str | None = None
        self.overrides: dict[str, Any] = {}
        # Masks [secrets] values in everything printed, errors included (set by env()).
        self.redact: Callable[[str], str] = _no_redaction
        self.out: Reporter | None = None  # the command's reporter, once it has one
        self.run_ctx: RunContext | None = None

    @functools.cached_property
    def config(self) -> Path:
        """The config file; worked out on first use, so `CMD --help` loads no config code
        (the group's callback, which makes this object, runs before the command's --help)."""
        from switchover.config import config_path_from

        return config_path_from(self._config_option)

    def env(self, name: str) -> Environment:
        from switchover.config import load_environment
        from switchover.secrets import redactor_for
        from switchover.selection import override, select_hosts

        env = load_environment(self.config, name)
        self.redact = redactor_for(env)
        env = select_hosts(env, self.hosts, self.hosts_from)
        return override(env, **self.overrides)

    def reporter(self, command: str, env: Environment | None = None) -> Reporter:
        """The command's reporter; with `env`, commands that act on hosts get a log file."""
        from switchover import runlog
        from switchover.output import Reporter

        out = Reporter(command, json_mode=self.json, verbose=self.verbose)
        out.redact = self.redact  # type: ignore[method-assign]  # secret values -> ***
        self.out = out
        if env is not None and command in runlog.LOGGED:
            runlog.start(out, env, self.run_context(env))
        return out

    def run_context(self, env: Environment) -> RunContext:
        """Who runs this command: one per run, so the log and the history share an id."""
        if self.run_ctx is None:
            from switchover.context import RunContext

            self.run_ctx = RunContext(env.app, env.name)
        return self.run_ctx

    def host_ops(self, env: Environment,
                 transports: Sequence[Transport] | None = None) -> list[HostOps]:
        """The environment's hosts (over `transports`, if made already), each script they
        run traced to the reporter (-vv, log): the one made so far, or the one `attach`
        names later."""
        from switchover.session import open_hosts

        # The redactor env() made from this config's secrets; none made yet: read them.
        hosts = open_hosts(env, None if self.redact is _no_redaction else self.redact,
                           transports)
        if self.out is not None:
            self.attach(hosts, self.out)
        return hosts

    @staticmethod
    def attach(hosts: list[HostOps], out: Reporter) -> None:
        """Trace every script the hosts run to `out`, and warn through it."""
        for h in hosts:
            h.tracer = out
            h.warn = out.warn


class _Interrupts:
    """Ctrl-C or SIGTERM. The first stops safely: before the switch nothing changes; after
    it the step in flight finishes and the deploy says how it ended (checked or rolled
    back). The second aborts now: every step in flight is killed."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> NoReturn:
        self.count += 1
        # os.write, not the Reporter: a signal handler must not wait for a lock.
        if self.count == 1:
            os.write(2, b"\n[switchover] interrupted: stopping safely "
                        b"(press Ctrl-C again to abort at once)\n")
        else:
            # Not imported here (a handler must not wait for the import lock): a command
            # that never loaded the transports has no steps in flight to kill.
            transport = sys.modules.get("switchover.transport.base")
            if transport is not None:
                transport.abort_running()
            os.write(2, b"\n[switchover] aborting now: steps in flight are killed\n")
        raise KeyboardInterrupt


def _fail(obj: Ctx, command: str, error: SwitchoverError | str, code: int) -> NoReturn:
    message = obj.redact(str(error))
    hint = error.hint if isinstance(error, SwitchoverError) else None
    hint = obj.redact(hint) if hint else hint
    if obj.json:
        click.echo(_json({"command": command, "status": "error", "exit_code": code,
                          "error": message, "hint": hint}))
    if obj.out is not None:  # also into the run's log, and say where that is
        obj.out.error(message, hint)
        sys.exit(code)
    from switchover.output import Reporter

    Reporter(command).error(message, hint)
    sys.exit(code)


def _json(doc: Any) -> str:
    import json

    return json.dumps(doc, indent=2, default=str)


def run_command(command: str, fn: Callable[[Ctx], int]) -> Callable[..., None]:
    """Wrap a command body: map domain errors to exit codes, Ctrl-C to 130."""

    def wrapper(obj: Ctx) -> None:
        import signal  # ~10 ms (its enums): not for --help and --version

        interrupts = _Interrupts()
        signal.signal(signal.SIGTERM, interrupts)
        signal.signal(signal.SIGINT, interrupts)
        try:
            try:
                code = fn(obj)
            except SwitchoverError as e:
                if obj.verbose > 1:
                    import traceback

                    sys.stderr.write(obj.redact(traceback.format_exc()))
                _fail(obj, command, e, int(e.code))
            except KeyboardInterrupt:
                if interrupts.count > 1:
                    _fail(obj, command, "aborted: the steps in flight were killed; every host "
                          "is on a complete release, but not necessarily the same one: check "
                          "with `switchover status`", int(ExitCode.INTERRUPTED))
                _fail(obj, command, "interrupted", int(ExitCode.INTERRUPTED))
            sys.exit(code)
        finally:
            if obj.out is not None:
                obj.out.close()  # stop the live display, close the log file
            # At exit, spare the interpreter's last garbage collection, which would walk
            # every object the imports made (rich, click, msgspec) only to find them
            # alive: ~40-50 ms off every command's exit. Frozen at exit only, so code that
            # runs commands in-process (tests, a wrapper) frees its garbage as usual. Cyclic
            # garbage left at exit is not finalized; nothing relies on that (what a command
            # writes is closed above or by its own `with` blocks).
            import atexit
            import gc

            atexit.unregister(gc.freeze)  # once, however many commands ran
            atexit.register(gc.freeze)

    return wrapper


@click.group(epilog=EXIT_CODE_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", metavar="FILE",
              help="Config file (default: $SWITCHOVER_CONFIG or ./switchover.toml).")
@click.option("--json", "json_mode", is_flag=True,
              help="Print exactly one JSON document on stdout; progress goes to stderr.")
@click.option("-v", "--verbose", count=True, help="More detail (-vv: tracebacks on errors).")
@click.version_option(__version__, prog_name="switchover")
@click.pass_context
def main(ctx: click.Context, config: str | None, json_mode: bool, verbose: int) -> None:
    """Atomic, reversible releases: upload, switch, health-check, roll back."""
    ctx.obj = Ctx(config, json_mode, verbose)


pass_ctx = click.make_pass_decorator(Ctx)


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    obj = ctx.find_object(Ctx)
    assert obj is not None and param.name is not None
    if param.name in ("hosts", "hosts_from"):
        setattr(obj, param.name, value)
    else:
        obj.overrides[param.name] = value
    return value


def host_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--host / --hosts-from / --parallel for every command that works on an environment."""
    for decorator in reversed((
        click.option("--host", "hosts", multiple=True, metavar="NAME", expose_value=False,
                     callback=_store, help="Only this host (repeatable)."),
        click.option("--hosts-from", metavar="FILE", expose_value=False, callback=_store,
                     help="Use the hosts listed in FILE (one per line) instead."),
        click.option("--parallel", type=click.IntRange(min=1), expose_value=False,
                     callback=_store, help="Hosts worked on at once (default: config, 10)."),
    )):
        f = decorator(f)
    return f


def fleet_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How a deploy moves through the fleet; each overrides the environment's setting."""
    for decorator in reversed((
        click.option("--strategy", type=click.Choice(["all", "rolling", "canary"]),
                     expose_value=False, callback=_store, help="all, rolling or canary."),
        click.option("--batch-size", expose_value=False, callback=_batch_size,
                     metavar="N|P%", help="Hosts per rolling batch, or a percentage."),
        click.option("--canary-hosts", expose_value=False, callback=_canary_hosts,
                     metavar="N|HOST,...", help="How many canary hosts, or which."),
        click.option("--canary-wait", type=click.FloatRange(min=0), expose_value=False,
                     callback=_store, metavar="SECONDS", help="Watch the canary this long."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                     expose_value=False, callback=_store, metavar="SECONDS",
                     help="Per-step timeout on each host."),
    )):
        f = decorator(f)
    return f


def _batch_size(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from switchover.config import check_batch_size

    parsed: int | str = int(value) if value.isdigit() else value
    try:
        check_batch_size(parsed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return _store(ctx, param, parsed)


def _canary_hosts(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    parsed: int | list[str] = int(value) if value.isdigit() else [
        v.strip() for v in value.split(",") if v.strip()]
    from switchover.config import check_canary_hosts

    try:
        check_canary_hosts(parsed)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return _store(ctx, param, parsed)


def _artifact_path(obj: Ctx, env: Environment, explicit: str | None) -> tuple[Path, bool]:
    """The artifact to deploy, and whether the configured build should run first."""
    if explicit:
        return Path(explicit), False
    if not env.artifact.path:
        raise UsageError("no artifact: pass --artifact PATH or set [artifact] path in "
                         f"{obj.config}")
    base = obj.config.resolve().parent
    p = Path(env.artifact.path).expanduser()
    return (p if p.is_absolute() else base / p), True


@main.command(epilog=EXIT_CODE_HELP)
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@click.option("--artifact", metavar="PATH", help="Directory or tarball (overrides the config).")
@click.option("--check", "checks", multiple=True, metavar="CMD",
              help="Extra health-check command run on each host (repeatable).")
@click.option("--url", "urls", multiple=True, metavar="URL",
              help="Extra health-check URL fetched from here; {host} is replaced (repeatable).")
@click.option("--message", "-m", default="", help="A note recorded in the history.")
@click.option("--dry-run", is_flag=True,
              help="Read the hosts and print the plan; change nothing (no lock, no history).")
@fleet_options
@pass_ctx
def deploy(obj: Ctx, environment: str, artifact: str | None, checks: tuple[str, ...],
           urls: tuple[str, ...], message: str, dry_run: bool) -> None:
    """Upload a release to every host, switch to it, check it; roll back if it fails."""

    def body(obj: Ctx) -> int:
        from switchover.secrets import load_secrets

        env = obj.env(environment)
        secrets = load_secrets(env, strict=True)  # a missing from_env name: exit 2, here
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise UsageError(f"--url {url!r} is not an http:// or https:// URL")
        source, build = _artifact_path(obj, env, artifact)
        if dry_run:
            from switchover import plan

            out = obj.reporter("deploy", env)
            return plan.dry_run(env, obj.host_ops(env), out, source, checks=checks, urls=urls,
                                build=env.artifact.build if build else None, json_mode=obj.json)
        if build and env.artifact.build:
            from switchover.artifact import run_build

            out = obj.reporter("deploy", env)
            out.step("local", f"building: {env.artifact.build}")
            run_build(env.artifact.build, obj.config.resolve().parent)
        from switchover.session import host_specs, transports
        from switchover.strategy import plan_batches

        # A bad strategy (an unknown canary host) is a usage error before any host is
        # touched: checked here too, as the first wave connects before the Deployer runs.
        plan_batches(env.strategy, [h.name for h in host_specs(env)], env.batch_size,
                     env.canary_hosts)
        made = transports(env)
        try:
            # The first wave of hosts connects while the host code, the reporter and the
            # deploy code load and the artifact is scanned (or unpacked): the handshakes run
            # in ssh processes, on a core this process is not using.
            for t in made[:env.parallel]:
                t.open_early()
            hosts = obj.host_ops(env, made)
            out = obj.out or obj.reporter("deploy", env)
            obj.attach(hosts, out)
            from switchover.artifact import prepare
            from switchover.deploy import Deployer

            art = prepare(source, env.artifact.exclude)
            try:
                report = Deployer(env, hosts, out, obj.run_context(env),
                                  artifact=art, checks=checks, urls=urls, message=message,
                                  secrets=secrets).run()
            finally:
                art.cleanup()
        finally:
            # Deployer.run closes the hosts (and their heartbeats); this ends the logins
            # started early, whichever way out came before it.
            for t in made:
                with contextlib.suppress(Exception):
                    t.close()
        if env.notify.webhooks:  # notify (and urllib) is only loaded to send something
            from switchover import notify

            notify.notify(env, notify.deploy_notice(report, obj.run_context(env)), out)
        if obj.json:
            out.emit_json(report.to_json())
        elif len(report.hosts) > 1 or report.exit_code != 0:
            out.print(_deploy_table(report))
        out.result_line(f"{env.name}: {report.message} ({report.seconds:.1f} s)",
                        ok=report.exit_code == 0)
        return report.exit_code

    run_command("deploy", body)(obj)


_RESULT_STYLE = {"succeeded": "green", "rolled_back": "yellow", "unchanged": "dim",
                 "failed": "red", "rollback_failed": "bold red"}


def _deploy_table(report: DeployReport) -> Table:
    """The per-host summary after a deploy: host, result, release live now, time."""
    from rich.markup import escape
    from rich.table import Table

    t = Table("host", "result", "release", "time", "error")
    for h in report.hosts:
        live = report.release if h.status == "succeeded" else h.previous
        style = _RESULT_STYLE.get(h.status, "")
        t.add_row(h.name, f"[{style}]{h.status}[/]" if style else h.status, live or "(none)",
                  f"{h.seconds:.1f} s", escape(h.error.message) if h.error else "")
    return t


@main.command(epilog=EXIT_CODE_HELP)
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@click.option("--to", "to", metavar="RELEASE", help="Roll back to this release instead.")
@pass_ctx
def rollback(obj: Ctx, environment: str, to: str | None) -> None:
    """Switch back to the last known-good release before the live one."""

    def body(obj: Ctx) -> int:
        from switchover import manage

        env = obj.env(environment)
        out = obj.reporter("rollback", env)
        t0 = time.monotonic()
        result = manage.rollback(env, obj.host_ops(env), obj.run_context(env), out, to)
        switched = result.exit_code in (ExitCode.OK, ExitCode.ROLLBACK_FAILED)
        if switched and env.notify.webhooks:
            from switchover import notify

            notify.notify(env, notify.rollback_notice(result.doc, obj.run_context(env),
                                                      time.monotonic() - t0), out)
        return _finish(obj, out, result, _rollback_line)

    run_command("rollback", body)(obj)


def _rollback_line(result: CommandResult) -> str:
    rows = result.doc["hosts"]
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) == len(rows):
        targets = sorted({r["release"] for r in ok})
        return f"rolled back to {', '.join(targets)} on {len(ok)} host(s)"
    return "; ".join(f"{r['host']}: {r['error']}" for r in rows if r["status"] != "ok")


def _finish(obj: Ctx, out: Reporter, result: CommandResult,
            line: Callable[[CommandResult], str] | None = None) -> int:
    if obj.json:
        out.emit_json(result.doc)
    if line is not None:
        out.result_line(line(result), ok=result.exit_code == 0)
    return result.exit_code


@main.command()
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@pass_ctx
def status(obj: Ctx, environment: str) -> None:
    """Per host: live release, rollback target, lock holder, reachability."""

    def body(obj: Ctx) -> int:
        from rich.markup import escape
        from rich.table import Table

        from switchover import manage

        env = obj.env(environment)
        out = obj.reporter("status")
        result = manage.status(env, obj.host_ops(env))
        if not obj.json:
            t = Table("host", "current", "previous", "lock", "releases",
                      title=f"{env.app} / {env.name}", title_justify="left")
            for r in result.doc["hosts"]:
                if not r["reachable"]:
                    t.add_row(r["host"], f"[red]unreachable: {escape(r['error'] or '')}[/]",
                              "", "", "")
                    continue
                lock = "no"
                if r["locked"]:
                    from switchover.hostops import describe_owner

                    lock = f"[yellow]held by {escape(describe_owner(r['lock_owner']))}[/]"
                    if r.get("lock_stale"):
                        lock += f" [red](stale: {escape(r['lock_stale'])})[/]"
                current = r["current"] or (r["current_target"] and
                                           f"-> {r['current_target']}") or "(none)"
                t.add_row(r["host"], current, r["previous"] or "(none)", lock,
                          str(r["releases"]))
            out.print(t)
            if result.doc["drift"]:
                out.warn("hosts are on different releases (drift)")
            for r in result.doc["hosts"]:
                last = r.get("last_deploy") or {}
                if last.get("state") == "interrupted":
                    out.warn(f"{r['host']}: the last deploy (release {last.get('release')}, by "
                             f"{last.get('user')}@{last.get('origin')} at {last.get('time')}) "
                             "was interrupted before it ended")
        return _finish(obj, out, result)

    run_command("status", body)(obj)


@main.command()
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@pass_ctx
def releases(obj: Ctx, environment: str) -> None:
    """Per host: every release and its state (live, previous, available, failed)."""

    def body(obj: Ctx) -> int:
        from rich.table import Table

        from switchover import manage

        env = obj.env(environment)
        out = obj.reporter("releases")
        result = manage.releases(env, obj.host_ops(env))
        if not obj.json:
            styles = {"live": "bold green", "previous": "cyan", "failed": "red"}
            for h in result.doc["hosts"]:
                t = Table("release", "state", title=h["host"], title_justify="left")
                if h["error"]:
                    out.bad(h["host"], h["error"])
                for r in h["releases"]:
                    st = r["state"]
                    t.add_row(r["id"], f"[{styles.get(st, '')}]{st}[/]" if st in styles else st)
                out.print(t)
            if result.doc["drift"]:
                out.warn("hosts are on different releases (drift)")
        return _finish(obj, out, result)

    run_command("releases", body)(obj)


@main.command()
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Only the last N entries.")
@click.option("--since", metavar="WHEN",
              help="Only entries since WHEN: an ISO date/time (local unless it says Z) or an "
                   "age like 30m, 2h, 3d, 1w.")
@pass_ctx
def history(obj: Ctx, environment: str, limit: int | None, since: str | None) -> None:
    """The audit trail of every host, oldest first."""

    def body(obj: Ctx) -> int:
        from switchover import histview, manage

        env = obj.env(environment)
        after = histview.parse_since(since) if since else None  # bad value: exit 2, first
        out = obj.reporter("history")
        result = manage.history(env, obj.host_ops(env))
        everything = result.doc
        shown = histview.since_filter(everything, after) if after else everything
        if limit is not None:
            shown = shown[-limit:] if limit > 0 else []
        result.doc = shown
        for line in result.lines:
            out.warn(line)
        if not obj.json:
            out.print(histview.table(shown, everything))
        return _finish(obj, out, result)

    run_command("history", body)(obj)


@main.command()
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@click.option("--keep", type=int, default=None, help="Healthy releases to keep (default: config).")
@pass_ctx
def cleanup(obj: Ctx, environment: str, keep: int | None) -> None:
    """Remove old and failed releases (never the live one or the rollback target)."""

    def body(obj: Ctx) -> int:
        from switchover import manage

        env = obj.env(environment)
        out = obj.reporter("cleanup", env)
        result = manage.cleanup(env, obj.host_ops(env), obj.run_context(env), out, keep)
        return _finish(obj, out, result)

    run_command("cleanup", body)(obj)


@main.command()
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@pass_ctx
def unlock(obj: Ctx, environment: str) -> None:
    """Remove a lock left by a deploy that died (says who held it)."""

    def body(obj: Ctx) -> int:
        from switchover import manage

        env = obj.env(environment)
        out = obj.reporter("unlock", env)
        result = manage.unlock(env, obj.host_ops(env), obj.run_context(env), out)
        return _finish(obj, out, result)

    run_command("unlock", body)(obj)


@main.command()
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@pass_ctx
def setup(obj: Ctx, environment: str) -> None:
    """Create the layout on each host and check prerequisites (rsync, writable)."""

    def body(obj: Ctx) -> int:
        from switchover import manage

        env = obj.env(environment)
        out = obj.reporter("setup", env)
        return _finish(obj, out, manage.setup(env, obj.host_ops(env), out))

    run_command("setup", body)(obj)


@main.command()
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@pass_ctx
def verify(obj: Ctx, environment: str) -> None:
    """Check the live release on each host against its manifest: added, missing, modified
    files (drift or tampering) exit 1."""

    def body(obj: Ctx) -> int:
        from switchover.verify import verify as verify_hosts

        env = obj.env(environment)
        out = obj.reporter("verify")
        result = verify_hosts(env, obj.host_ops(env), out)
        return _finish(obj, out, result)

    run_command("verify", body)(obj)


__all__ = ["ExitCode", "main"]

# diff, init and completion live in opcli.py: importing it registers them on `main`.
from switchover import opcli as _opcli  # noqa: E402, F401
