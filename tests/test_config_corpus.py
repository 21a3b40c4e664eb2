"""A corpus of malformed configs and arguments, run through the CLI against a real host.

Each case starts from a config that deploys fine to a real sshd host (checked by the first
case) and breaks one thing. Every one must exit 2 with a message naming the file or option
and the key, before the host is touched: its deploy_to never appears. Complements
tests/unit/test_config.py, which checks the loader directly; the cases here are others.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class Case:
    expected: list[str]  # substrings of stderr (the key, the file, what is wrong)
    change: Callable[[str], str] = lambda text: text  # edits the good config's text
    args: tuple[str, ...] = ("deploy", "test")
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # name: (text, mode)
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def add(snippet: str) -> Callable[[str], str]:
    return lambda text: text + "\n" + snippet + "\n"


def sub(old: str, new: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return change


def env_key(line: str) -> Callable[[str], str]:
    """Add a key to [environments.test] (which ends at the next table)."""
    return sub("[environments.test]\n", f"[environments.test]\n{line}\n")


PRIVATE = 0o600
CASES: dict[str, Case] = {
    "the good config deploys": Case([], code=0),
    "duplicate key": Case(["switchover.toml", "not valid TOML", "line"],
                          sub('app = "demo"', 'app = "demo"\napp = "again"')),
    "unclosed table header": Case(["not valid TOML"], add("[environments.test.health")),
    "not UTF-8": Case(["switchover.toml", "not valid TOML"], add("# caf\udce9")),
    "unknown section": Case(["helth", "unknown key"], add("[helth]\nretries = 1")),
    "unknown environment key": Case(["environments.test.deploy_too", "unknown key"],
                                    env_key('deploy_too = "/srv/x"')),
    "hosts not a list": Case(["environments.test.hosts"], sub('hosts = ["web1"]',
                                                             'hosts = "web1"')),
    "hook not a list": Case(["hooks.after_switch"], add('[hooks]\nafter_switch = "echo"')),
    "float for an int": Case(["keep_releases"], sub('app = "demo"',
                                                    'app = "demo"\nkeep_releases = 2.5')),
    "bool for an int": Case(["parallel"], sub('app = "demo"', 'app = "demo"\nparallel = true')),
    "negative parallel": Case(["environments.test.parallel", "greater than or equal to 1"],
                              env_key("parallel = -1")),
    "zero timeout": Case(["timeout", "greater than 0"],
                         sub('app = "demo"', 'app = "demo"\ntimeout = 0')),
    "negative retries": Case(["health.retries"], add("[health]\nretries = -1")),
    "negative interval in an override": Case(["environments.test.health.interval"],
                                             add("[environments.test.health]\ninterval = -0.5")),
    "string for a number": Case(["health.timeout"], add('[health]\ntimeout = "10"')),
    "host with shell metacharacters": Case(["environments.test.hosts", "web1;touch"],
                                           sub('"web1"', '"web1;touch /tmp/swo-pwned"')),
    "host that is an ssh option": Case(["environments.test.hosts", "-oProxyCommand"],
                                       sub('"web1"', '"-oProxyCommand=touch /tmp/swo-pwned"')),
    "user with command substitution": Case(["environments.test.hosts", "not a valid user"],
                                           sub('"web1"', '"$(id)@web1"')),
    "host listed twice": Case(["environments.test.hosts", "more than once"],
                              sub('["web1"]', '["web1", "web1"]')),
    "deploy_to a system dir": Case(["environments.test.deploy_to", "system directory"],
                                   lambda t: re.sub(r'deploy_to = ".*"', 'deploy_to = "/var"', t)),
    "deploy_to dot-dot into /etc": Case(["environments.test.deploy_to", "system directory"],
                                        lambda t: re.sub(r'deploy_to = ".*"',
                                                         'deploy_to = "/srv/../etc"', t)),
    "deploy_to with a newline": Case(["environments.test.deploy_to", "newlines"],
                                     lambda t: re.sub(r'deploy_to = "(.*)"',
                                                      r'deploy_to = "\1\\n/etc"', t)),
    "deploy_to relative on a remote host": Case(["environments.test.deploy_to", "absolute"],
                                                lambda t: re.sub(r'deploy_to = ".*"',
                                                                 'deploy_to = "srv/app"', t)),
    "missing ssh_config": Case(["environments.test.ssh_config", "does not exist"],
                               lambda t: re.sub(r'ssh_config = ".*"',
                                                'ssh_config = "nope/ssh_config"', t)),
    "group-readable identity_file": Case(
        ["environments.test.identity_file", "permissions 0640", "too open"],
        env_key('identity_file = "id_test"'), files={"id_test": ("key\n", 0o640)}),
    "absolute shared dir": Case(["shared.dirs", "relative path"], add('[shared]\ndirs = ["/etc"]')),
    "shared file escaping in an override": Case(
        ["environments.test.shared.files", "without '..'"],
        add('[environments.test.shared]\nfiles = ["config/../../x"]')),
    "exclude not a list": Case(["artifact.exclude"], sub('path = "app"',
                                                         'path = "app"\nexclude = ".git"')),
    "app name too long": Case(["app", "at most 64"], sub('app = "demo"', f'app = "{"a" * 65}"')),
    "URL scheme in an override": Case(["environments.test.health.urls", "file:///etc/passwd"],
                                      add('[environments.test.health]\n'
                                          'urls = ["file:///etc/passwd"]')),
    "unknown secrets key": Case(["secrets.envfile", "unknown key"],
                                add('[secrets]\nenvfile = ".env.test"')),
    "bad from_env name": Case(["secrets.from_env", "not an environment variable name"],
                              add('[secrets]\nfrom_env = ["API-KEY"]')),
    "missing env_file": Case(["secrets.env_file", "does not exist"],
                             add('[secrets]\nenv_file = ".env.nope"')),
    "world-readable env_file in an override": Case(
        ["environments.test.secrets.env_file", "permissions 0644", "chmod 600"],
        add('[environments.test.secrets]\nenv_file = ".env.test"'),
        files={".env.test": ("A=bbbbbbbb\n", 0o644)}),
    "from_env variable not set": Case(["secrets.from_env", "SWO_TEST_UNSET_VAR", "not set"],
                                      add('[secrets]\nfrom_env = ["SWO_TEST_UNSET_VAR"]')),
    "bad --url": Case(["--url", "javascript:alert(1)"],
                      args=("deploy", "test", "--url", "javascript:alert(1)")),
    "--to that is a path": Case(["--to", "not a release id"],
                                args=("rollback", "test", "--to", "../../etc")),
    "--to with shell metacharacters": Case(["--to", "not a release id"],
                                           args=("rollback", "test", "--to",
                                                 "20260101_000000;rm -rf /")),
    "unknown environment": Case(["no environment", "known: test"], args=("deploy", "tset")),
}


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    host_root: Path


@pytest.fixture(scope="module")
def outcomes(ssh_fleet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    web1 = ssh_fleet.host("web1")

    def one(item: tuple[int, str]) -> Outcome:
        n, name = item
        case = CASES[name]
        d = tmp_path_factory.mktemp(f"cfg{n}")
        (d / "app").mkdir()
        (d / "app" / "index.html").write_text("v1\n")
        dirname = f"{d.name}-cfgcorpus"
        good = (
            'app = "demo"\n'
            '[artifact]\npath = "app"\n'
            "[environments.test]\n"
            'hosts = ["web1"]\n'
            f"deploy_to = {json.dumps(f'{ssh_fleet.remote_root}/{dirname}')}\n"
            f"ssh_config = {json.dumps(str(ssh_fleet.ssh_config))}\n"
        )
        config = d / "switchover.toml"
        config.write_bytes(case.change(good).encode("utf-8", "surrogateescape"))
        for fname, (text, mode) in case.files.items():
            (d / fname).write_text(text)
            (d / fname).chmod(mode)
        env = {k: v for k, v in os.environ.items()
               if k not in ("SWITCHOVER_CONFIG", "SWO_TEST_UNSET_VAR")}
        r = subprocess.run([sys.executable, "-m", "switchover", "-c", str(config), *case.args],
                           capture_output=True, text=True, timeout=120, cwd=d,
                           env={**env, **case.env})
        return Outcome(r, web1.root / dirname)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(one, enumerate(CASES)), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_config_exits_2_naming_the_key_and_touches_nothing(outcomes, name):
    case, o = CASES[name], outcomes[name]
    r = o.result
    assert r.returncode == case.code, (name, r.stdout, r.stderr)
    if case.code == 0:
        assert o.host_root.is_dir()  # the good config does reach the host
        return
    for text in case.expected:
        assert text in r.stderr, (name, text, r.stderr)
    assert "Traceback" not in r.stderr
    assert not o.host_root.exists(), f"{name}: the host was touched"
    assert not Path("/tmp/swo-pwned").exists()
