"""`switchover verify ENV`: re-check the live release on every host against its manifest.

The files are listed and hashed on the host (one round trip); the comparison happens here
(manifest.compare). Exit 1 if any host drifted or cannot be verified, 3 if unreachable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from switchover import manifest as M
from switchover.config import Environment
from switchover.errors import ExitCode, as_error
from switchover.fanout import fan_out
from switchover.hostops import HostOps
from switchover.manage import CommandResult
from switchover.output import Reporter


def _check(h: HostOps, python: bool) -> dict[str, Any]:
    h.connect()
    release, doc, files = h.live_listing(python)
    row: dict[str, Any] = {"host": h.name, "release": release, "files": len(files),
                           "error": None}
    if doc is None:
        return {**row, "status": "no_manifest",
                "error": f"release {release} has no manifest (deployed before manifests "
                         "were recorded?): it cannot be verified"}
    drift = M.compare(doc, files)
    return {**row, "status": "ok" if drift.clean else "drift", **drift.to_json()}


def verify(env: Environment, hosts: Sequence[HostOps], out: Reporter,
           python: bool = True) -> CommandResult:
    """Compare every host's live release with its manifest; report and pick the exit code."""
    try:
        outcomes = fan_out(hosts, lambda h: _check(h, python), env.parallel)
    finally:
        for h in hosts:
            h.close()
    rows: list[dict[str, Any]] = []
    codes = [0]
    for h, o in zip(hosts, outcomes, strict=True):
        if o.value is None:
            assert o.error is not None
            err = as_error(o.error)
            # An unreachable host is exit 3; a host we reached but could not verify is 1.
            codes.append(int(err.code) if err.code == ExitCode.UNREACHABLE else 1)
            text = err.message
            rows.append({"host": h.name, "status": "error", "error": text})
            out.bad(h.name, text)
            continue
        row = o.value
        rows.append(row)
        if row["status"] == "ok":
            out.good(h.name, f"release {row['release']} matches its manifest "
                             f"({row['files']} entries)")
            continue
        codes.append(1)
        if row["status"] == "no_manifest":
            out.bad(h.name, row["error"])
            continue
        counts = ", ".join(f"{len(row[k])} {k}" for k in ("added", "missing", "modified")
                           if row[k])
        out.bad(h.name, f"release {row['release']} has drifted from its manifest: {counts}")
        for path in row["added"]:
            out.step(h.name, f"  added:    {path}")
        for path in row["missing"]:
            out.step(h.name, f"  missing:  {path}")
        for m in row["modified"]:
            out.step(h.name, f"  modified: {m['path']} ({m['change']})")
    code = ExitCode.UNREACHABLE if ExitCode.UNREACHABLE in codes else max(codes)
    status = "ok" if code == 0 else "drift" if all(
        r["status"] in ("ok", "drift") for r in rows) else "failed"
    return CommandResult({"command": "verify", "environment": env.name, "status": status,
                          "hosts": rows}, int(code))
