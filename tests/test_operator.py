"""Operator experience, end to end: dry-run, diff, webhooks, log files, history filters,
plain and terminal output, init, completion."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from project import Project, local_target

from switchover.config import load_file, resolve_environment

ANSI = re.compile(r"\x1b[\[\]()#;?]*[0-9;]*[A-Za-z]?")


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything about every entry under root except atime: a dry run must change none of it."""
    if not root.exists():
        return {}
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                             st.st_ctime_ns, st.st_ino, st.st_nlink, link)
    return out


def snapshot(project: Project) -> dict[str, dict[str, tuple[Any, ...]]]:
    project.settle()  # the last deploy's background work is not the dry run's doing
    return {h: tree(project.root(h)) for h in project.target.hosts}


def test_dry_run_changes_nothing_and_plans_exactly(project: Project):
    # Nothing deployed yet: no directory may appear, even an empty one.
    plan = project.json("deploy", "test", "--dry-run")
    assert plan["dry_run"] is True and plan["status"] == "planned"
    for h in project.target.hosts:
        assert not project.root(h).exists()
    row = plan["hosts"][0]
    assert row["live"] is None and row["changes"]["stat"]["added"]["files"] == 21
    project.write_config(top="keep_releases = 1\n",
                         sections='[hooks]\nbefore_switch = ["true"]\nafter_switch = ["true"]\n')
    project.ok("deploy", "test")
    first = project.current()
    (project.app / "index.html").write_text("v2 is longer\n")
    (project.app / "static" / "asset0.js").unlink()
    (project.app / "new.txt").write_text("new\n")
    project.ok("deploy", "test")
    second = project.current()
    (project.app / "index.html").write_text("v3\n")
    before = snapshot(project)

    r = project.ok("deploy", "test", "--dry-run")
    plan = project.json("deploy", "test", "--dry-run", "--check", "true")
    assert snapshot(project) == before  # byte for byte, inode for inode
    for h in project.target.hosts:
        assert project.current(h) == second and not project.locked(h)
    assert "nothing was changed" in r.stdout and f"{second} -> " in r.stdout
    assert plan["release"] > second and plan["release"] not in project.releases()
    assert plan["hooks"]["before_switch"] == ["true"]
    assert plan["checks"]["commands"] == ["true"]
    assert {row["host"] for row in plan["hosts"]} == set(project.target.hosts)
    for row in plan["hosts"]:
        assert row["live"] == second and row["rollback_target"] == first
        changes = row["changes"]
        assert [c["path"] for c in changes["changed"]] == ["index.html"]
        assert changes["added"] == [] and changes["deleted"] == []
        assert changes["stat"]["changed"] == {"files": 1, "bytes": 3}
        # keep_releases = 1: the new release stays, the old live one is the rollback target
        assert row["cleanup"] == [first]

    # a foreign lock: the plan says a deploy would stop, exit 4, the lock is left alone
    host = project.target.hosts[-1]
    lock = project.root(host) / ".switchover" / "lock"
    lock.mkdir()
    (lock / "owner.json").write_text('{"user": "alice", "origin": "laptop", "pid": 7}\n')
    before = snapshot(project)
    r = project.run("deploy", "test", "--dry-run")
    assert r.returncode == 4, r.stderr
    assert "alice@laptop" in r.stdout and "would stop" in r.stderr
    assert snapshot(project) == before


