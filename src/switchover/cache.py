"""Where switchover keeps its local caches (file hashes, manifests of uploaded releases).

`SWITCHOVER_CACHE_DIR` wins, then the platform's cache directory (`~/.cache/switchover`
on Linux). Everything in it can be deleted at any time: a cache miss only costs time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """The directory for one kind of cache (not created here)."""
    explicit = os.environ.get("SWITCHOVER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser() / kind
    import platformdirs  # only when it is needed: start-up time counts for every command

    return Path(platformdirs.user_cache_dir("switchover")) / kind


def write_private(path: Path, data: bytes) -> None:
    """Write a cache file atomically (tmp + rename), readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
