"""The resilience scripts (commands.py), run for real by /bin/sh: takeover races, heartbeats,
the detached switch step, manifests and the host-side listing."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from switchover import commands as C
from switchover import manifest as M
from switchover.hostops import SwitchStep
from switchover.layout import Layout

RID = "20260101_000000"


def sh(script: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, timeout=60,
                          input=input.decode() if input else None, text=True)


def locked_layout(tmp_path: Path, owner: str = "dead") -> Layout:
    lay = Layout(str(tmp_path / "app"))
    assert sh(C.acquire(lay, {"deploy_id": owner, "user": "u"})).returncode == 0
    return lay


def owner_id(lay: Layout) -> str:
    return json.loads(Path(lay.lock_owner).read_text())["deploy_id"]


def test_concurrent_takeovers_have_exactly_one_winner(tmp_path):
    lay = locked_layout(tmp_path)

    def contend(i: int) -> int:
        entry = {"event": "unlock", "deploy_id": f"c{i}"}
        return sh(C.take_over(lay, "dead", {"deploy_id": f"c{i}"}, entry)).returncode

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(contend, range(8)))
    assert codes.count(0) == 1 and codes.count(C.RC_LOCKED) == 7, codes
    winner = f"c{codes.index(0)}"
    assert owner_id(lay) == winner
    assert Path(lay.heartbeat).read_text().strip().isdigit()
    history = [json.loads(x) for x in Path(lay.history).read_text().splitlines()]
    assert [e["deploy_id"] for e in history] == [winner]
    leftovers = [p.name for p in Path(lay.meta).iterdir() if p.name.startswith("lock.")]
    assert leftovers == [] and not Path(lay.lock, "takeover").exists()


def test_takeover_backs_off_when_the_lock_was_already_replaced(tmp_path):
    lay = locked_layout(tmp_path, owner="fresh")  # someone took it over already
    r = sh(C.take_over(lay, "dead", {"deploy_id": "late"}, {"event": "unlock"}))
    assert r.returncode == C.RC_LOCKED
    assert owner_id(lay) == "fresh" and not Path(lay.lock, "takeover").exists()
    assert "fresh" in C.parse_sections(r.stdout)["lock"][0]


def test_takeover_refused_while_the_dead_deploys_switch_step_runs(tmp_path):
    lay = locked_layout(tmp_path)
    slot = Path(lay.run_dir, "dead-x")
    slot.mkdir(parents=True)
    with subprocess.Popen(["sleep", "30"]) as proc:
        (slot / "pid").write_text(f"{proc.pid}\n")
        r = sh(C.take_over(lay, "dead", {"deploy_id": "new"}, {"event": "unlock"}))
        proc.kill()
    assert r.returncode == C.RC_BUSY
    assert owner_id(lay) == "dead" and not Path(lay.lock, "takeover").exists()
    (slot / "status").write_text("ok\n")  # finished: now the lock may go
    assert sh(C.take_over(lay, "dead", {"deploy_id": "new"}, {"event": "x"})).returncode == 0
    assert owner_id(lay) == "new" and not slot.exists()


def test_heartbeat_only_refreshes_our_own_lock(tmp_path):
    lay = locked_layout(tmp_path, owner="mine")
    Path(lay.heartbeat).write_text("1\n")
    assert sh(C.heartbeat(lay, "other")).returncode == 0
    assert Path(lay.heartbeat).read_text() == "1\n"
    assert sh(C.heartbeat(lay, "mine")).returncode == 0
    assert int(Path(lay.heartbeat).read_text()) > 1
    sh(C.release_lock(lay, "mine"))
    assert sh(C.heartbeat(lay, "mine")).returncode == 0
    assert not Path(lay.lock).exists()  # never recreated after release


def test_detached_step_result_and_hook_failure(tmp_path):
    lay = locked_layout(tmp_path)
    Path(lay.release(RID)).mkdir(parents=True)
    hooks = ["echo one", "echo two >&2; exit 3", "echo never"]
    r = sh(C.switch_detached(lay, "t1", RID, [{"event": "switched"}], hooks, {}, 10, 20))
    assert r.returncode == 0, r.stderr
    step = SwitchStep.parse(r.stdout)
    assert step.switched and step.failed_hook == 1 and step.rc == 3
    assert step.output(0) == "one" and step.message == "two" and step.hooks_run == 2
    assert os.readlink(lay.current) == f"releases/{RID}"
    # waiting again (after a reconnect) reads the same result
    assert SwitchStep.parse(sh(C.wait_detached(lay, "t1", 5)).stdout).failed_hook == 1
    # a slot nobody launched is claimed, so a late launch never runs
    assert sh(C.wait_detached(lay, "t2", 5)).returncode == C.RC_NOT_STARTED
    late = sh(C.switch_detached(lay, "t2", RID, [], [], {}, 10, 5))
    assert late.returncode == C.RC_NOT_STARTED


def test_detached_switch_refusing_a_real_directory(tmp_path):
    lay = locked_layout(tmp_path)
    Path(lay.release(RID)).mkdir(parents=True)
    Path(lay.current).mkdir()
    r = sh(C.switch_detached(lay, "t", RID, [], ["touch ran"], {}, 10, 20))
    step = SwitchStep.parse(r.stdout)
    assert not step.switched and step.rc == C.RC_CURRENT_IS_DIR
    assert "real directory" in step.message
    assert not Path(lay.release(RID), "ran").exists()


def _tree(root: Path) -> None:
    (root / "sub dir").mkdir(parents=True)
    (root / "sub dir" / "a b.txt").write_text("spaces\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "secret").write_text("x")
    (root / "secret").chmod(0o600)
    (root / "link").symlink_to("sub dir/a b.txt")
    (root / "dirlink").symlink_to("sub dir")


def test_manifest_stored_at_finalize_and_listing_matches_on_both_listers(tmp_path):
    lay = locked_layout(tmp_path)
    src = tmp_path / "src"
    _tree(src)
    staged = Path(lay.staging(RID))
    subprocess.run(["cp", "-a", f"{src}/.", str(staged)], check=True)
    (staged / ".switchover-partial").mkdir()  # rsync debris never lands in the release
    doc = M.build(RID, M.scan(src, []), [], [])
    data = M.encode(doc)
    r = sh(C.finalize(lay, RID, [], [], manifest_size=len(data)), input=data)
    assert r.returncode == 0, r.stderr
    assert json.loads(Path(lay.manifest(RID)).read_text())["files"] == doc["files"]
    assert not Path(lay.release(RID), ".switchover-partial").exists()
    sh(C.switch(lay, RID, []))
    listings = []
    for python in (True, False):
        out = sh(C.live_listing(lay, python))
        assert out.returncode == 0, out.stderr
        s = C.parse_sections(out.stdout)
        assert s["release"] == [RID]
        listings.append(M.parse_listing(s["listing"]))
    # A host lists content; the manifest also records mtime, a hint for the next upload.
    content = {path: {k: v for k, v in e.items() if k != "mtime"}
               for path, e in doc["files"].items()}
    assert listings[0] == listings[1] == content
    assert M.compare(doc, listings[1]).clean
    # cleanup takes the manifest with its release, and only then
    sh(C.remove_releases(lay, [RID]))
    assert not Path(lay.manifest(RID)).exists()
