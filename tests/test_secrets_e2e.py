"""Secrets over real sshd hosts: on each host in shared/.env (0600), nowhere else.

"Nowhere else" is checked where a leak would land: stdout and stderr with -v and --json,
the history and the lock on every host, and the argument list of every process on this
machine (the hosts' processes included: the test sshds share its PID view), sampled from
/proc while the deploy runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from project import Project, ssh_target

from switchover.secrets import dotenv_value

# Values that would break naive quoting anywhere they went: a shell, JSON, a dotenv file.
FILE_SECRET = "fs-7Hq2 $(touch /tmp/pwned) `id`; x"
ENV_SECRET = "es-Kp91 'single' \"double\" ; ls \\ é"
MULTI_SECRET = "BEGIN-Xy7\nmiddle-line-Qw3\nEND-Zz8"
MESSAGE_SECRET = "ms-Lo0-typed-on-the-command-line"
SECRETS = [FILE_SECRET, ENV_SECRET, "middle-line-Qw3", MESSAGE_SECRET]


@pytest.fixture
def sshp(ssh_fleet, tmp_path) -> Project:
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    return Project(tmp_path / "proj", ssh_target(ssh_fleet, tmp_path.name, hosts=2))


def _with_secrets(p: Project, **sections: str) -> bytes:
    """Configure [secrets] and hooks; returns the .env content the hosts must get."""
    env_file = p.dir / ".env.test"
    text = (f"DB_PASSWORD='{FILE_SECRET}'\n"
            f'CERT="{MULTI_SECRET}"\n'
            f"MESSAGE_SECRET={MESSAGE_SECRET}\n")
    env_file.write_text(text)
    env_file.chmod(0o600)
    hooks = "".join(f"{k} = {json.dumps([v])}\n" for k, v in sections.items())
    p.write_config(top='[secrets]\nenv_file = ".env.test"\nfrom_env = ["API_KEY"]\n'
                       f"[hooks]\n{hooks}")
    return (text + f"API_KEY={dotenv_value(ENV_SECRET)}\n").encode()


class _Sampler:
    """Every process's argv (and the lock files) every ~20 ms while a command runs."""

    def __init__(self, lock_files: list[Path]) -> None:
        self.lock_files = lock_files
        self.argvs: set[bytes] = set()
        self.locks: set[bytes] = set()
        self.rounds = 0
        self._stop = threading.Event()

    def _round(self) -> None:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    self.argvs.add(f.read())  # OSError: the process ended meanwhile
        for lock in self.lock_files:
            with suppress(OSError):
                self.locks.add(lock.read_bytes())

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline and self.rounds < 6000:
            self._round()
            self.rounds += 1
            self._stop.wait(0.02)

    @contextmanager
    def running(self) -> Iterator[_Sampler]:
        t = threading.Thread(target=self.run, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self._stop.set()
            t.join(timeout=10)


def _assert_absent(where: str, data: str | bytes, secrets: list[str] = SECRETS) -> None:
    for s in secrets:
        needle = s.encode() if isinstance(data, bytes) else s
        assert needle not in data, f"secret {s!r} leaked into {where}"


def test_deploy_with_secrets_over_ssh_leaks_nothing(sshp: Project, tmp_path: Path):
    expected = _with_secrets(
        sshp,
        # hooks that print every secret: the output must reach the operator masked
        after_switch='cat .env; . ./.env && printf "%s\\n" "$API_KEY" "$DB_PASSWORD"',
    )
    locks = [sshp.root(h) / ".switchover" / "lock" / "owner.json" for h in sshp.target.hosts]
    sampler = _Sampler(locks)
    with sampler.running():
        r = sshp.run("-v", "--json", "deploy", "test", "--check", ". ./.env && echo $API_KEY",
                     "-m", f"deployed with {MESSAGE_SECRET}",
                     env={"API_KEY": ENV_SECRET, "SWITCHOVER_LOG_DIR": str(tmp_path / "logs")})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "succeeded"
    _assert_absent("stdout", r.stdout)
    _assert_absent("stderr", r.stderr)
    assert "after_switch" in r.stderr and "***" in r.stderr  # the hook did print them
    # the run's local log file (the full -vv trace), if this build writes one
    logs = [f for f in (tmp_path / "logs").rglob("*") if f.is_file()]
    if importlib.util.find_spec("switchover.runlog") is not None:
        assert logs, "no log file was written"
    for f in logs:
        _assert_absent(f"the log file {f.name}", f.read_text(errors="replace"))

    # the sampler watched the whole run (the ssh ControlMasters live through it)
    assert sampler.rounds >= 5
    assert any(b"ControlMaster=yes" in a for a in sampler.argvs)
    for argv in sampler.argvs:
        # MESSAGE_SECRET is on the test's own `switchover -m` command line, by the operator's
        # hand; every process switchover starts must be free of all of them.
        own = argv.split(b"\0")[1:3] == [b"-m", b"switchover"]
        _assert_absent(f"a process's argv: {argv[:200]!r}", argv,
                       SECRETS[:-1] if own else SECRETS)
    assert sampler.locks, "the lock was never seen while the deploy ran"
    for lock in sampler.locks:
        _assert_absent("the lock", lock)

    for h in sshp.target.hosts:
        root = sshp.root(h)
        env = root / "shared" / ".env"
        assert stat.S_IMODE(env.stat().st_mode) == 0o600
        assert env.read_bytes() == expected
        assert [p.name for p in (root / "shared").iterdir()] == [".env"]  # no temp file left
        release = root / "releases" / doc["release"]
        assert os.readlink(release / ".env") == "../../shared/.env"
        history = (root / ".switchover" / "history.jsonl").read_text()
        _assert_absent("the history", history)
        assert sshp.history(h)[0]["message"] == "deployed with ***"
        assert not sshp.locked(h)


def test_failing_hook_that_prints_a_secret_is_masked_everywhere(sshp: Project):
    _with_secrets(sshp, before_switch='. ./.env && echo "failed with $API_KEY" && exit 1')
    r = sshp.run("--json", "deploy", "test", env={"API_KEY": ENV_SECRET})
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    errors = [h["error"] for h in doc["hosts"]]
    assert all(e and "failed with ***" in e for e in errors), errors
    _assert_absent("stdout", r.stdout)
    _assert_absent("stderr", r.stderr)
    for h in sshp.target.hosts:
        assert sshp.current(h) is None
        failed = [e for e in sshp.history(h) if e["event"] == "deploy_failed"]
        assert failed and "failed with ***" in failed[0]["message"]
        _assert_absent("the history", (sshp.root(h) / ".switchover/history.jsonl").read_text())


def test_missing_from_env_variable_is_exit_2_before_any_host_is_touched(sshp: Project):
    _with_secrets(sshp)
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    r = sshp.run("deploy", "test", env=env)
    assert r.returncode == 2
    assert "secrets.from_env" in r.stderr and "API_KEY" in r.stderr
    for h in sshp.target.hosts:
        assert not sshp.root(h).exists()


def test_group_readable_secrets_file_is_refused(sshp: Project):
    _with_secrets(sshp)
    (sshp.dir / ".env.test").chmod(0o640)
    r = sshp.run("deploy", "test", env={"API_KEY": ENV_SECRET})
    assert r.returncode == 2
    assert "secrets.env_file" in r.stderr and "too open" in r.stderr and "chmod 600" in r.stderr
    for h in sshp.target.hosts:
        assert not sshp.root(h).exists()