def test_diff_lists_exactly_the_changed_files(project: Project):
    project.write_config(sections='[shared]\ndirs = ["storage"]\n')
    (project.app / "storage").mkdir()
    (project.app / "storage" / "seed.txt").write_text("seed\n")
    project.ok("deploy", "test")
    static = project.app / "static"
    index = project.app / "index.html"
    mtime = index.stat().st_mtime_ns
    index.write_text("v9\n")  # same size, same mtime: only a checksum tells
    os.utime(index, ns=(mtime, mtime))
    (static / "new.js").write_text("// new\n")
    (static / "asset0.js").unlink()
    (static / "asset1.js").chmod(0o755)
    os.utime(static / "asset2.js", (1, 1))  # rebuilt: new mtime, same content
    (project.app / "storage" / "seed.txt").write_text("changed, but shared\n")

    doc = project.json("diff", "test")
    for row in doc["hosts"]:
        paths = {k: [c["path"] for c in row[k]] for k in ("added", "changed", "deleted", "touched")}
        assert paths == {"added": ["static/new.js"], "changed": ["index.html", "static/asset1.js"],
                         "deleted": ["static/asset0.js"], "touched": ["static/asset2.js"]}
        assert row["deleted"][0]["size"] == len("// asset 0\n" * 200)
        assert row["stat"]["added"] == {"files": 1, "bytes": 7}
    r = project.ok("diff", "test")
    out = r.stdout
    assert "+ static/new.js" in out and "M index.html" in out and "- static/asset0.js" in out
    assert "asset2.js" not in out  # an mtime alone is not shown without -v
    stat_doc = project.json("diff", "test", "--stat")
    assert "added" not in stat_doc["hosts"][0] and stat_doc["hosts"][0]["stat"]["deleted"][
        "files"] == 1
    assert "new.js" not in project.ok("diff", "test", "--stat").stdout
    assert project.events() == ["deploy_started", "switched", "deploy_succeeded"]


