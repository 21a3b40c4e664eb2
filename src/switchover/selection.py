"""Narrow or replace an environment's hosts from the command line (--host, --hosts-from)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from switchover.config import Environment
from switchover.errors import UsageError
from switchover.hosts import HostSpec
from switchover.inventory import InventoryError, load_host_list


def _matches(spec: HostSpec, name: str) -> bool:
    return name in (spec.name, spec.host, spec.destination, spec.label)


def select_hosts(env: Environment, names: Sequence[str], hosts_from: str | None) -> Environment:
    """--hosts-from replaces the host list; --host keeps only the hosts named."""
    hosts = list(env.hosts)
    if hosts_from:
        try:
            hosts = load_host_list(Path(hosts_from))
        except InventoryError as e:
            raise UsageError(str(e)) from None
        if not hosts:
            raise UsageError(f"{hosts_from}: no hosts listed")
        if env.is_local:
            raise UsageError(f"environment {env.name!r} is local (no hosts); --hosts-from "
                             "needs an environment with an absolute deploy_to on remote hosts")
    if names:
        if env.is_local and not hosts:
            if set(names) - {"localhost"}:
                raise UsageError(f"environment {env.name!r} is local: the only host is localhost")
            return env
        unknown = [n for n in names if not any(_matches(h, n) for h in hosts)]
        if unknown:
            known = ", ".join(h.name for h in hosts)
            raise UsageError(f"--host {', '.join(unknown)}: not in environment {env.name!r} "
                             f"(hosts: {known})")
        hosts = [h for h in hosts if any(_matches(h, n) for n in names)]
    return env.replace(hosts=hosts)


def override(env: Environment, **values: Any) -> Environment:
    """Command-line flags win over the config; None means "not given"."""
    given = {k: v for k, v in values.items() if v is not None}
    return env.replace(**given) if given else env
