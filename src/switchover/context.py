"""Who is running this, from where: stamped on the lock and on every history entry."""

from __future__ import annotations

import getpass
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from switchover.releases import utc_now_iso


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


@dataclass(frozen=True)
class RunContext:
    app: str
    env: str
    user: str = field(default_factory=_user)
    origin: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    deploy_id: str = field(default_factory=lambda: secrets.token_hex(6))

    def owner(self, command: str) -> dict[str, Any]:
        """The lock's owner.json: who, from where, which process, since when."""
        return {
            "user": self.user,
            "origin": self.origin,
            "pid": self.pid,
            "time": utc_now_iso(),
            "deploy_id": self.deploy_id,
            "command": command,
        }

    def entry(self, event: str, host: str, *, release: str | None, previous: str | None,
              message: str = "", **extra: Any) -> dict[str, Any]:
        """One history line. `host` is the target host; `origin` where the deploy ran."""
        e: dict[str, Any] = {
            "time": utc_now_iso(),
            "event": event,
            "app": self.app,
            "env": self.env,
            "host": host,
            "release": release,
            "previous": previous,
            "user": self.user,
            "origin": self.origin,
            "deploy_id": self.deploy_id,
            "message": message,
        }
        e.update({k: v for k, v in extra.items() if v is not None})
        return e
