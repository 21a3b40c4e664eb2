"""The `switchover` command line. The only module that prints errors and exits."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.markup import escape
from rich.table import Table

from switchover import __version__, manage
from switchover.artifact import prepare, run_build
from switchover.config import Environment, config_path_from, load_environment
from switchover.context import RunContext
from switchover.deploy import Deployer
from switchover.errors import EXIT_CODE_HELP, ExitCode, SwitchoverError, UsageError
from switchover.output import Reporter
from switchover.session import open_hosts


class Ctx:
    def __init__(self, config: str | None, json_mode: bool, verbose: int) -> None:
        self.config = config_path_from(config)
        self.json = json_mode
        self.verbose = verbose

    def env(self, name: str) -> Environment:
        return load_environment(self.config, name)

    def reporter(self, command: str) -> Reporter:
        return Reporter(command, json_mode=self.json, verbose=self.verbose)


def _raise_interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def _fail(obj: Ctx, command: str, error: SwitchoverError | str, code: int) -> NoReturn:
    message = str(error)
    hint = error.hint if isinstance(error, SwitchoverError) else None
    if obj.json:
        click.echo(_json({"command": command, "status": "error", "exit_code": code,
                          "error": message, "hint": hint}))
    err = Reporter(command).err
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if hint:
        err.print(f"hint: {escape(hint)}", highlight=False)
    sys.exit(code)


def _json(doc: Any) -> str:
    import json

    return json.dumps(doc, indent=2, default=str)


def run_command(command: str, fn: Callable[[Ctx], int]) -> Callable[..., None]:
    """Wrap a command body: map domain errors to exit codes, Ctrl-C to 130."""

    def wrapper(obj: Ctx) -> None:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            code = fn(obj)
        except SwitchoverError as e:
            if obj.verbose > 1:
                traceback.print_exc()
            _fail(obj, command, e, int(e.code))
        except KeyboardInterrupt:
            _fail(obj, command, "interrupted", 130)
        sys.exit(code)

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
@click.argument("environment")
@click.option("--artifact", metavar="PATH", help="Directory or tarball (overrides the config).")
@click.option("--check", "checks", multiple=True, metavar="CMD",
              help="Extra health-check command run on each host (repeatable).")
@click.option("--url", "urls", multiple=True, metavar="URL",
              help="Extra health-check URL fetched from here; {host} is replaced (repeatable).")
@click.option("--message", "-m", default="", help="A note recorded in the history.")
@pass_ctx
def deploy(obj: Ctx, environment: str, artifact: str | None, checks: tuple[str, ...],
           urls: tuple[str, ...], message: str) -> None:
    """Upload a release to every host, switch to it, check it; roll back if it fails."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise UsageError(f"--url {url!r} is not an http:// or https:// URL")
        out = obj.reporter("deploy")
        source, build = _artifact_path(obj, env, artifact)
        if build and env.artifact.build:
            out.step("local", f"building: {env.artifact.build}")
            run_build(env.artifact.build, obj.config.resolve().parent)
        art = prepare(source, env.artifact.exclude)
        try:
            report = Deployer(env, open_hosts(env), out, RunContext(env.app, env.name),
                              artifact=art, checks=checks, urls=urls, message=message).run()
        finally:
            art.cleanup()
        if obj.json:
            out.emit_json(report.to_json())
        out.result_line(f"{env.name}: {report.message} ({report.seconds:.1f} s)",
                        ok=report.exit_code == 0)
        return report.exit_code

    run_command("deploy", body)(obj)


