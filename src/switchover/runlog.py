"""Where each run's log file goes, and starting it.

`SWITCHOVER_LOG_DIR` wins, then `log_dir` in the config, then the platform's state
directory (`~/.local/state/switchover/logs` on Linux). The file holds the full -vv trace.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from switchover import __version__

if TYPE_CHECKING:
    from switchover.config import Environment
    from switchover.context import RunContext
    from switchover.output import Reporter


def log_dir(env: Environment | None) -> Path:
    explicit = os.environ.get("SWITCHOVER_LOG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if env is not None and env.log_dir is not None:
        return env.log_dir
    import platformdirs  # only when neither of the above says where: start-up time counts

    return Path(platformdirs.user_state_dir("switchover")) / "logs"


def start(out: Reporter, env: Environment, ctx: RunContext) -> Path | None:
    """Open the run's log file and write who ran what; None if it could not be opened."""
    path = out.open_log(log_dir(env), f"{out.command}-{env.app}-{env.name}-{ctx.deploy_id}")
    if path is not None:
        argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
        out.note(f"switchover {__version__}: {out.command} {env.name} (app {env.app}) by "
                 f"{ctx.user}@{ctx.origin}, pid {ctx.pid}, run {ctx.deploy_id}; argv: {argv}")
        out.note(f"log file: {path}")
    return path


# Commands that act on hosts keep a log of each run; read-only views do not.
LOGGED = frozenset({"deploy", "rollback", "cleanup", "unlock", "setup"})
