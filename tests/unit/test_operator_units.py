"""Pure pieces of the operator experience: rsync output parsing, tree comparison, --since,
webhook bodies, the init template, the Reporter's plain output."""

from __future__ import annotations

import io
import os
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from switchover.config import load_file, resolve_environment
from switchover.errors import UsageError
from switchover.histview import durations, parse_since, since_filter
from switchover.notify import Notice, safe_url
from switchover.output import Reporter, prune_logs
from switchover.scaffold import default_app, render
from switchover.transport import LocalTransport
from switchover.transport.progress import parse_progress2
from switchover.treediff import compare_trees, parse_itemized


def test_parse_progress2_lines():
    p = parse_progress2("      1,200,000  12%    3.41MB/s    0:00:01 (xfr#6, to-chk=49/56)")
    assert p is not None
    assert (p.bytes_sent, p.percent, p.rate, p.files_sent) == (1_200_000, 12, "3.41MB/s", 6)
    assert (p.files_checked, p.files_total) == (7, 56)
    q = parse_progress2("      3,363,840  35%    2.93MB/s    0:00:02  ", p)
    assert q is not None and q.bytes_sent == 3_363_840 and q.files_checked == 7
    r = parse_progress2("  10 100%  1.00kB/s  0:00:00 (xfr#1, ir-chk=1000/1200)")
    assert r is not None and r.files_total == 1200 and r.files_checked == 200
    assert parse_progress2("Number of files: 56 (reg: 52, dir: 3, link: 1)") is None
    assert parse_progress2("") is None


def test_parse_itemized_classifies_every_kind():
    out = "\n".join([
        "*deleting   0 old/gone.txt",
        "*deleting   0 old/",
        ".d..t...... 4096 ./",
        ">fcst...... 8 changed.txt",
        ">fc.t...... 8 same size, new bytes.txt",
        ".f...p..... 200 mode.sh",
        ".f..t...... 300 rebuilt.js",
        "cL+++++++++ 2 link",
        "cLc.t...... 5 retargeted",
        ">f+++++++++ 4 new file",
        "cd+++++++++ 4096 newdir/",
        "some warning from rsync",
    ])
    d = parse_itemized(out)
    assert [c.path for c in d.added] == ["link", "new file"]
    assert [c.path for c in d.changed] == ["changed.txt", "mode.sh", "retargeted",
                                           "same size, new bytes.txt"]
    assert [c.path for c in d.deleted] == ["old/gone.txt"]
    assert [(c.path, c.size) for c in d.touched] == [("rebuilt.js", 300)]
    assert d.stat()["added"] == {"files": 2, "bytes": 6}


@pytest.mark.skipif(not shutil.which("rsync"), reason="rsync not installed")
def test_rsync_and_python_comparisons_agree(tmp_path: Path):
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "d").mkdir(parents=True)
        for i in range(5):
            (root / "d" / f"f{i}").write_text(f"file {i}\n")
            os.utime(root / "d" / f"f{i}", (1000, 1000))
        (root / "keep.log").write_text(f"excluded {root.name}\n")
    (new / "d" / "f0").write_text("file X\n")  # same size
    os.utime(new / "d" / "f0", (1000, 1000))
    (new / "d" / "f1").unlink()
    (new / "d" / "f2").chmod(0o700)
    os.utime(new / "d" / "f3", (2000, 2000))
    (new / "added").write_text("+\n")
    os.symlink("d/f4", new / "ln")
    (old / "gone").mkdir()
    (old / "gone" / "x").write_text("xx\n")
    by_rsync = LocalTransport().compare(new, str(old), exclude=["*.log"])
    by_python = compare_trees(new, old, ["*.log"])
    assert by_rsync == by_python
    assert [c.path for c in by_python.added] == ["added", "ln"]
    assert [c.path for c in by_python.changed] == ["d/f0", "d/f2"]
    assert [(c.path, c.size) for c in by_python.deleted] == [("d/f1", 7), ("gone/x", 3)]
    assert [c.path for c in by_python.touched] == ["d/f3"]


def test_parse_since():
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("3d", now) == now - timedelta(days=3)
    assert parse_since("90s", now) == now - timedelta(seconds=90)
    assert parse_since("1w", now) == now - timedelta(weeks=1)
    assert parse_since("2026-01-31T10:00:00Z") == datetime(2026, 1, 31, 10, tzinfo=UTC)
    assert parse_since("2026-01-31T10:00+02:00") == datetime(2026, 1, 31, 8, tzinfo=UTC)
    local = parse_since("2026-01-31")
    assert local == datetime(2026, 1, 31).astimezone().astimezone(UTC)
    for bad in ("yesterday", "2h ago", "-3d", ""):
        with pytest.raises(UsageError):
            parse_since(bad)
    entries = [{"time": "2026-03-01T11:00:00Z"}, {"time": "2026-02-01T00:00:00Z"},
               {"time": "garbage"}, {}]
    assert since_filter(entries, now - timedelta(hours=2)) == entries[:1]


def test_durations_from_seconds_or_start_time():
    entries = [
        {"event": "deploy_started", "deploy_id": "a", "host": "w", "time": "2026-01-01T00:00:00Z"},
        {"event": "deploy_failed", "deploy_id": "a", "host": "w", "time": "2026-01-01T00:00:07Z"},
        {"event": "deploy_succeeded", "deploy_id": "b", "host": "w", "seconds": 2.5},
        {"event": "switched", "deploy_id": "b", "host": "w"},
    ]
    took = durations(entries)
    assert took == {id(entries[1]): 7.0, id(entries[2]): 2.5}


