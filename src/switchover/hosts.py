"""Host specs: `user@host[:port]`, `[v6addr]:port`, or an ssh_config alias."""

from __future__ import annotations

import re
from dataclasses import dataclass

_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,252})$")
_V6_RE = re.compile(r"^[0-9A-Fa-f:.]+$")


@dataclass(frozen=True)
class HostSpec:
    host: str
    user: str | None = None
    port: int | None = None
    label: str | None = None  # an inventory name, shown instead of the address

    @property
    def name(self) -> str:
        """How the host is shown to people and recorded in the history."""
        if self.label:
            return self.label
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{host}{port}"

    @property
    def destination(self) -> str:
        """The `[user@]host` argument for ssh and rsync."""
        return f"{self.user}@{self.host}" if self.user else self.host


LOCAL = HostSpec(host="localhost")


def parse_host(spec: str) -> HostSpec:
    """Parse and validate a host spec; raises ValueError with the reason."""
    s = spec.strip()
    if s != spec or not s:
        raise ValueError(f"host {spec!r} is empty or has surrounding spaces")
    user = None
    if "@" in s:
        user, s = s.split("@", 1)
        if not _USER_RE.fullmatch(user):
            raise ValueError(f"host {spec!r}: user {user!r} is not a valid user name")
    port: int | None = None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"host {spec!r}: unclosed '['")
        host, rest = s[1:end], s[end + 1 :]
        if not _V6_RE.fullmatch(host):
            raise ValueError(f"host {spec!r}: {host!r} is not an IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"host {spec!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], spec)
    else:
        host, sep, port_s = s.partition(":")
        if sep:
            port = _port(port_s, spec)
        if not _HOST_RE.fullmatch(host):
            raise ValueError(
                f"host {spec!r}: {host!r} is not a valid host name, address or ssh alias"
            )
    return HostSpec(host=host, user=user, port=port)


def _port(value: str, spec: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"host {spec!r}: port {value!r} is not a number from 1 to 65535")
    return int(value)
