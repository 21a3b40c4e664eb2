"""Start-up cost: a command loads only the modules it uses.

Every command pays for its imports before it does anything; these tests pin down that
--version and --help load no config models and no rich, and that a deploy loads none of
the other commands' code, no urllib without a URL check or webhook, and no live display
off a terminal. Each run is a fresh interpreter (the test process has imported it all).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Runs the CLI like `python -m switchover ARGS`, then prints the modules it had loaded.
PROBE = textwrap.dedent("""
    import json, sys
    from switchover.cli import main
    try:
        main(sys.argv[1:], prog_name="switchover")
    except SystemExit as e:
        code = e.code
    with open(sys.argv[0] + ".modules", "w") as f:
        json.dump({"modules": sorted(sys.modules), "code": code}, f)
""")

EVERY_COMMAND = {"msgspec", "rich", "switchover.config", "switchover.deploy",
                 "switchover.manage", "switchover.plan", "switchover.notify",
                 "switchover.histview", "switchover.scaffold", "urllib.request"}


def _run(tmp_path: Path, *args: str) -> dict:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    r = subprocess.run([sys.executable, str(probe), *args], capture_output=True, text=True,
                       cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(Path(f"{probe}.modules").read_text())
    doc["stdout"], doc["stderr"] = r.stdout, r.stderr
    return doc


def _project(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "index.html").write_text("hello\n")
    cfg = tmp_path / "switchover.toml"
    cfg.write_text('app = "demo"\n[artifact]\npath = "dist"\n'
                   '[environments.local]\ndeploy_to = ".deploy/demo"\n' + extra)
    return cfg


def test_version_and_help_load_no_config_and_no_rich(tmp_path: Path) -> None:
    for args in (["--version"], ["--help"], ["deploy", "--help"], ["diff", "--help"]):
        doc = _run(tmp_path, *args)
        assert doc["code"] in (0, None), (args, doc["stderr"])
        assert not EVERY_COMMAND & set(doc["modules"]), args
    assert "0." in _run(tmp_path, "--version")["stdout"]


def test_deploy_loads_only_what_it_uses(tmp_path: Path) -> None:
    _project(tmp_path)
    doc = _run(tmp_path, "deploy", "local")
    assert doc["code"] == 0, doc["stderr"]
    loaded = set(doc["modules"])
    assert {"switchover.config", "switchover.deploy"} <= loaded
    # Off a terminal the lines are written plain: no rich at all (~30 ms of start-up).
    unused = {"switchover.manage", "switchover.plan", "switchover.notify",
              "switchover.histview", "switchover.scaffold", "switchover.verify",
              "urllib.request", "http.client", "rich"}
    assert not unused & loaded


# Records the modules loaded when the first `ssh` process starts, then runs the CLI.
SSH_PROBE = textwrap.dedent("""
    import json, sys
    seen = []
    def hook(event, args):
        if event == "subprocess.Popen" and not seen and args[1][:1] == ["ssh"]:
            seen.append(sorted(sys.modules))
    sys.addaudithook(hook)
    from switchover.cli import main
    try:
        main(sys.argv[1:], prog_name="switchover")
    except SystemExit as e:
        code = e.code
    with open(sys.argv[0] + ".modules", "w") as f:
        json.dump({"at_ssh": seen[0] if seen else None, "code": code}, f)