def test_webhook_body_and_url_display():
    n = Notice(event="deploy", status="rolled_back", app="shop", env="prod",
               release="20260101_000000", user="ann", origin="laptop", deploy_id="abc",
               duration=3.25, message="health check failed",
               hosts=[{"host": "web1", "status": "rolled_back", "error": None}])
    body = n.body()
    assert body["text"].startswith(":leftwards_arrow_with_hook: shop/prod: deploy "
                                   "20260101_000000 rolled back on 1 host by ann (3.2 s)")
    assert body["text"].endswith(": health check failed")
    for key in ("app", "env", "release", "status", "hosts", "user", "duration", "deploy_id"):
        assert key in body
    assert safe_url("https://hooks.slack.com/services/T0/B1/SECRET") == \
        "https://hooks.slack.com/..."
    assert "tok" not in safe_url("http://user:tok@127.0.0.1:8080/x?tok=1")


@pytest.mark.parametrize("app,hosts,deploy_to", [
    ("web", [], "./.deploy/web"),
    ("web.v2", ["deploy@web1.example.com", "[::1]:2222", "alias"], "/srv/web v2 'quoted'"),
    ("x", ["h"], '/srv/with "double" quotes\\and\\backslashes'),
])
def test_init_template_loads(tmp_path: Path, app: str, hosts: list[str], deploy_to: str):
    path = tmp_path / "switchover.toml"
    path.write_text(render(app, hosts, deploy_to, "dist"))
    cfg = load_file(path)
    env = resolve_environment(cfg, "production" if hosts else "local", path)
    assert cfg.config.app == app and [h.name for h in env.hosts] == hosts
    if hosts:
        assert env.deploy_to == deploy_to
    assert cfg.config.artifact.path == "dist" and cfg.config.notify.webhooks == []


def test_default_app_names():
    assert default_app(Path("/x/My Shop!")) == "My-Shop"
    assert default_app(Path("/x/.hidden")) == "hidden"
    assert default_app(Path("/x/~~~")) == "app"


def test_plain_reporter_writes_lines_and_logs_everything(tmp_path: Path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    out = Reporter("deploy", verbose=0)
    assert not out.fancy
    path = out.open_log(tmp_path / "logs", "deploy-demo-test")
    assert path is not None
    out.step("web1", "uploading")
    with out.activity("web1", "after_switch: restart"):
        pass
    with out.activity("web1", "quiet step", announce=False):
        pass
    out.trace("web1", "echo one\necho two")
    out.detail("web1", "hook output")
    with out.transfer("web1", 3, 10) as cb:
        assert cb is None  # off a terminal no progress is streamed
    out.close()
    shown = err.getvalue()
    assert shown.splitlines() == ["[deploy] web1: uploading",
                                  "[deploy] web1: after_switch: restart"]
    logged = path.read_text()
    for text in ("web1: uploading", "web1: quiet step", "web1: $ echo one", "web1: $ echo two",
                 "web1:   hook output"):
        assert text in logged
    out.step("web1", "after close: console only")  # a closed log is no error


@pytest.mark.parametrize("text", [
    "a\tb\tc", "x\r\ny", "bell\x07 bs\x08 vt\x0b ff\x0c", "esc\x1b[31mred", "日本\tx",
    "[bold]not markup[/]", ":smile: no emoji", "  spaced  ", "", "a\u0301\tb", "\u200b\tx",
    "\x00\tx", "\x7f\tx", "\xad\tx", "\U0001F600\tx",
])
def test_plain_lines_are_what_rich_writes_off_a_terminal(text: str, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    # Off a terminal lines bypass rich (not even imported); they must come out as rich's
    # unstyled console wrote them: control codes dropped, tabs at 8 cells, no markup.
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    r = Reporter("deploy")
    r.warn(text)
    r.result_line(text)
    r.error(text, hint=text)
    lines = [f"[deploy] warning: {text}", f"error: {text}"] + ([f"hint: {text}"] if text else [])
    assert err.getvalue() == "".join(_rich(line) for line in lines)
    assert out.getvalue() == _rich(f"[deploy] {text}")


def test_force_color_styles_the_result_line_off_a_terminal(monkeypatch):
    # As rich does with FORCE_COLOR; NO_COLOR still wins.
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    Reporter("deploy").result_line("live")
    assert "\x1b[" in out.getvalue() and "[deploy] live" in out.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    out.truncate(0)
    out.seek(0)
    Reporter("deploy").result_line("live")
    assert out.getvalue() == "[deploy] live\n"


def _rich(text: str) -> str:
    """What rich's console writes for an unstyled Text off a terminal."""
    from rich.console import Console
    from rich.text import Text

    f = io.StringIO()
    Console(file=f, highlight=False, soft_wrap=True, color_system=None).print(Text(text))
    return f.getvalue()


def test_prune_logs_keeps_the_newest(tmp_path: Path):
    for i in range(5):
        (tmp_path / f"2026010{i}-000000-deploy.log").write_text("")
    (tmp_path / "notes.txt").write_text("")
    prune_logs(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "20260103-000000-deploy.log", "20260104-000000-deploy.log", "notes.txt"]


def test_as_error_keeps_ours_names_the_host_and_wraps_the_rest():
    from switchover.errors import ExitCode, HostError, LockedError, SwitchoverError, as_error

    ours = LockedError("held by alice")
    assert as_error(ours, "web1") is ours and ours.host == "web1"
    named = LockedError("held", host="web2")
    assert as_error(named, "web1").host == "web2"  # a host it names already stays
    bug = as_error(KeyError("x"), "web3")
    assert type(bug) is SwitchoverError and bug.code == ExitCode.DEPLOY_FAILED
    assert bug.message == "KeyError: 'x'" and str(bug) == "web3: KeyError: 'x'"
    missing = as_error(FileNotFoundError("ssh"), "web4", HostError)
    assert missing.code == ExitCode.UNREACHABLE