class Webhooks:
    """A real HTTP server on loopback that records what is POSTed to it."""

    def __init__(self) -> None:
        outer = self
        self.bodies: list[dict[str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                outer.bodies.append({"path": self.path,
                                     "content_type": self.headers.get("Content-Type"),
                                     "json": json.loads(self.rfile.read(length))})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/T0K3N"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhooks() -> Iterator[Webhooks]:
    w = Webhooks()
    yield w
    w.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/dead/SECRET-PATH"


@pytest.fixture
def local(tmp_path: Path) -> Project:
    return Project(tmp_path / "proj", local_target(tmp_path))


def test_webhooks_get_the_outcome_and_a_dead_one_only_warns(local: Project, webhooks: Webhooks):
    dead = closed_port_url()
    local.write_config(top=f"[notify]\nwebhooks = {json.dumps([webhooks.url, dead])}\n"
                           "timeout = 2\n")
    r = local.ok("deploy", "test", "-m", "ship it")
    live = local.current()
    assert "warning: webhook http://127.0.0.1:" in r.stderr
    assert "SECRET-PATH" not in r.stderr  # the URL's path is its token: never printed
    assert len(webhooks.bodies) == 1
    got = webhooks.bodies[0]
    assert got["path"] == "/hook/T0K3N" and got["content_type"] == "application/json"
    body = got["json"]
    assert body["event"] == "deploy" and body["status"] == "succeeded"
    assert body["app"] == "demo" and body["env"] == "test" and body["release"] == live
    assert body["hosts"] == [{"host": "localhost", "status": "succeeded", "error": None}]
    assert body["user"] and body["duration"] > 0
    assert body["deploy_id"] == local.history()[-1]["deploy_id"]
    assert "demo/test" in body["text"] and live in body["text"] and "succeeded" in body["text"]

    r = local.run("deploy", "test", "--check", "false")
    assert r.returncode == 1
    body = webhooks.bodies[-1]["json"]
    assert body["status"] == "rolled_back" and "health check failed" in body["message"]
    assert body["hosts"][0]["status"] == "rolled_back"

    (local.app / "index.html").write_text("v2\n")
    local.ok("deploy", "test")
    local.ok("rollback", "test")
    body = webhooks.bodies[-1]["json"]
    assert body["event"] == "rollback" and body["status"] == "rolled_back"
    assert body["release"] == live == local.current()
    assert len(webhooks.bodies) == 4

    # an environment's own [notify] replaces the top-level one
    local.write_config(top=f"[notify]\nwebhooks = {json.dumps([webhooks.url])}\n",
                       env_extra=f"[environments.test.notify]\nwebhooks = {json.dumps([dead])}\n")
    r = local.ok("deploy", "test")
    assert len(webhooks.bodies) == 4 and "warning: webhook" in r.stderr


def test_log_file_has_the_full_trace_and_is_named_on_failure(local: Project, tmp_path: Path):
    logs = tmp_path / "logs"
    env = {"SWITCHOVER_LOG_DIR": str(logs)}
    local.ok("deploy", "test", env=env)
    r = local.run("deploy", "test", "--check", "false", env=env)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    m = re.search(r"full log: (\S+\.log)$", last)
    assert m, last
    path = Path(m.group(1))
    assert path.parent == logs and stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    lines = text.splitlines()
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", ln) for ln in lines)
    assert "localhost: $ mkdir -p" in text  # the scripts themselves (-vv level), unasked
    assert "health check failed" in text and "rolled back" in text
    assert local.history()[-1]["deploy_id"] in text
    assert len(list(logs.glob("*.log"))) == 2

    # a log that cannot be written is a warning, not a failed deploy
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    r = local.ok("deploy", "test", env={"SWITCHOVER_LOG_DIR": str(blocker / "logs")})
    assert "no log file for this run" in r.stderr and "is live on" in r.stdout


def test_plain_output_has_no_escape_codes_and_json_is_unchanged(local: Project):
    project = local  # nothing here depends on the transport
    runs = [
        project.run("-v", "deploy", "test"),
        project.run("deploy", "test", "--check", "false"),
        project.run("status", "test"),
        project.run("releases", "test"),
        project.run("history", "test"),
        project.run("diff", "test"),
        project.run("deploy", "test", "--dry-run"),
    ]
    for r in runs:
        assert not ANSI.search(r.stdout + r.stderr), r.args
    assert runs[0].returncode == 0 and runs[1].returncode == 1
    # -v: timestamps on the progress lines
    assert re.search(r"^\d\d:\d\d:\d\d \[deploy\] ", runs[0].stderr, re.M)
    assert "[deploy] " in runs[1].stderr and "rolled back" in runs[1].stdout + runs[1].stderr
    # -vv: the scripts each host runs
    r = project.run("-vv", "status", "test")
    assert f"{project.target.hosts[0]}: $ echo @@switchover:current" in r.stderr

    # --json: exactly one document on stdout, the same shape with every new feature on
    plain = project.json("deploy", "test")
    project.write_config(top=f'[notify]\nwebhooks = ["{closed_port_url()}"]\ntimeout = 1\n')
    r = project.run("--json", "-vv", "deploy", "test")
    assert r.returncode == 0
    loud = json.loads(r.stdout)
    assert set(loud) == set(plain)
    assert [set(h) for h in loud["hosts"]] == [set(h) for h in plain["hosts"]]
    assert "warning: webhook" in r.stderr and not ANSI.search(r.stdout + r.stderr)


def test_history_filters_and_table(project: Project):
    project.ok("deploy", "test")
    first_host = project.target.hosts[0]
    old = {"time": "2020-01-01T00:00:00Z", "event": "deploy_succeeded", "host": first_host,
           "release": "20200101_000000", "user": "old", "deploy_id": "x", "seconds": 4.5}
    hist = project.root() / ".switchover" / "history.jsonl"
    hist.write_text(json.dumps(old) + "\n" + hist.read_text())
    everything = project.json("history", "test")
    assert everything[0]["user"] == "old"
    recent = project.json("history", "test", "--since", "1d")
    assert len(recent) == len(everything) - 1 and all(e["user"] != "old" for e in recent)
    assert len(project.json("history", "test", "--since", "2019-12-31")) == len(everything)
    assert project.json("history", "test", "--since", "2020-01-01T00:00:01Z", "--limit", "2") \
        == everything[-2:]
    mine = project.json("history", "test", "--host", first_host)
    assert mine and {e["host"] for e in mine} == {first_host}
    r = project.ok("history", "test")
    header = r.stdout.splitlines()[1]
    for column in ("time", "host", "event", "release", "user", "duration", "message"):
        assert column in header
    assert "4.5 s" in r.stdout
    bad = project.run("history", "test", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr


def run_sw(cwd: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    full.pop("SWITCHOVER_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "switchover", *args], cwd=cwd, env=full,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_init_writes_a_config_that_loads_and_deploys(tmp_path: Path):
    work = tmp_path / "my app!"
    (work / "dist").mkdir(parents=True)
    (work / "dist" / "index.html").write_text("hi\n")
    r = run_sw(work, "init")
    assert r.returncode == 0, r.stderr
    cfg_path = work / "switchover.toml"
    text = cfg_path.read_text()
    assert text.count("\n#") > 10  # commented
    cfg = load_file(cfg_path)
    assert cfg.config.app == "my-app" and cfg.config.artifact.path == "dist"
    env = resolve_environment(cfg, "local", cfg_path)
    assert env.deploy_to == str(work / ".deploy" / "my-app")
    r = run_sw(work, "deploy", "local")
    assert r.returncode == 0 and "is live on" in r.stdout, r.stderr

    # never overwritten without --force
    r = run_sw(work, "init", "--app", "other")
    assert r.returncode == 2 and "--force" in r.stderr and cfg_path.read_text() == text
    r = run_sw(work, "-c", "fleet.toml", "--json", "init", "--app", "web", "--host",
               "deploy@web1.example.com", "--host", "web2:2222", "--deploy-to", "/srv/web",
               "--artifact", "build")
    assert r.returncode == 0 and json.loads(r.stdout)["path"] == "fleet.toml"
    fleet = load_file(work / "fleet.toml")
    prod = resolve_environment(fleet, "production", work / "fleet.toml")
    assert [h.name for h in prod.hosts] == ["deploy@web1.example.com", "web2:2222"]
    assert prod.deploy_to == "/srv/web" and fleet.config.app == "web"
    r = run_sw(work, "init", "--force", "--app", "bad name")
    assert r.returncode == 2 and cfg_path.read_text() == text
    r = run_sw(work, "init", "--force", "--app", "again")
    assert r.returncode == 0 and load_file(cfg_path).config.app == "again"


def test_completion_script_and_environment_names(local: Project):
    r = run_sw(local.dir, "completion", "bash")
    assert r.returncode == 0 and "_SWITCHOVER_COMPLETE" in r.stdout
    assert r.stdout.startswith("# switchover completion for bash")
    for shell in ("zsh", "fish"):
        assert "_SWITCHOVER_COMPLETE" in run_sw(local.dir, "completion", shell).stdout
    # what the installed script asks for when TAB is pressed after `deploy `
    done = run_sw(local.dir, env={"_SWITCHOVER_COMPLETE": "bash_complete",
                                  "COMP_WORDS": "switchover deploy ", "COMP_CWORD": "2",
                                  "SWITCHOVER_CONFIG": str(local.config)})
    assert "plain,test" in done.stdout.splitlines()
    cmds = run_sw(local.dir, env={"_SWITCHOVER_COMPLETE": "bash_complete",
                                  "COMP_WORDS": "switchover di", "COMP_CWORD": "1"})
    assert "plain,diff" in cmds.stdout.splitlines()


def read_pty(argv: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str]:
    """Run argv with stdout and stderr on a pseudo-terminal; return (exit code, all output)."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    for name in ("NO_COLOR", "SWITCHOVER_CONFIG", "FORCE_COLOR"):
        env.pop(name, None)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_terminal_gets_colours_spinners_and_plain_text_with_no_color(local: Project):
    local.write_config(sections='[hooks]\nbefore_switch = ["sleep 1"]\n')
    argv = [sys.executable, "-m", "switchover", "-c", str(local.config), "deploy", "test"]
    code, out = read_pty(argv, local.dir)
    assert code == 0, out
    assert "\x1b[32m" in out or "\x1b[1;32m" in out  # green: it passed
    assert "\x1b[?25l" in out  # the live display hid the cursor for its spinner...
    assert "before_switch: sleep 1" in out
    assert re.search(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏].*before_switch: sleep 1", out)  # ...a spinner frame
    assert "is live on 1 host" in ANSI.sub("", out)

    code, out = read_pty(["env", "NO_COLOR=1", *argv], local.dir)
    assert code == 0 and "\x1b" not in out, out
    assert "[deploy] localhost: before_switch: sleep 1" in out


def test_upload_progress_display_on_a_terminal(tmp_path: Path):
    # The Reporter's upload bar fed by a real rsync through LocalTransport, on a pty.
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(64 * 1024))
    script = f"""
import time
from pathlib import Path
from switchover.output import Reporter
from switchover.transport import LocalTransport
from switchover.transport.progress import SyncProgress
out = Reporter("deploy")
assert out.fancy
seen = []
with out.transfer("web1", 40, 40 * 65536) as cb:
    def slow(p: SyncProgress) -> None:
        seen.append(p)
        cb(p)
        time.sleep(0.01)
    stats = LocalTransport().sync(Path({str(src)!r}), {str(tmp_path / 'dest')!r},
                                  link_dest=None, exclude=[], progress=slow)
    time.sleep(0.3)  # let the display draw its final state
out.close()
last = seen[-1]
assert last.files_total == last.files_checked == 41, last
assert last.bytes_sent == 40 * 65536 and last.files_sent == 40, last
assert stats.files_transferred == 40
print("PROGRESS-OK")
"""
    code, out = read_pty([sys.executable, "-c", script], tmp_path)
    assert code == 0 and "PROGRESS-OK" in out, out
    text = ANSI.sub("", out)
    assert "web1: upload" in text and "files" in text and "ETA" in text
    assert "━" in out  # the bar


def test_ssh_upload_streams_progress(ssh_fleet, tmp_path: Path):
    from switchover.hosts import parse_host
    from switchover.transport import SshOptions, SshTransport

    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(10):
        (src / "sub" / f"f{i}").write_bytes(bytes([i]) * 50_000)
    host = ssh_fleet.hosts[0]
    t = SshTransport(parse_host(host.alias), SshOptions(ssh_config=ssh_fleet.ssh_config))
    seen = []
    try:
        t.connect()
        dest = f"{host.remote_root}/{tmp_path.name}"
        stats = t.sync(src, dest, link_dest=None, exclude=[], progress=seen.append)
    finally:
        t.close()
    assert stats.files_transferred == 10
    assert seen and seen[-1].bytes_sent == 500_000 and seen[-1].files_sent == 10
    assert seen[-1].files_checked == seen[-1].files_total == 12  # 10 files, 2 dirs
    assert [p.bytes_sent for p in seen] == sorted(p.bytes_sent for p in seen)
    assert (host.local_path(dest) / "sub" / "f3").read_bytes() == bytes([3]) * 50_000


def test_init_asks_on_a_terminal(tmp_path: Path):
    import pty

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "SWITCHOVER_CONFIG"}
    proc = subprocess.Popen([sys.executable, "-m", "switchover", "init"], cwd=tmp_path,
                            env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def expect(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while text not in seen and time.monotonic() < deadline:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
        assert text in seen, seen.decode(errors="replace")

    try:
        for prompt, answer in ((b"app name", b"shop"), (b"hosts", b"deploy@web1, web2:2222"),
                               (b"deploy_to [/srv/shop]", b""), (b"artifact", b"out")):
            expect(prompt)
            os.write(master, answer + b"\n")
        expect(b"wrote switchover.toml")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    cfg = load_file(tmp_path / "switchover.toml")
    env_ = resolve_environment(cfg, "production", tmp_path / "switchover.toml")
    assert cfg.config.app == "shop" and cfg.config.artifact.path == "out"
    assert [h.name for h in env_.hosts] == ["deploy@web1", "web2:2222"]
    assert env_.deploy_to == "/srv/shop"


def test_dry_run_agrees_with_deploy_about_a_stale_lock(project):
    """A lock whose owner (elsewhere) went silent past lock_timeout is taken over by
    deploy, so the dry run must not report it as blocking."""
    import time as _time

    project.ok("deploy", "test")
    live = project.current()
    for host in project.target.hosts:
        lock = project.root(host) / ".switchover" / "lock"
        lock.mkdir()
        (lock / "owner.json").write_text(json.dumps(
            {"user": "alice", "origin": "gone-laptop", "pid": 4242,
             "time": "2026-01-01T00:00:00Z", "deploy_id": "feedface"}) + "\n")
        (lock / "heartbeat").write_text(f"{int(_time.time()) - 3600}\n")
    plan = project.json("deploy", "test", "--dry-run")
    assert all(project.locked(h) for h in project.target.hosts)  # the dry run took nothing
    assert project.current() == live
    assert plan  # one document, and exit 0 (project.json checks the code)
    project.ok("deploy", "test")  # and the real deploy takes the stale lock over
    assert not any(project.locked(h) for h in project.target.hosts)
