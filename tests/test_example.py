"""The bundled example deploys and serves, as the README's first command shows."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as r:
        return r.read().decode()


@pytest.fixture
def hello(tmp_path):
    work = tmp_path / "hello"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns(".deploy", "__pycache__"))
    port = free_port()
    cfg = work / "switchover.toml"
    cfg.write_text(cfg.read_text().replace("8089", str(port)))
    env = {**os.environ, "HELLO_PORT": str(port)}
    env.pop("SWITCHOVER_CONFIG", None)

    def sw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "switchover", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)

    yield work, port, sw
    current = work / ".deploy/hello/current/ctl.py"
    if current.exists():
        subprocess.run([sys.executable, str(current), "stop"], env=env, timeout=30)


def test_example_deploys_serves_redeploys_and_rolls_back(hello):
    work, port, sw = hello
    r = sw("deploy", "local")
    assert r.returncode == 0, r.stderr
    first = get(f"http://127.0.0.1:{port}/version").strip()
    assert "Hello from switchover" in get(f"http://127.0.0.1:{port}/")
    assert get(f"http://127.0.0.1:{port}/health").startswith("ok")

    (work / "app" / "VERSION").write_text("2\n")
    r = sw("deploy", "local")
    assert r.returncode == 0, r.stderr
    second = get(f"http://127.0.0.1:{port}/version").strip()
    assert second != first and "Version <strong>2</strong>" in get(f"http://127.0.0.1:{port}/")

    r = sw("rollback", "local")
    assert r.returncode == 0, r.stderr
    assert get(f"http://127.0.0.1:{port}/version").strip() == first
