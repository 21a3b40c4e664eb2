"""Build the per-host handles for an environment: local or SSH, same operations above."""

from __future__ import annotations

from switchover.config import Environment
from switchover.hostops import HostOps
from switchover.hosts import LOCAL
from switchover.layout import Layout
from switchover.transport import LocalTransport, SshOptions, SshTransport


def open_hosts(env: Environment) -> list[HostOps]:
    layout = Layout(env.deploy_to)
    if env.is_local:
        return [HostOps(LOCAL, LocalTransport(), layout, env.timeout)]
    options = SshOptions(ssh_config=env.ssh_config, identity_file=env.identity_file)
    return [HostOps(h, SshTransport(h, options), layout, env.timeout) for h in env.hosts]


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
