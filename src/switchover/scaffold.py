"""`switchover init`: a commented switchover.toml for a project, and shell completion help.

The defaults written come from the config models themselves, so the file never disagrees
with what switchover would do without it. The text is checked with the real loader before
it is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from switchover.config import (
    FileConfig,
    HealthConfig,
    NotifyConfig,
    config_path_from,
    default,
    load_file,
    resolve_environment,
)
from switchover.errors import ConfigError, UsageError
from switchover.hosts import parse_host

ARTIFACT_GUESSES = ("dist", "build", "public", "out", "site", "_site")


def default_app(directory: Path) -> str:
    """The directory's name, made into a valid app name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", directory.resolve().name)
    name = name.lstrip("-_.")[:64].rstrip("-_.")
    return name or "app"


def default_artifact(directory: Path) -> str:
    for guess in ARTIFACT_GUESSES:
        if (directory / guess).is_dir():
            return guess
    return "build"


def default_deploy_to(app: str, remote: bool) -> str:
    return f"/srv/{app}" if remote else f"./.deploy/{app}"


def _toml(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes).
    return json.dumps(value)


def render(app: str, hosts: Sequence[str], deploy_to: str, artifact: str) -> str:
    """The commented config text."""
    remote = bool(hosts)
    env_name = "production" if remote else "local"
    health = HealthConfig()
    lines = [
        f"# switchover configuration for {app!r}, written by `switchover init`.",
        "# Check it:  switchover deploy " + env_name + " --dry-run",
        "# Every key but `app` and each environment's `deploy_to` is optional; the values",
        "# commented out below are the defaults.",
        "",
        f"app = {_toml(app)}                 # letters, digits, . _ -",
        f"# keep_releases = {default(FileConfig, 'keep_releases')}"
        "          # healthy releases kept per host; failed ones don't count",
        f"# parallel = {default(FileConfig, 'parallel')}"
        "               # hosts worked on at once",
        f"# timeout = {default(FileConfig, 'timeout'):g}"
        "                # seconds one step (upload, hook) may take on a host",
        "# log_dir = \"logs/switchover\"   # this machine's run logs"
        " (default: the user state dir)",
        "",
        "# What is uploaded into DEPLOY_TO/releases/<id>/: a directory or a tarball,",
        "# relative to this file.",
        "[artifact]",
        f"path = {_toml(artifact)}",
        "# build = \"make dist\"           # run here first (skipped with --artifact)",
        "exclude = [\".git\", \"*.log\"]     # rsync-style patterns",
        "",
        "# Kept in DEPLOY_TO/shared/ across releases and linked into each one.",
        "[shared]",
        "files = []                      # e.g. [\".env\"]: seeded from the first release",
        "dirs = []                       # e.g. [\"storage\", \"logs\"]",
        "",
        "# Run after the switch and the after_switch hooks; if they keep failing, every host",
        "# goes back to the release it ran before.",
        "[health]",
        "commands = []                   # on each host, cwd = the release,"
        " e.g. [\"curl -sf http://localhost:8080/health\"]",
        "urls = []                       # fetched from here; {host} is replaced,"
        " e.g. [\"http://{host}:8080/health\"]",
        f"# timeout = {health.timeout:g}                  # seconds per attempt",
        f"# retries = {health.retries}                   # attempts after the first failure",
        f"# interval = {health.interval:g}                # seconds between attempts",
        "",
        "# On each host, cwd = the release; a non-zero exit fails the deploy.",
        "[hooks]",
        "before_switch = []              # failure: nothing switched",
        f"after_switch = []               # e.g. [\"sudo systemctl reload {app}\"]",
        "after_rollback = []",
        "",
        "# A JSON POST (with a Slack-compatible \"text\") after every deploy and rollback.",
        "# A webhook that fails is a warning, never a failed deploy.",
        "[notify]",
        "webhooks = []                   # e.g. [\"https://hooks.slack.com/services/...\"]",
        f"# timeout = {NotifyConfig().timeout:g}                  # seconds per webhook",
        "",
        f"[environments.{env_name}]",
    ]
    if remote:
        lines += [
            "hosts = [" + ", ".join(_toml(h) for h in hosts) + "]"
            "   # user@host[:port] or an ssh_config alias",
            f"deploy_to = {_toml(deploy_to)}   # absolute; never / or a system directory",
            "# ssh_config = \"deploy/ssh_config\"        # relative to this file: ssh -F",
            "# identity_file = \"~/.ssh/deploy_ed25519\"",
        ]
    else:
        lines += [
            f"deploy_to = {_toml(deploy_to)}   # no hosts: on this machine, relative to this file",
            "",
            "# A fleet over SSH:",
            "# [environments.production]",
            "# hosts = [\"deploy@web1.example.com\", \"web2:2222\"]",
            f"# deploy_to = \"/srv/{app}\"",
        ]
    return "\n".join(lines) + "\n"


