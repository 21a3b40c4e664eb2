"""Domain errors and the exit codes they map to.

Only the CLI turns these into process exits; everything below it raises.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    DEPLOY_FAILED = 1  # a check or hook failed and the host was rolled back
    USAGE = 2  # bad config, arguments or artifact: nothing was changed
    UNREACHABLE = 3  # host unreachable or transfer failed before the switch
    LOCKED = 4  # another deploy holds the lock
    ROLLBACK_FAILED = 5  # a host needs attention
    INTERRUPTED = 130  # Ctrl-C or SIGTERM (the shell's convention for SIGINT)


# "\b" tells click to print the paragraph as it is instead of rewrapping it.
EXIT_CODE_HELP = """\
\b
Exit codes:
  0  success
  1  deploy failed (check or hook) and was rolled back; or nothing to roll back to
  2  usage or configuration error, bad artifact, missing key file: nothing changed
  3  a host was unreachable or a transfer failed before the switch: current unchanged
  4  the lock is held by another deploy
  5  a rollback failed: a host needs attention
"""


class SwitchoverError(Exception):
    """Base error: a message for the operator, an optional hint, and an exit code."""

    code: ExitCode = ExitCode.DEPLOY_FAILED

    def __init__(self, message: str, *, hint: str | None = None, host: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.host = host

    def __str__(self) -> str:
        prefix = f"{self.host}: " if self.host else ""
        return prefix + self.message


def as_error(error: BaseException, host: str | None = None,
             kind: type[SwitchoverError] = SwitchoverError) -> SwitchoverError:
    """Any exception as a SwitchoverError (message, exit code) naming `host` if it names
    none: ours as they are, anything else (a bug, an OSError) wrapped in `kind`."""
    err = error if isinstance(error, SwitchoverError) else kind(
        f"{type(error).__name__}: {error}", host=host)
    if err.host is None:
        err.host = host
    return err


class ConfigError(SwitchoverError):
    code = ExitCode.USAGE


class UsageError(SwitchoverError):
    code = ExitCode.USAGE


class ArtifactError(SwitchoverError):
    code = ExitCode.USAGE


class HostError(SwitchoverError):
    """The host could not be reached, or a step before the switch failed there."""

    code = ExitCode.UNREACHABLE


class TransferError(HostError):
    pass


class ConnectionLost(TransferError):
    """The link to the host dropped mid-step (ssh or rsync saw it go): worth a retry."""


class DiskFull(TransferError):
    """The host ran out of space during an upload."""


class LockedError(SwitchoverError):
    code = ExitCode.LOCKED


class DeployFailed(SwitchoverError):
    code = ExitCode.DEPLOY_FAILED


class RollbackFailed(SwitchoverError):
    code = ExitCode.ROLLBACK_FAILED


class Interrupted(SwitchoverError):
    """Ctrl-C or SIGTERM: the message says what state the hosts were left in."""

    code = ExitCode.INTERRUPTED