@main.command(epilog=EXIT_CODE_HELP)
@click.argument("environment")
@click.option("--to", "to", metavar="RELEASE", help="Roll back to this release instead.")
@pass_ctx
def rollback(obj: Ctx, environment: str, to: str | None) -> None:
    """Switch back to the last known-good release before the live one."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        out = obj.reporter("rollback")
        result = manage.rollback(env, open_hosts(env), RunContext(env.app, env.name), out, to)
        return _finish(obj, out, result, _rollback_line)

    run_command("rollback", body)(obj)


def _rollback_line(result: manage.CommandResult) -> str:
    rows = result.doc["hosts"]
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) == len(rows):
        targets = sorted({r["release"] for r in ok})
        return f"rolled back to {', '.join(targets)} on {len(ok)} host(s)"
    return "; ".join(f"{r['host']}: {r['error']}" for r in rows if r["status"] != "ok")


def _finish(obj: Ctx, out: Reporter, result: manage.CommandResult,
            line: Callable[[manage.CommandResult], str] | None = None) -> int:
    if obj.json:
        out.emit_json(result.doc)
    if line is not None:
        out.result_line(line(result), ok=result.exit_code == 0)
    return result.exit_code


@main.command()
@click.argument("environment")
@pass_ctx
def status(obj: Ctx, environment: str) -> None:
    """Per host: live release, rollback target, lock holder, reachability."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        out = obj.reporter("status")
        result = manage.status(env, open_hosts(env))
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
                current = r["current"] or (r["current_target"] and
                                           f"-> {r['current_target']}") or "(none)"
                t.add_row(r["host"], current, r["previous"] or "(none)", lock,
                          str(r["releases"]))
            out.print(t)
            if result.doc["drift"]:
                out.warn("hosts are on different releases (drift)")
        return _finish(obj, out, result)

    run_command("status", body)(obj)


@main.command()
@click.argument("environment")
@pass_ctx
def releases(obj: Ctx, environment: str) -> None:
    """Per host: every release and its state (live, previous, available, failed)."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        out = obj.reporter("releases")
        result = manage.releases(env, open_hosts(env))
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
        return _finish(obj, out, result)

    run_command("releases", body)(obj)


@main.command()
@click.argument("environment")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Only the last N entries.")
@pass_ctx
def history(obj: Ctx, environment: str, limit: int | None) -> None:
    """The audit trail of every host, oldest first."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        out = obj.reporter("history")
        result = manage.history(env, open_hosts(env), limit)
        for line in result.lines:
            out.warn(line)
        if not obj.json:
            t = Table("time", "host", "event", "release", "previous", "user", "message")
            for e in result.doc:
                event = e.get("event", "?") + (" (interrupted)" if e.get("interrupted") else "")
                t.add_row(*(escape(str(x or "")) for x in (
                    e.get("time"), e.get("host"), event, e.get("release"), e.get("previous"),
                    e.get("user"), e.get("message"))))
            out.print(t)
        return _finish(obj, out, result)

    run_command("history", body)(obj)


@main.command()
@click.argument("environment")
@click.option("--keep", type=int, default=None, help="Healthy releases to keep (default: config).")
@pass_ctx
def cleanup(obj: Ctx, environment: str, keep: int | None) -> None:
    """Remove old and failed releases (never the live one or the rollback target)."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        out = obj.reporter("cleanup")
        result = manage.cleanup(env, open_hosts(env), RunContext(env.app, env.name), out, keep)
        return _finish(obj, out, result)

    run_command("cleanup", body)(obj)


@main.command()
@click.argument("environment")
@pass_ctx
def unlock(obj: Ctx, environment: str) -> None:
    """Remove a lock left by a deploy that died (says who held it)."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        out = obj.reporter("unlock")
        result = manage.unlock(env, open_hosts(env), RunContext(env.app, env.name), out)
        return _finish(obj, out, result)

    run_command("unlock", body)(obj)


@main.command()
@click.argument("environment")
@pass_ctx
def setup(obj: Ctx, environment: str) -> None:
    """Create the layout on each host and check prerequisites (rsync, writable)."""

    def body(obj: Ctx) -> int:
        env = obj.env(environment)
        out = obj.reporter("setup")
        return _finish(obj, out, manage.setup(env, open_hosts(env), out))

    run_command("setup", body)(obj)


__all__ = ["ExitCode", "main"]