def check(text: str, path: Path, env_name: str) -> None:
    """Load the text exactly as `switchover` would; ConfigError if it does not."""
    fd, tmp = tempfile.mkstemp(prefix=".switchover-init-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        cfg = load_file(Path(tmp))
        resolve_environment(cfg, env_name, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write(path: Path, text: str, force: bool) -> None:
    """Write atomically; without `force` never replace an existing file (even one made
    a moment ago by someone else)."""
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint="pass --force to overwrite it")
    fd, tmp = tempfile.mkstemp(prefix=".switchover-init-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile
            except FileExistsError:
                raise UsageError(f"{path} already exists",
                                 hint="pass --force to overwrite it") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def init_config(path: Path, *, app: str | None, hosts: Sequence[str], deploy_to: str | None,
                artifact: str | None, force: bool, interactive: bool) -> dict[str, Any]:
    """Work out the values (asking when interactive), check and write the file."""
    directory = path.resolve().parent
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint="pass --force to overwrite it")
    if interactive:
        if app is None:
            app = click.prompt("app name", default=default_app(directory), err=True)
        if not hosts:
            answer = click.prompt("hosts (user@host[:port], comma-separated; empty: deploy "
                                  "on this machine)", default="", show_default=False, err=True)
            hosts = [h.strip() for h in answer.split(",") if h.strip()]
        if deploy_to is None:
            deploy_to = click.prompt("deploy_to", err=True,
                                     default=default_deploy_to(app, bool(hosts)))
        if artifact is None:
            artifact = click.prompt("artifact (build output: a directory or a tarball)",
                                    default=default_artifact(directory), err=True)
    app = app if app is not None else default_app(directory)
    deploy_to = deploy_to if deploy_to is not None else default_deploy_to(app, bool(hosts))
    artifact = artifact if artifact is not None else default_artifact(directory)
    for h in hosts:
        try:
            parse_host(h)
        except ValueError as e:
            raise UsageError(f"--host: {e}") from None
    text = render(app, hosts, deploy_to, artifact)
    env_name = "production" if hosts else "local"
    try:
        check(text, path, env_name)
    except ConfigError as e:
        # Name the option, not a temporary file's key path.
        raise UsageError(f"these values do not make a valid config: {e.message}") from None
    write(path, text, force)
    return {"command": "init", "status": "ok", "path": str(path), "app": app,
            "environment": env_name, "hosts": list(hosts), "deploy_to": deploy_to,
            "artifact": artifact}


def complete_environment(ctx: click.Context, param: click.Parameter,
                         incomplete: str) -> list[str]:
    """Shell completion for ENV: the environments of the config in use."""
    root = ctx.find_root()
    try:
        cfg = load_file(config_path_from(root.params.get("config")))
    except Exception:
        return []  # completion must never print an error into the shell
    return [name for name in sorted(cfg.environments) if name.startswith(incomplete)]


COMPLETION_HINT = {
    "bash": 'eval "$(switchover completion bash)"   # in ~/.bashrc',
    "zsh": 'eval "$(switchover completion zsh)"    # in ~/.zshrc',
    "fish": "switchover completion fish > ~/.config/fish/completions/switchover.fish",
}


def completion_script(cli: click.Command, shell: str) -> str:
    """click's own completion script for `shell`, headed by how to install it."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None:
        raise UsageError(f"no completion for {shell!r}: bash, zsh or fish")
    source = cls(cli, {}, "switchover", "_SWITCHOVER_COMPLETE").source()
    return f"# switchover completion for {shell}; install with:\n#   {COMPLETION_HINT[shell]}\n" \
        + source
