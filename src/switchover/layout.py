"""Where things live under deploy_to on a host."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    deploy_to: str

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.deploy_to, *parts)

    @property
    def releases(self) -> str:
        return self._join("releases")

    @property
    def shared(self) -> str:
        return self._join("shared")

    @property
    def current(self) -> str:
        return self._join("current")

    @property
    def meta(self) -> str:
        return self._join(".switchover")

    @property
    def history(self) -> str:
        return self._join(".switchover", "history.jsonl")

    @property
    def lock(self) -> str:
        return self._join(".switchover", "lock")

    @property
    def lock_owner(self) -> str:
        return self._join(".switchover", "lock", "owner.json")

    @property
    def staging_root(self) -> str:
        return self._join(".switchover", "staging")

    @property
    def switch_dir(self) -> str:
        # The temporary link is made here and renamed into deploy_to: one rename(2), with no
        # need for `mv -T` (which BSD and macOS lack).
        return self._join(".switchover", "switch")

    def staging(self, release: str) -> str:
        return self._join(".switchover", "staging", release)

    def release(self, release: str) -> str:
        return self._join("releases", release)

    @property
    def heartbeat(self) -> str:
        # Epoch seconds by the host's clock, rewritten by the lock holder every ~30 s.
        return self._join(".switchover", "lock", "heartbeat")

    @property
    def run_dir(self) -> str:
        # One dir per detached switch step (runner script, pid, log, status).
        return self._join(".switchover", "run")

    @property
    def trash(self) -> str:
        # Pruned releases are renamed here (instant) and deleted in the background.
        return self._join(".switchover", "trash")

    @property
    def manifests(self) -> str:
        # Outside the release on purpose: never mistaken for (or served as) an app file.
        return self._join(".switchover", "manifests")

    @property
    def spare_root(self) -> str:
        # A clone of the live release, made in the background after a deploy, for the next
        # deploy's upload to start from (commands.build_spare).
        return self._join(".switchover", "spare")

    def spare(self, release: str) -> str:
        return self._join(".switchover", "spare", release)

    def manifest(self, release: str) -> str:
        return self._join(".switchover", "manifests", release + ".json")
