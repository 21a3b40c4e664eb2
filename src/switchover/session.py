"""Build the per-host handles for an environment: local or SSH, same operations above."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from switchover.config import Environment
from switchover.hosts import LOCAL, HostSpec
from switchover.layout import Layout
from switchover.locks import LockPolicy
from switchover.secrets import redactor_for
from switchover.transport import LocalTransport, Result, SshOptions, SshTransport, Transport

if TYPE_CHECKING:  # these load after the first ssh connections are started (cli.deploy)
    from switchover.hostops import HostOps, SwitchStep
    from switchover.output import Reporter


def host_specs(env: Environment) -> list[HostSpec]:
    """The hosts a command works on: the environment's, or this machine for a local one."""
    return [LOCAL] if env.is_local else list(env.hosts)


def transports(env: Environment) -> list[Transport]:
    """A transport per host of `env`, in its order (one local one for a local environment).
    Made apart from open_hosts so that logins can start before the host code loads."""
    if env.is_local:
        return [LocalTransport()]
    # A host that accepts TCP but never answers must not hold the fleet longer than a step.
    connect = max(1, min(10, int(env.timeout)))
    options = SshOptions(ssh_config=env.ssh_config, identity_file=env.identity_file,
                         connect_timeout=connect)
    return [SshTransport(h, options) for h in env.hosts]


def open_hosts(env: Environment, redact: Callable[[str], str] | None = None,
               made: Sequence[Transport] | None = None) -> list[HostOps]:
    """One HostOps per host, over the transports `made` for it (made here if None).
    `redact` masks secret values (read from the config's secrets when not given: pass the
    one already made to read them once)."""
    from switchover.hostops import HostOps

    layout = Layout(env.deploy_to)
    hosts = [HostOps(spec, t, layout, env.timeout)
             for spec, t in zip(host_specs(env), made if made is not None else transports(env),
                                strict=True)]
    if redact is None:
        redact = redactor_for(env)
    locking = LockPolicy(timeout=env.lock_timeout, app=env.app, env=env.name)
    for h in hosts:
        h.redact = redact
        h.locking = locking
    return hosts


def hook_environment(env: Environment, host: str, release: str, release_path: str,
                     previous: str | None) -> dict[str, str]:
    return {
        "SWITCHOVER_APP": env.app,
        "SWITCHOVER_ENV": env.name,
        "SWITCHOVER_HOST": host,
        "SWITCHOVER_RELEASE": release,
        "SWITCHOVER_RELEASE_PATH": release_path,
        "SWITCHOVER_PREVIOUS_RELEASE": previous or "",
    }


def run_hooks(ops: HostOps, out: Reporter, stage: str, hooks: Sequence[str], release: str,
              env_vars: Mapping[str, str], timeout: float,
              before_each: Callable[[], None] | None = None) -> tuple[str, Result] | None:
    """Run hooks in order in the release dir; stop at the first that fails and return it
    with its result (the caller decides what a failure means at its stage)."""
    for hook in hooks:
        if before_each is not None:
            before_each()
        with out.activity(ops.name, f"{stage}: {hook}"):
            r = ops.run_in_release(release, hook, env_vars, timeout=timeout)
        out.detail(ops.name, r.stdout)
        if not r.ok:
            return hook, r
    return None


def report_step_hooks(ops: HostOps, out: Reporter, stage: str, hooks: Sequence[str],
                      step: SwitchStep) -> str | None:
    """Show what each hook of a detached switch step printed; return why one failed (None
    if none did)."""
    for i, hook in enumerate(hooks[: step.hooks_run]):
        out.step(ops.name, f"{stage}: {hook}")
        out.detail(ops.name, step.output(i))
    if step.failed_hook is None:
        return None
    return (f"{stage} hook failed (exit {step.rc}): {hooks[step.failed_hook]}: "
            f"{step.message}")
