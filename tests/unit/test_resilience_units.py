"""Pure pieces of the resilience work: stale-lock judgement, manifests, drift, config."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from switchover import faults, locks
from switchover import manifest as M
from switchover.config import load_environment
from switchover.errors import HostError
from switchover.hostops import SwitchStep


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def here(**kw: object) -> dict[str, object]:
    return {"origin": socket.gethostname(), **locks.identity(), **kw}


def test_live_owner_on_this_machine_is_never_stale():
    owner = here(pid=os.getpid())
    assert locks.stale_reason(owner, heartbeat_age=10**6, lock_timeout=1) is None


def test_dead_owner_on_this_machine_is_stale_at_once():
    reason = locks.stale_reason(here(pid=_dead_pid()), heartbeat_age=0, lock_timeout=300)
    assert reason and "no longer runs" in reason


def test_reused_pid_is_not_the_owner():
    owner = here(pid=os.getpid(), pid_start="1")  # our pid, but another start time
    assert locks.stale_reason(owner, None, 300) is not None


def test_other_machine_judged_by_heartbeat_only():
    owner = {"origin": "elsewhere", "pid": 1}
    assert locks.stale_reason(owner, heartbeat_age=299, lock_timeout=300) is None
    assert "no heartbeat for 301 s" in (locks.stale_reason(owner, 301, 300) or "")
    assert locks.stale_reason(owner, None, 300) is None  # no heartbeat: an older switchover
    # same host name, but another boot or PID namespace (a container): judged by heartbeat
    twin = here(pid=_dead_pid(), machine="other-boot:1")
    assert locks.stale_reason(twin, 5, 300) is None


def test_heartbeat_thread_beats_and_stops():
    beats: list[float] = []
    hb = locks.Heartbeat(lambda: beats.append(time.monotonic()), 0.01)
    deadline = time.monotonic() + 5
    while len(beats) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    hb.stop()
    n = len(beats)
    time.sleep(0.05)
    assert n >= 3 and len(beats) == n


def test_pause_hook_is_inert_when_unset(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.PAUSE_AT, raising=False)
    faults.pause("after_lock")  # returns at once
    monkeypatch.setenv(faults.PAUSE_AT, "after_begin,before_unlock")
    monkeypatch.setenv(faults.PAUSE_MARKER, str(tmp_path / "m"))
    monkeypatch.setenv(faults.PAUSE_SECONDS, "0")
    faults.pause("after_lock")
    assert not (tmp_path / "m").exists()
    faults.pause("before_unlock", "web1")
    assert (tmp_path / "m").read_text().startswith("before_unlock web1 ")


@pytest.mark.parametrize(("perms", "mode"), [
    ("rw-r--r--", "0644"), ("rwxr-xr-x", "0755"), ("rwsr-xr-x", "4755"),
    ("rwxr-Sr--", "2744"), ("rwxrwxrwt", "1777"), ("rw-------", "0600"), ("bad", None),
])
def test_mode_from_ls(perms, mode):
    assert M._mode_from_ls(perms) == mode


def test_drift_reports_added_missing_modified_and_ignores_shared():
    f = {"type": "file", "size": 1, "mode": "0644", "sha256": "a"}
    manifest = {"shared": {"files": [".env"], "dirs": ["storage"]}, "files": {
        "index.html": f, "gone": f, "run.sh": f, "link": {"type": "link", "target": "x"},
        ".env": f, "storage/seed": f}}
    actual = {
        "index.html": {**f, "sha256": "b", "size": 2},
        "run.sh": {**f, "mode": "0755"},
        "link": {"type": "link", "target": "y"},
        "extra": f,
        ".env": {"type": "link", "target": "../../shared/.env"},
        "storage": {"type": "link", "target": "../../shared/storage"},
    }
    drift = M.compare(manifest, actual)
    assert drift.added == ["extra"] and drift.missing == ["gone"]
    changes = {m["path"]: m["change"] for m in drift.modified}
    assert changes == {"index.html": "content, size 1 -> 2", "run.sh": "mode 0644 -> 0755",
                       "link": "link target 'x' -> 'y'"}
    assert M.compare(manifest, {**actual, "index.html": f, "run.sh": f, "gone": f,
                                "link": manifest["files"]["link"]}).added == ["extra"]


def test_sh_listing_parses():
    lines = ["F\trwxr-xr-x\t12\tabc\tdir/a b\tc", "L\tlink\tdir/a b", ""]
    assert M.parse_listing(lines) == {
        "dir/a b\tc": {"type": "file", "size": 12, "mode": "0755", "sha256": "abc"},
        "link": {"type": "link", "target": "dir/a b"},
    }


def test_switch_step_result_parsing():
    out = "@@switchover:status\nhook 1 7\n@@switchover:switch\n@@switchover:hook:0\nok\n" \
          "@@switchover:hook:1\nboom\n@@switchover:end\n"
    step = SwitchStep.parse(out)
    assert step.switched and step.failed_hook == 1 and step.rc == 7 and step.message == "boom"
    assert SwitchStep.parse("@@switchover:status\nok\n@@switchover:end\n").hooks_run == 0
    with pytest.raises(HostError):
        SwitchStep.parse("@@switchover:status\nkilled\n")


def test_lock_timeout_top_level_and_per_environment(tmp_path: Path):
    cfg = tmp_path / "switchover.toml"
    cfg.write_text('app = "a"\nlock_timeout = 120.0\n[environments.x]\ndeploy_to = "d"\n'
                   '[environments.y]\ndeploy_to = "d"\nlock_timeout = 30.0\n')
    assert load_environment(cfg, "x").lock_timeout == 120
    assert load_environment(cfg, "y").lock_timeout == 30
    cfg.write_text('app = "a"\n[environments.x]\ndeploy_to = "d"\n')
    assert load_environment(cfg, "x").lock_timeout == 300
