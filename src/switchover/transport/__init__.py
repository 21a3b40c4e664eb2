"""Where commands run: this machine (`LocalTransport`) or a host over SSH (`SshTransport`)."""

from switchover.transport.base import Result, SyncStats, Transport
from switchover.transport.local import LocalTransport
from switchover.transport.ssh import SshOptions, SshTransport

__all__ = ["LocalTransport", "Result", "SshOptions", "SshTransport", "SyncStats", "Transport"]