""")


def test_deploy_starts_ssh_before_the_output_and_deploy_code_load(tmp_path: Path) -> None:
    # The logins overlap the rest of start-up (the host code, rich, the deploy code, the
    # artifact scan): each of these loaded first would delay every host's connection by
    # its import time.
    cfg = _project(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: the deploy fails, quickly
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.write_text(cfg.read_text() + textwrap.dedent(f"""
        [environments.remote]
        hosts = ["root@127.0.0.1:{port}"]
        deploy_to = "/srv/demo"
    """))
    probe = tmp_path / "probe.py"
    probe.write_text(SSH_PROBE)
    r = subprocess.run([sys.executable, str(probe), "deploy", "remote"], capture_output=True,
                       text=True, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=60)
    doc = json.loads(Path(f"{probe}.modules").read_text())
    assert doc["code"] == 3, r.stderr  # could not connect
    assert doc["at_ssh"] is not None, r.stderr
    early = set(doc["at_ssh"])
    assert {"switchover.config", "switchover.session"} <= early
    assert not {"rich", "switchover.output", "switchover.deploy", "switchover.artifact",
                "tarfile", "switchover.hostops", "switchover.clonepatch"} & early


def test_deploy_with_webhook_and_url_check_loads_urllib(tmp_path: Path) -> None:
    # A webhook that cannot answer: a warning, never a failure (notify.py).
    _project(tmp_path, '[notify]\nwebhooks = ["http://127.0.0.1:9/hook"]\ntimeout = 1\n')
    doc = _run(tmp_path, "deploy", "local")
    assert doc["code"] == 0, doc["stderr"]
    assert {"switchover.notify", "urllib.request"} <= set(doc["modules"])
    assert "webhook http://127.0.0.1:9/... failed" in doc["stderr"]


# One class per section, for the top level and the environments' overrides alike: an
# environment's section must still override key by key, exactly the keys it sets, under
# the same rules.


def test_environment_section_overrides_exactly_the_keys_it_sets(tmp_path: Path) -> None:
    from switchover.config import load_environment

    cfg = _project(tmp_path, textwrap.dedent("""
        [environments.local.health]
        timeout = 10.0
        [environments.local.notify]
        webhooks = []
        [environments.local.secrets]
        from_env = ["TOKEN"]
    """))
    cfg.write_text(cfg.read_text().replace(
        "[artifact]", '[health]\ntimeout = 30.0\nretries = 7\n'
        '[notify]\nwebhooks = ["https://example.com/hook"]\ntimeout = 2.0\n[artifact]'))
    env = load_environment(cfg, "local")
    assert env.health.timeout == 10.0  # set to the default value: still an override
    assert env.health.retries == 7  # not set: inherited, not reset to the default
    assert env.notify.webhooks == [] and env.notify.timeout == 2.0
    assert env.secrets.from_env == ["TOKEN"] and env.secrets.env_file is None


def test_environment_sections_are_checked_like_the_top_level(tmp_path: Path) -> None:
    from switchover.config import load_environment
    from switchover.errors import ConfigError

    for section, line, message in (
        ("health", 'urls = ["ftp://x"]', "environments.local.health.urls"),
        ("shared", 'files = ["../x"]', "environments.local.shared.files"),
        ("secrets", 'from_env = ["A", "A"]', "a name is listed more than once"),
        ("notify", 'webhooks = ["x"]', "webhooks must be http:// or https:// URLs"),
        ("hooks", "after_switch = 'true'", "environments.local.hooks.after_switch"),
        ("health", "retries = -1", "environments.local.health.retries"),
        ("health", "retry = 1", "unknown key (a typo?)"),
    ):
        d = tmp_path / f"{section}{abs(hash(line))}"
        d.mkdir()
        cfg = _project(d, f"[environments.local.{section}]\n{line}\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_environment(cfg, "local")


def test_a_command_run_in_process_leaves_the_garbage_collector_alone(tmp_path: Path) -> None:
    # gc.freeze() is for the interpreter's exit only: code that runs commands in-process
    # (tests, a wrapper) must keep collecting its garbage as usual.
    cfg = _project(tmp_path)
    probe = tmp_path / "gcprobe.py"
    probe.write_text(textwrap.dedent(f"""
        import atexit, gc, sys
        # Registered first, so it runs last: after the freeze the commands ask for.
        atexit.register(lambda: print("at exit", gc.get_freeze_count() > 0))
        from switchover.cli import main
        for _ in range(2):
            try:
                main(["-c", {str(cfg)!r}, "status", "local"], prog_name="switchover")
            except SystemExit as e:
                assert e.code == 0, e.code
        print("frozen", gc.get_freeze_count())
    """))
    r = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("frozen", "at exit"))]
    assert lines == ["frozen 0", "at exit True"], r.stdout
