"""Commands for the operator's comfort: `diff`, `init` and `completion`.

Registered on the `switchover` group by cli.py (which imports this module last).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from switchover.cli import (
    Ctx,
    _artifact_path,
    _complete_environment,
    _json,
    host_options,
    main,
    pass_ctx,
    run_command,
)
from switchover.errors import EXIT_CODE_HELP, ArtifactError

# plan, scaffold and artifact are imported by the commands that use them: this module is
# loaded on every start (see the end of cli.py).


@main.command(epilog=EXIT_CODE_HELP)
@click.argument("environment", shell_complete=_complete_environment)
@host_options
@click.option("--artifact", metavar="PATH", help="Directory or tarball (default: the config's).")
@click.option("--stat", "stat_only", is_flag=True, help="Only counts and bytes per host.")
@pass_ctx
def diff(obj: Ctx, environment: str, artifact: str | None, stat_only: bool) -> None:
    """Files the artifact would add, change or delete against each host's live release."""

    def body(obj: Ctx) -> int:
        from switchover import plan
        from switchover.artifact import prepare

        env = obj.env(environment)
        out = obj.reporter("diff")
        source, build = _artifact_path(obj, env, artifact)
        try:
            art = prepare(source, env.artifact.exclude)
        except ArtifactError as e:
            if build and env.artifact.build:
                e.hint = f"diff does not run the build: run `{env.artifact.build}` first"
            raise
        try:
            views = plan.read_hosts(env, obj.host_ops(env), art, out)
            doc, code = plan.diff_doc(env, views, art, paths=not stat_only)
        finally:
            art.cleanup()
        if obj.json:
            out.emit_json(doc)
        else:
            out.print(plan.render_diff(doc, stat_only, obj.verbose))
        return code

    run_command("diff", body)(obj)


@main.command()
@click.option("--app", metavar="NAME", help="App name (default: this directory's name).")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="user@host[:port] (repeatable). None: an environment on this machine.")
@click.option("--deploy-to", metavar="PATH",
              help="Where releases live (default: /srv/APP, or ./.deploy/APP locally).")
@click.option("--artifact", metavar="PATH", help="The build output to deploy (default: a guess).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@pass_ctx
def init(obj: Ctx, app: str | None, hosts: tuple[str, ...], deploy_to: str | None,
         artifact: str | None, force: bool) -> None:
    """Write a commented switchover.toml here (or at -c FILE); asks what is missing."""

    def body(obj: Ctx) -> int:
        from switchover import scaffold

        explicit = click.get_current_context().find_root().params.get("config")
        path = Path(explicit) if explicit else Path("switchover.toml")
        interactive = sys.stdin.isatty() and not obj.json
        doc = scaffold.init_config(path, app=app, hosts=hosts, deploy_to=deploy_to,
                                   artifact=artifact, force=force, interactive=interactive)
        if obj.json:
            click.echo(_json(doc))
        else:
            click.echo(f"wrote {path}: app {doc['app']}, environment {doc['environment']} "
                       f"-> {doc['deploy_to']}")
            click.echo(f"next: switchover deploy {doc['environment']} --dry-run")
        return 0

    run_command("init", body)(obj)


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(switchover completion bash)"."""
    from switchover import scaffold

    click.echo(scaffold.completion_script(main, shell), nl=False)
