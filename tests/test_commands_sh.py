"""The generated scripts, executed for real by /bin/sh on this machine."""

import json
import os
import shutil
import stat
import string
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from project import spare_unlocked

from switchover import commands as C
from switchover.clonepatch import check_reset, parse_listing
from switchover.hostops import parse_state
from switchover.layout import Layout
from switchover.manage import last_deploy
from switchover.transport.base import files_from


def sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)


def make_release(layout: Layout, rid: str, content: str = "x") -> None:
    p = Path(layout.release(rid))
    p.mkdir(parents=True)
    (p / "index.html").write_text(content)


def test_switch_is_relative_link_and_replaces_current(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    assert sh(C.make_layout(lay)).returncode == 0
    make_release(lay, "20260101_000000")
    make_release(lay, "20260102_000000")
    assert sh(C.switch(lay, "20260101_000000", [])).returncode == 0
    assert os.readlink(lay.current) == "releases/20260101_000000"
    r = sh(C.switch(lay, "20260102_000000", [{"event": "switched"}]))
    assert r.returncode == 0, r.stderr
    assert os.readlink(lay.current) == "releases/20260102_000000"
    assert Path(lay.current, "index.html").read_text() == "x"
    assert json.loads(Path(lay.history).read_text().splitlines()[-1]) == {"event": "switched"}


def test_stale_temp_link_does_not_publish_wrong_release(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    make_release(lay, "20260101_000000")
    make_release(lay, "20260102_000000")
    # a dead deploy left its temp link pointing at a directory: `ln -s` onto it would create
    # the new link *inside* that release and the rename would publish the old one
    os.symlink("releases/20260101_000000", f"{lay.switch_dir}/current")
    assert sh(C.switch(lay, "20260102_000000", [])).returncode == 0
    assert os.readlink(lay.current) == "releases/20260102_000000"
    assert not Path(lay.release("20260101_000000"), "20260102_000000").exists()


def test_switch_refuses_real_directory_current(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    make_release(lay, "20260101_000000")
    Path(lay.current).mkdir()
    (Path(lay.current) / "keep").write_text("precious")
    r = sh(C.switch(lay, "20260101_000000", []))
    assert r.returncode == C.RC_CURRENT_IS_DIR
    assert "real directory" in r.stderr
    assert (Path(lay.current) / "keep").read_text() == "precious"


def test_switch_to_missing_release_leaves_current(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    make_release(lay, "20260101_000000")
    sh(C.switch(lay, "20260101_000000", []))
    r = sh(C.switch(lay, "20260109_000000", [{"event": "switched"}]))
    assert r.returncode != 0
    assert os.readlink(lay.current) == "releases/20260101_000000"
    assert not Path(lay.history).exists()  # nothing recorded for a switch that did not happen


def test_lock_is_exclusive_and_released_only_by_owner(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    a = sh(C.acquire(lay, {"deploy_id": "aaaa", "user": "alice"}))
    assert a.returncode == 0, a.stderr
    b = sh(C.acquire(lay, {"deploy_id": "bbbb", "user": "bob"}))
    assert b.returncode == C.RC_LOCKED
    assert "alice" in b.stdout
    sh(C.release_lock(lay, "bbbb"))  # not bob's lock: stays
    assert Path(lay.lock).is_dir()
    sh(C.release_lock(lay, "aaaa"))
    assert not Path(lay.lock).exists()


def test_state_dump_roundtrip(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    r = sh(C.acquire(lay, {"deploy_id": "d1"}))
    make_release(lay, "20260101_000000")
    sh(
        C.switch(
            lay, "20260101_000000", [{"event": "deploy_succeeded", "release": "20260101_000000"}]
        )
    )
    with Path(lay.history).open("a") as f:
        f.write('{"torn": ')  # a crash mid-line must not break reads
    state = parse_state(sh(C.dump_state(lay)).stdout)
    assert r.returncode == 0
    assert state.current == "20260101_000000"
    assert state.releases == ["20260101_000000"]
    assert state.lock == {"deploy_id": "d1"}
    assert [e["event"] for e in state.history] == ["deploy_succeeded"]


def test_link_shared_seeds_and_links(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    rel = Path(lay.release("20260101_000000"))
    (rel / "config").mkdir(parents=True)
    (rel / "config" / ".env").write_text("SEED=1")
    (rel / "storage").mkdir()
    (rel / "storage" / "f").write_text("seeded")
    r = sh(C.link_shared(lay, "20260101_000000", ["config/.env"], ["storage", "logs/app"]))
    assert r.returncode == 0, r.stderr
    assert (rel / "config" / ".env").is_symlink()
    assert Path(lay.shared, "config/.env").read_text() == "SEED=1"
    assert Path(lay.shared, "storage/f").read_text() == "seeded"
    assert (rel / "logs" / "app").is_symlink() and Path(lay.shared, "logs/app").is_dir()


def test_link_shared_missing_file_is_an_error(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    Path(lay.release("20260101_000000")).mkdir(parents=True)
    r = sh(C.link_shared(lay, "20260101_000000", [".env"], []))
    assert r.returncode == C.RC_SHARED_MISSING
    assert ".env" in r.stderr


def test_run_in_release_env_cwd_and_timeout(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    make_release(lay, "20260101_000000")
    env = {"SWITCHOVER_RELEASE": "20260101_000000", "SWITCHOVER_APP": "it's $(odd)"}
    r = sh(C.run_in_release(lay, "20260101_000000", 'pwd; echo "$SWITCHOVER_APP"', env))
    assert r.stdout.splitlines() == [lay.release("20260101_000000"), "it's $(odd)"]
    r = sh(C.run_in_release(lay, "20260101_000000", "sleep 5", env, timeout=1))
    assert r.returncode == 124  # coreutils timeout's code: the host enforced it


# Characters that break naive quoting: spaces, quotes, $(), backticks, ;, newlines, non-ASCII.
NASTY = st.text(
    alphabet=st.sampled_from(list(string.ascii_letters + " '\"$`;()|&<>*?!\\\n\té中-_.")),
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", "..") and "/" not in s)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=NASTY)
def test_hostile_deploy_to_roundtrips_through_real_sh(tmp_path_factory, name):
    base = tmp_path_factory.mktemp("q")
    lay = Layout(str(base / name / "app"))
    r = sh(C.acquire(lay, {"deploy_id": name}))
    assert r.returncode == 0, r.stderr
    make_release(lay, "20260101_000000")
    assert sh(C.switch(lay, "20260101_000000", [{"message": name}])).returncode == 0
    state = parse_state(sh(C.dump_state(lay)).stdout)
    assert state.current == "20260101_000000"
    assert state.history == [{"message": name}]
    assert state.lock == {"deploy_id": name}
    r = sh(C.run_in_release(lay, "20260101_000000", 'printf %s "$X"', {"X": name}))
    assert r.stdout == name
    # nothing was created outside the intended tree
    assert sorted(os.listdir(base)) == [name]


def test_append_after_torn_line_keeps_new_entry_whole(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    Path(lay.history).write_text('{"event":"a"}\n{"torn": ')
    assert sh(C.append_history(lay, [{"event": "b"}])).returncode == 0
    state = parse_state(sh(C.dump_state(lay)).stdout)
    assert [e["event"] for e in state.history] == ["a", "b"]


def test_background_prune_leaves_releases_at_once_and_empties_trash(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    for rid in ("20260101_000000", "20260102_000000"):
        make_release(lay, rid)
        for i in range(200):
            (Path(lay.release(rid)) / f"f{i}").write_text("x")
    r = sh(C.remove_releases(lay, ["20260101_000000"], background=True))
    assert r.returncode == 0, r.stderr
    assert os.listdir(lay.releases) == ["20260102_000000"]  # gone from releases/ already
    trash = Path(lay.trash)
    for _ in range(400):  # the detached delete finishes on its own (bounded wait)
        if not any(trash.iterdir()):
            break
        time.sleep(0.05)
    assert not any(trash.iterdir())
    assert len(os.listdir(lay.release("20260102_000000"))) == 201


def test_a_shared_link_that_cannot_be_made_fails_the_script(tmp_path):
    """`storage` ships as a file, so shared dir `storage/logs` cannot be linked: under `set -e`
    a failed && list is not fatal, so without an explicit exit the next item hid it."""
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    rel = Path(lay.release("20260101_000000"))
    rel.mkdir(parents=True)
    (rel / "storage").write_text("a file, not a dir")
    r = sh("set -e\n" + C.link_shared(lay, "20260101_000000", [], ["storage/logs", "cache"]))
    assert r.returncode != 0
    assert "storage/logs" in r.stderr


def _acquire_and_begin(lay: Layout, release: str, deploy_id: str = "d1"):
    entry = {"event": "deploy_started", "release": release, "previous": None,
             "message": "it's \"quoted\"\n$(x)", "deploy_id": deploy_id}
    r = sh(C.acquire(lay, {"deploy_id": deploy_id}, C.begin_if_fresh(lay, release, entry)))
    assert r.returncode == 0, r.stderr
    return parse_state(r.stdout)


def test_lock_round_trip_begins_a_fresh_release_with_previous_filled_in(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    make_release(lay, "20260101_000000")
    assert sh(C.switch(lay, "20260101_000000", [])).returncode == 0
    state = _acquire_and_begin(lay, "20260102_000000")
    assert state.begun and state.current == "20260101_000000"
    assert state.staging == []  # the listing is taken before the begin
    assert Path(lay.staging("20260102_000000")).is_dir()
    (line,) = Path(lay.history).read_text().splitlines()
    entry = json.loads(line)
    assert entry["previous"] == "20260101_000000" and entry["release"] == "20260102_000000"
    assert entry["message"] == "it's \"quoted\"\n$(x)"


def test_lock_round_trip_records_no_previous_without_a_live_release(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    os.symlink("/elsewhere/20260101_000000", lay.current)  # not a link into releases/
    state = _acquire_and_begin(lay, "20260102_000000")
    assert state.begun
    assert json.loads(Path(lay.history).read_text())["previous"] is None


def test_lock_round_trip_does_not_begin_an_id_in_use_or_older_than_one(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    make_release(lay, "20260105_000000_02")
    for release in ("20260105_000000_02", "20260101_000000"):  # taken; older than one
        state = _acquire_and_begin(lay, release)
        assert not state.begun
        assert not Path(lay.history).exists()
        assert not Path(lay.staging(release)).exists()
        sh(C.release_lock(lay, "d1"))
    # named by a history line only (a dead deploy's release, long removed)
    Path(lay.history).write_text('{"event":"deploy_started","release":"20260107_000000"}\n')
    assert not _acquire_and_begin(lay, "20260107_000000").begun
    sh(C.release_lock(lay, "d1"))
    assert _acquire_and_begin(lay, "20260108_000000").begun


def test_state_lists_names_with_globs_like_ls(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    state = parse_state(sh(C.dump_state(lay)).stdout)
    assert state.releases == [] and state.staging == []  # empty dirs: no literal "*"
    make_release(lay, "20260101_000000")
    Path(lay.staging("odd name")).mkdir(parents=True)
    state = parse_state(sh(C.dump_state(lay)).stdout)
    assert state.releases == ["20260101_000000"] and state.staging == ["odd name"]


def test_lock_owner_is_matched_in_our_compact_form_and_json_dumps_spacing(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    owner = Path(lay.lock_owner)
    for text, mine in [
        ('{"user":"a","deploy_id":"d1"}\n', True),
        ('{"user": "a", "deploy_id": "d1"}\n', True),   # json.dumps' default spacing
        ('{"user":"a","deploy_id":"d1"}', True),         # no trailing newline
        ('{"user":"a","deploy_id":"d10"}\n', False),     # a longer id is someone else's
        ('{"user":"a","note":"deploy_id d1"}\n', False),
    ]:
        owner.parent.mkdir(parents=True, exist_ok=True)
        owner.write_text(text)
        negated = sh(f"if ! {C._owner_is(lay, 'd1')}; then echo other; else echo mine; fi")
        assert negated.stdout.strip() == ("mine" if mine else "other"), text
        sh(C.release_lock(lay, "d1"))
        assert owner.parent.exists() is not mine, text
    assert sh(C.release_lock(lay, "d1")).returncode == 0  # no lock at all: nothing to do


def test_background_prune_runs_at_the_lowest_priority(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    make_release(lay, "20260101_000000")
    seen = tmp_path / "niceness"
    spy = tmp_path / "bin"
    spy.mkdir()
    # An `rm` that notes its niceness (field 19 of /proc/self/stat), then removes for real.
    (spy / "rm").write_text(f"#!/bin/sh\nawk '{{print $19}}' /proc/$$/stat > {seen}\n"
                            'exec /bin/rm "$@"\n')
    (spy / "rm").chmod(0o755)
    script = C.remove_releases(lay, ["20260101_000000"], background=True)
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PATH": f"{spy}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    for _ in range(400):  # bounded: a nice-19 delete waits for a busy machine's cores
        if seen.exists() and seen.read_text().strip() and not any(Path(lay.trash).iterdir()):
            break
        time.sleep(0.05)
    assert seen.read_text().strip() == "19"
    assert not any(Path(lay.trash).iterdir())


def test_waiting_for_a_detached_step_reports_pending_then_its_result(tmp_path):
    slot = tmp_path / "run" / "tok"
    slot.mkdir(parents=True)
    (slot / "pid").write_text(f"{os.getpid()}\n")  # a live process: the step "runs"
    r = sh(C._wait_for_step(str(slot), 0))
    assert r.returncode == C.RC_PENDING
    started = time.monotonic()
    r = sh(C._wait_for_step(str(slot), 2))
    assert r.returncode == C.RC_PENDING
    # The host clock counts whole seconds: 2 s asked is more than 1 s waited, never forever.
    assert 0.9 < time.monotonic() - started < 10
    (slot / "status").write_text("ok\n")
    r = sh(C._wait_for_step(str(slot), 5))
    assert r.returncode == 0
    assert r.stdout.split() == ["@@switchover:status", "ok", "@@switchover:end"]
    (slot / "log").write_text("hook said hi\n")
    assert "hook said hi" in sh(C._wait_for_step(str(slot), 5)).stdout


def test_state_read_sends_the_history_lines_decisions_need_not_the_whole_file(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    kept, live = "20250101_000000", "20260101_000000"
    for rid in (kept, live):
        make_release(lay, rid)
    assert sh(C.switch(lay, live, [])).returncode == 0
    staged = Path(lay.staging("20260102_000000"))
    staged.mkdir(parents=True)
    lines = [{"event": "deploy_succeeded", "release": kept},  # old, about a kept release
             {"event": "deploy_succeeded", "release": "20250101_000000_02"},  # similar id
             {"event": "deploy_failed", "release": "20270101_000000"}]  # clock was ahead
    # thousands of lines about releases long gone, then the live one's and the newest
    lines += [{"event": "deploy_succeeded", "release": f"2024{i:04d}_000000"}
              for i in range(3000)]
    lines += [{"event": "deploy_started", "release": "20260102_000000"},  # still staging
              {"event": "deploy_succeeded", "release": live}]
    lines += [{"event": "unlock", "release": None, "n": i} for i in range(C.RECENT_HISTORY)]
    Path(lay.history).write_text("".join(json.dumps(e) + "\n" for e in lines))
    state = parse_state(sh(C.dump_state(lay)).stdout)
    # the lines naming a release on disk or in staging, then the newest RECENT_HISTORY
    assert state.history == [lines[0], lines[-C.RECENT_HISTORY - 2],
                             lines[-C.RECENT_HISTORY - 1], *lines[-C.RECENT_HISTORY:]]
    assert state.states().previous == kept  # the rollback target, known from an old line
    # the newest id any line read names, sent or not: a new id must sort after it
    assert state.newest_id == "20270101_000000" and "20270101_000000" in state.used_ids()
    full = parse_state(sh(C.dump_state(lay, full_history=True)).stdout)
    assert full.history == lines[-C.HISTORY_TAIL:]
    # no awk on the host: the whole tail, as the full read; an awk that fails: no state
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("tail", "readlink", "sha256sum"):
        (bare / tool).symlink_to(shutil.which(tool))
    no_awk = subprocess.run(["/bin/sh", "-c", C.dump_state(lay)], env={"PATH": str(bare)},
                            capture_output=True, text=True, timeout=30)
    assert parse_state(no_awk.stdout).history == lines[-C.HISTORY_TAIL:]
    (bare / "awk").write_text("#!/bin/sh\nexit 2\n")
    (bare / "awk").chmod(0o755)
    broken = subprocess.run(["/bin/sh", "-c", C.dump_state(lay)], env={"PATH": str(bare)},
                            capture_output=True, text=True, timeout=30)
    with pytest.raises(ValueError):
        parse_state(broken.stdout)
    # a short history comes whole, torn last line and all
    Path(lay.history).write_text(json.dumps(lines[0]) + '\n{"torn": ')
    assert parse_state(sh(C.dump_state(lay)).stdout).history == [lines[0]]


def test_begin_never_reuses_an_id_the_history_names(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    rid = "20260101_000000"
    Path(lay.history).write_text(C.history_line({"event": "deploy_failed", "release": rid})
                                 + "\n")  # a release since removed
    r = sh(C.begin(lay, rid, {"event": "deploy_started", "release": rid}))
    assert r.returncode == C.RC_RELEASE_EXISTS and "used before" in r.stderr
    assert not Path(lay.staging(rid)).exists()
    other = "20260101_000000_02"  # an id the history does not name is fine
    assert sh(C.begin(lay, other, {"event": "deploy_started", "release": other})).returncode == 0
    assert Path(lay.staging(other)).is_dir()


def test_state_read_keeps_the_last_deploy_however_far_back(tmp_path):
    # `status` shows a host's last deploy and how it ended: that must not turn into an older
    # deploy once more than RECENT_HISTORY other lines follow it and its release is gone.
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    live, older, gone = "20260101_000000", "20260104_000000_02", "20260105_000000_03"
    make_release(lay, live)
    assert sh(C.switch(lay, live, [])).returncode == 0
    lines = [{"event": "deploy_started", "release": live, "deploy_id": "a"},
             {"event": "deploy_succeeded", "release": live, "deploy_id": "a"},
             # an older failed deploy whose release is gone: not needed, not sent
             {"event": "deploy_started", "release": older, "deploy_id": "b"},
             {"event": "deploy_failed", "release": older, "deploy_id": "b"},
             {"event": "deploy_started", "release": gone, "deploy_id": "c"},
             {"event": "deploy_failed", "release": gone, "deploy_id": "c"}]
    lines += [{"event": "unlock", "release": None, "n": i} for i in range(C.RECENT_HISTORY + 5)]
    # as the tool writes them: compact JSON
    Path(lay.history).write_text("".join(json.dumps(e, separators=(",", ":")) + "\n"
                                         for e in lines))
    state = parse_state(sh(C.dump_state(lay)).stdout)
    assert state.history == [*lines[:2], *lines[4:6], *lines[-C.RECENT_HISTORY:]]
    last = last_deploy(state.history, None)
    assert last is not None and (last["release"], last["state"]) == (gone, "failed")


def test_clone_release_links_the_live_files_and_lists_the_clone(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    live = "20260101_000000"
    make_release(lay, live, "v1")
    src = Path(lay.release(live))
    (src / "static" / "js").mkdir(parents=True)
    (src / "static" / "js" / "a b.js").write_text("js")
    (src / "link").symlink_to("index.html")
    os.utime(src / "static", (1_700_000_000, 1_700_000_000))
    staging = Path(lay.staging("20260102_000000"))
    staging.mkdir(parents=True)
    (staging / "leftover").write_text("from an earlier attempt")
    r = subprocess.run(["sh", "-c", C.clone_release(lay, str(src), "20260102_000000",
                                                    ["root"], ["root"])],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    head, _, data = r.stdout.partition(C.SECTION + "listing\n")
    # the suite runs as root
    assert C.parse_sections(head)["ids"] == ["G 0", "root", "u root 0", "g root 0"]
    listed = parse_listing(data)
    assert sorted(listed) == ["index.html", "link", "static", "static/js", "static/js/a b.js"]
    assert listed["link"].target == "index.html" and listed["index.html"].size == 2
    # the same inodes as the live release (nothing copied), nothing left from before
    assert (staging / "index.html").stat().st_ino == (src / "index.html").stat().st_ino
    assert not (staging / "leftover").exists()
    # every directory of the clone, and only of the clone, at time 0: rsync sets them all
    assert listed["static"].mtime_ns == 0 and (staging / "static").stat().st_mtime == 0
    assert (src / "static").stat().st_mtime == 1_700_000_000
    # and removing from the clone leaves the live release whole
    rm = subprocess.run(["sh", "-c", C.remove_paths(lay, "20260102_000000")],
                        input="static/js\0index.html\0", capture_output=True, text=True)
    assert rm.returncode == 0 and sorted(os.listdir(staging)) == ["link", "static"]
    assert (src / "index.html").read_text() == "v1" and (src / "static/js/a b.js").exists()


def test_clone_release_says_so_where_the_host_cannot_clone(tmp_path):
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    make_release(lay, "20260101_000000")
    staging = Path(lay.staging("20260102_000000"))
    staging.mkdir(parents=True)
    bare = tmp_path / "bin"  # a find without -printf (BusyBox)
    bare.mkdir()
    (bare / "find").write_text("#!/bin/sh\nexit 1\n")
    (bare / "find").chmod(0o755)
    r = subprocess.run(["sh", "-c", C.clone_release(lay, lay.release("20260101_000000"),
                                                    "20260102_000000")],
                       env={"PATH": f"{bare}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.returncode == C.RC_NO_CLONE
    assert staging.is_dir() and not list(staging.iterdir())


def _live_and_new(tmp_path: Path) -> tuple[Layout, str, str]:
    """A layout with a live release ("v1") and the id of the next one."""
    lay = Layout(str(tmp_path / "app"))
    sh(C.make_layout(lay))
    live, new = "20260101_000000", "20260102_000000"
    make_release(lay, live, "v1")
    return lay, live, new


def _slow_cp(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose `cp` waits for <mark>.go before copying (a big tree, on cue)."""
    slow = tmp_path / "bin"
    slow.mkdir()
    mark = tmp_path / "cp"
    (slow / "cp").write_text(f"#!/bin/sh\ntouch {mark}.started\n"
                             f"while [ ! -e {mark}.go ]; do sleep 0.02; done\n"
                             f"/bin/cp \"$@\"\nrc=$?\ntouch {mark}.done\nexit $rc\n")
    (slow / "cp").chmod(0o755)
    return {"PATH": f"{slow}:/usr/bin:/bin"}, mark


def _wait_for(path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists(), path


def test_staging_is_never_emptied_under_a_clone_still_running(tmp_path):
    """A link that drops mid-clone leaves the clone script running on the host (until it
    next writes to the dead channel). The fallback empties staging and rsyncs the whole
    tree into it: it must wait for that clone, or the late `cp -l` would leave the live
    release's inodes in staging for rsync to chmod and touch in place."""
    lay, live, new = _live_and_new(tmp_path)
    src = Path(lay.release(live))
    for i in range(20):
        (src / f"f{i}.txt").write_text("v1")
    env, mark = _slow_cp(tmp_path)
    cloning = subprocess.Popen(["sh", "-c", C.clone_release(lay, str(src), new)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reset = None
    try:
        _wait_for(Path(f"{mark}.started"))
        # A second clone meanwhile: refused at once, not run over the first one.
        again = subprocess.run(["sh", "-c", C.clone_release(lay, str(src), new)], env=env,
                               capture_output=True, text=True, timeout=30)
        assert again.returncode == C.RC_NO_CLONE
        assert "still running" in again.stderr
        # The fallback, while the first clone copies: it waits.
        reset = subprocess.Popen(["sh", "-c", C.reset_staging(lay, new)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert reset.poll() is None
        Path(f"{mark}.go").touch()
        _, err = reset.communicate(timeout=30)
        assert reset.returncode == 0, err
        assert Path(f"{mark}.done").exists()  # it went on only once the copy was over
        staging = Path(lay.staging(new))
        assert staging.is_dir() and not list(staging.iterdir())
    finally:
        Path(f"{mark}.go").touch()
        for proc in (cloning, reset):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert sorted(os.listdir(src)) == sorted(["index.html", *(f"f{i}.txt" for i in range(20))])


def test_a_clone_stuck_writing_its_listing_does_not_hold_the_lock(tmp_path):
    # A link that stalls without dropping: the host's clone is done but blocked writing its
    # listing, for as long as sshd takes to notice. The fallback must not wait for that.
    lay, live, new = _live_and_new(tmp_path)
    src = Path(lay.release(live))
    for i in range(3000):  # a listing of ~150 kB: more than a pipe holds
        (src / f"file-{i:05d}.txt").write_text("v1")
    cloning = subprocess.Popen(["sh", "-c", C.clone_release(lay, str(src), new)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        _wait_for(Path(lay.staging(new)) / "file-02999.txt")
        time.sleep(0.3)  # past the copy, into the listing: nobody reads it
        assert cloning.poll() is None
        r = subprocess.run(["sh", "-c", C.reset_staging(lay, new)], capture_output=True,
                           text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert not list(Path(lay.staging(new)).iterdir())
    finally:
        cloning.kill()
        cloning.wait()


def test_a_flock_that_cannot_lock_means_no_clone_and_never_blocks_the_fallback(tmp_path):
    # BusyBox's flock has no -E or -w; some filesystems refuse locks. Either way no clone
    # runs (nothing could hold the lock), and emptying staging must still work.
    lay, live, new = _live_and_new(tmp_path)
    staging = Path(lay.staging(new))
    staging.mkdir(parents=True)
    (staging / "partial").write_text("from an earlier attempt")
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "flock").write_text('#!/bin/sh\necho "flock: unrecognized option" >&2\nexit 1\n')
    (bare / "flock").chmod(0o755)
    env = {"PATH": f"{bare}:/usr/bin:/bin"}
    r = subprocess.run(["sh", "-c", C.clone_release(lay, lay.release(live), new)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == C.RC_NO_CLONE
    assert r.stderr.strip() == "flock cannot lock the staging directory"
    assert (staging / "partial").exists()  # not touched: the caller empties it
    r = subprocess.run(["sh", "-c", C.reset_staging(lay, new)], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert staging.is_dir() and not list(staging.iterdir())


def _as_nobody(script: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "sh", "-c", script], input=input, capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="acting as another user needs root and setpriv")
def test_a_clone_works_for_a_user_that_is_not_root_with_read_only_directories():
    # Root removes from and writes into a 0555 directory; the usual deploy user cannot.
    base = Path(tempfile.mkdtemp(prefix="swo-nonroot-", dir="/tmp"))
    try:
        base.chmod(0o755)
        lay = Layout(str(base / "app"))
        sh(C.make_layout(lay))
        live, new = "20260101_000000", "20260102_000000"
        make_release(lay, live)
        src = Path(lay.release(live))
        (src / "ro").mkdir()
        for name in ("a.txt", "b.txt"):
            (src / "ro" / name).write_text("v1\n")
        (src / "ro").chmod(0o555)
        artifact = base / "artifact"
        (artifact / "ro").mkdir(parents=True)
        (artifact / "ro" / "a.txt").write_text("v2, longer\n")
        (artifact / "ro").chmod(0o555)
        subprocess.run(["chown", "-R", "65534:65534", str(base)], check=True)

        r = _as_nobody(C.clone_release(lay, str(src), new))
        assert r.returncode == 0, r.stderr
        staging = Path(lay.staging(new))
        assert (staging / "ro").stat().st_mode & 0o700 == 0o700  # writable while patched
        r = _as_nobody(C.remove_paths(lay, new), input=b"ro/b.txt\0")
        assert r.returncode == 0, r.stderr
        r = _as_nobody(f"rsync -a --ignore-times --files-from=- --from0 {artifact}/ {staging}/",
                       input=files_from(["ro", "ro/a.txt"]))
        assert r.returncode == 0, r.stderr
        assert (staging / "ro" / "a.txt").read_text() == "v2, longer\n"
        assert not (staging / "ro" / "b.txt").exists()
        assert (staging / "ro").stat().st_mode & 0o777 == 0o555  # the artifact's, again
        # the live release: whole, its directory still read-only
        assert sorted(os.listdir(src / "ro")) == ["a.txt", "b.txt"]
        assert (src / "ro" / "a.txt").read_text() == "v1\n"
        assert (src / "ro").stat().st_mode & 0o777 == 0o555
        # and a clone with read-only directories can be emptied again
        r = _as_nobody(C.reset_staging(lay, new))
        assert r.returncode == 0, r.stderr
        assert staging.is_dir() and not list(staging.iterdir())
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _spare_built(lay: Layout, release: str) -> Path:
    """Start build_spare for `release` as a deploy's record step does, from a shell whose
    parent (the deploy's connection) then ends, and wait (bounded) for the spare."""
    r = sh(f"sh -c {C.q(C.build_spare(lay, release))}; true")
    assert r.returncode == 0, r.stderr
    spare = Path(lay.spare(release))
    _wait_for(spare)
    spare_unlocked(spare.parent)  # else a clone may find it still locked, and copy
    return spare


def test_a_spare_is_built_only_once_the_deploys_connection_has_ended(tmp_path):
    lay, live, _ = _live_and_new(tmp_path)
    # The record step's parent stands in for the connection: it lives until told to end.
    go = tmp_path / "go"
    conn = subprocess.Popen(["sh", "-c", f"sh -c {C.q(C.build_spare(lay, live))};"
                                         f" while [ ! -e {go} ]; do sleep 0.05; done"])
    try:
        time.sleep(2.5)  # past the second a build waits after its connection ends
        assert not Path(lay.spare(live)).exists()
    finally:
        go.touch()
        conn.wait(timeout=30)
    _wait_for(Path(lay.spare(live)))


def test_a_spare_is_a_hard_linked_clone_of_the_release_with_its_directories_reset(tmp_path):
    lay, live, _ = _live_and_new(tmp_path)
    src = Path(lay.release(live))
    (src / "static" / "js").mkdir(parents=True)
    (src / "static" / "js" / "a.js").write_text("js")
    (src / "link").symlink_to("index.html")
    (src / "sealed").mkdir()
    (src / "sealed").chmod(0o555)
    os.utime(src / "static", (1_700_000_000, 1_700_000_000))
    spare_root = Path(lay.spare_root)
    spare_root.mkdir(parents=True)
    (spare_root / "20251231_000000").mkdir()  # a spare of an earlier release
    (spare_root / f"{live}.tmp").mkdir()  # a build that was cut off
    (spare_root / f"{live}.tmp" / "half").write_text("")
    spare = _spare_built(lay, live)
    assert sorted(os.listdir(spare_root)) == [live]  # only the whole one is left
    assert (spare / "index.html").stat().st_ino == (src / "index.html").stat().st_ino
    assert (spare / "static/js/a.js").stat().st_ino == (src / "static/js/a.js").stat().st_ino
    assert os.readlink(spare / "link") == "index.html"
    for d in ("static", "static/js", "sealed"):
        st = (spare / d).stat()
        assert st.st_mtime == 0 and st.st_mode & 0o700 == 0o700, d
    # the live release itself is untouched
    assert (src / "static").stat().st_mtime == 1_700_000_000
    assert stat.S_IMODE((src / "sealed").stat().st_mode) == 0o555


def test_a_clone_starts_from_the_spare_and_lists_it(tmp_path):
    lay, live, new = _live_and_new(tmp_path)
    src = Path(lay.release(live))
    (src / "sub").mkdir()
    (src / "sub" / "b.txt").write_text("b")
    spare = _spare_built(lay, live)
    spare_ino = spare.stat().st_ino
    Path(lay.staging(new)).mkdir(parents=True)  # as begin leaves it
    r = sh(C.clone_release(lay, str(src), new, spare=lay.spare(live)))
    assert r.returncode == 0, r.stderr
    head, _, data = r.stdout.partition(C.SECTION + "listing\n")
    assert C.parse_sections(head)["clone"] == ["spare"]
    staging = Path(lay.staging(new))
    assert staging.stat().st_ino == spare_ino and not spare.exists()  # moved, not copied
    listed = parse_listing(data)
    assert sorted(listed) == ["index.html", "sub", "sub/b.txt"]
    check_reset(listed)  # the directories as a fresh clone leaves them
    assert (staging / "sub/b.txt").stat().st_ino == (src / "sub/b.txt").stat().st_ino


def test_a_spare_still_being_made_or_of_another_release_is_not_taken(tmp_path):
    lay, live, new = _live_and_new(tmp_path)
    src = Path(lay.release(live))
    spare = _spare_built(lay, live)
    Path(lay.staging(new)).mkdir(parents=True)
    # A builder holding the spare lock: the clone copies instead of waiting.
    holder = subprocess.Popen(["flock", "-o", lay.spare_root, "sleep", "30"])
    try:
        _wait_until_locked(lay.spare_root)
        r = sh(C.clone_release(lay, str(src), new, spare=lay.spare(live)))
        assert r.returncode == 0, r.stderr
        assert _clone_kind(r.stdout) == "copy"
        assert spare.is_dir()  # left for a later deploy
    finally:
        holder.kill()
        holder.wait()
    # Only the live release's own spare is taken: here there is one of another release
    other = Path(lay.spare("20251231_000000"))
    spare.rename(other)
    r = sh(C.clone_release(lay, str(src), "20260103_000000", spare=lay.spare(live)))
    assert r.returncode == 0 and _clone_kind(r.stdout) == "copy"
    assert other.is_dir()


def _clone_kind(out: str) -> str:
    (kind,) = C.parse_sections(out.partition(C.SECTION + "listing\n")[0])["clone"]
    return kind


def _wait_until_locked(path: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if subprocess.run(["flock", "-n", path, "true"]).returncode != 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} was never locked")


def test_a_spare_build_gives_up_at_once_while_another_holds_the_lock(tmp_path):
    lay, live, _ = _live_and_new(tmp_path)
    Path(lay.spare_root).mkdir(parents=True)
    holder = subprocess.Popen(["flock", "-o", lay.spare_root, "sleep", "30"])
    try:
        _wait_until_locked(lay.spare_root)
        r = sh(C.spare_script(lay, live))  # what the detached builder runs: returns at once
        assert r.returncode == 0 and not os.listdir(lay.spare_root)
    finally:
        holder.kill()
        holder.wait()
    assert sh(C.spare_script(lay, live)).returncode == 0  # the lock free: built
    assert os.listdir(lay.spare_root) == [live]


def test_a_spare_is_not_built_where_the_host_cannot_clone(tmp_path):
    lay, live, _ = _live_and_new(tmp_path)
    bare = tmp_path / "bin"  # a find without -printf (BusyBox)
    bare.mkdir()
    (bare / "find").write_text("#!/bin/sh\nexit 1\n")
    (bare / "find").chmod(0o755)
    r = subprocess.run(["sh", "-c", C.spare_script(lay, live)], capture_output=True, text=True,
                       env={"PATH": f"{bare}:/usr/bin:/bin"}, timeout=30)
    assert r.returncode == 0 and not Path(lay.spare_root).exists()


def test_pruning_a_release_removes_its_spare_clone(tmp_path):
    lay, live, _ = _live_and_new(tmp_path)
    old = "20251231_000000"
    make_release(lay, old, "v0")
    spare = Path(lay.spare(old))  # a spare of a release since rolled back from
    (spare / "sub").mkdir(parents=True)
    (spare / "sub" / "f").write_text("x")
    assert sh(C.remove_releases(lay, [old], background=True)).returncode == 0
    assert not spare.exists() and not Path(lay.release(old)).exists()
    make_release(lay, old, "v0")
    spare.mkdir(parents=True)
    assert sh(C.remove_releases(lay, [old])).returncode == 0
    assert not spare.exists() and not Path(lay.release(old)).exists()
    assert Path(lay.release(live)).is_dir()


def test_the_record_step_still_fails_when_the_unlock_fails(tmp_path, monkeypatch):
    """The spare build is the record script's last command: it must not hide a lock left
    behind (the client would think it unlocked)."""
    from switchover.hostops import HostOps
    from switchover.hosts import HostSpec
    from switchover.transport.local import LocalTransport

    lay, live, _ = _live_and_new(tmp_path)
    owner = {"deploy_id": "d1", "user": "me"}
    assert sh(C.acquire(lay, owner)).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "rm").write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in */lock) exit 1;; esac;'
                             ' done\nexec /bin/rm "$@"\n')
    (fake / "rm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    ops = HostOps(HostSpec("localhost"), LocalTransport(), lay, timeout=30)
    with pytest.raises(Exception, match="recording the deploy"):
        ops.prune_and_record([], [{"event": "deploy_succeeded", "release": live}],
                             unlock="d1", spare=live)
    assert Path(lay.lock).is_dir()


def test_finalize_refuses_a_manifest_cut_short(tmp_path):
    # The client or the link went away while sending the manifest: `cat` sees an early end
    # and exits 0, so only the size tells. Nothing is published; the upload stays staged.
    lay = Layout(str(tmp_path / "app"))
    assert sh(C.make_layout(lay)).returncode == 0
    rid = "20260101_000000"
    Path(lay.staging(rid)).mkdir(parents=True)
    Path(lay.staging(rid), "index.html").write_text("x")
    manifest = b'{"release": "20260101_000000", "files": {}}\n'
    script = C.finalize(lay, rid, [], [], manifest_size=len(manifest))
    cut = subprocess.run(["sh", "-c", script], input=manifest[:10], capture_output=True,
                         timeout=30)
    assert cut.returncode == 1 and b"manifest arrived incomplete" in cut.stderr
    assert not Path(lay.release(rid)).exists() and Path(lay.staging(rid), "index.html").exists()
    assert not Path(lay.manifest(rid)).exists() and not Path(lay.manifest(rid) + ".tmp").exists()
    whole = subprocess.run(["sh", "-c", script], input=manifest, capture_output=True,
                           timeout=30)
    assert whole.returncode == 0, whole.stderr
    assert Path(lay.release(rid), "index.html").read_text() == "x"
    assert Path(lay.manifest(rid)).read_bytes() == manifest
