"""Hostile values through every command builder, executed for real: a local sh, then sh
behind a real sshd (where the remote login shell parses the command string once more).

Paths, shared names, history messages, lock owners, hook environment values and secrets
carry spaces, quotes, `$()`, backticks, semicolons, newlines and non-ASCII; each must arrive
byte for byte where it was meant to, and nothing may be created anywhere else.
"""

from __future__ import annotations

import os
import posixpath
import stat
import string
import subprocess
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from switchover import commands as C
from switchover.config import SecretsConfig, SharedConfig, _check_name
from switchover.hostops import parse_state
from switchover.hosts import HostSpec, parse_host
from switchover.layout import Layout
from switchover.releases import is_release_id
from switchover.secrets import ENV_NAME_RE, write_script
from switchover.transport import SshOptions, SshTransport

HOSTILE = list(string.ascii_letters + string.digits + " '\"$`;()|&<>*?!\\\n\t#~=%{}[]é中ß-_.")
NASTY = st.text(alphabet=st.sampled_from(HOSTILE), min_size=1, max_size=16).filter(
    lambda s: s not in (".", "..")
)
SEGMENT = NASTY.filter(lambda s: "/" not in s)
TEXT = st.text(  # any printable text, the odd control character and astral plane included
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    max_size=40,
)
RID = "20260101_000000"
FAST = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def sh(script: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", script], input=input, capture_output=True, timeout=30,
                          stdin=None if input is not None else subprocess.DEVNULL)


def tree(root: Path) -> set[str]:
    """Every path under root, relative, links not followed."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


@FAST
@given(name=SEGMENT, sub=SEGMENT)
@example(name="x", sub="dir\n")  # `$(dirname ...)` would eat the newline
@example(name="-rf $(touch pwned)", sub="`id`;")
def test_link_shared_with_hostile_names(tmp_path_factory, name, sub):
    # any name the config accepts: nested, with every character a shell cares about
    files, dirs = [f"{sub}/{name}.f"], [f"d-{name}", f"{sub}/{name}.d"]
    SharedConfig(files=files, dirs=dirs)  # passes validation
    base = tmp_path_factory.mktemp("ls")
    lay = Layout(str(base / "app"))
    assert sh(C.make_layout(lay)).returncode == 0
    rel = Path(lay.release(RID))
    (rel / sub).mkdir(parents=True)
    (rel / files[0]).write_text(f"seed {name}")
    (rel / dirs[0]).mkdir()
    (rel / dirs[0] / "kept").write_text(name)
    r = sh(C.link_shared(lay, RID, files, dirs))
    assert r.returncode == 0, r.stderr.decode()
    shared = Path(lay.shared)
    assert (shared / files[0]).read_text() == f"seed {name}"
    assert (shared / dirs[0] / "kept").read_text() == name
    assert (shared / dirs[1]).is_dir()
    for item in files + dirs:
        link = rel / item
        assert link.is_symlink(), item
        assert not os.readlink(link).startswith("/")
        assert link.resolve() == (shared / item).resolve()
    assert sorted(os.listdir(base)) == ["app"]
    # nothing stray inside shared/ either: exactly the items, their parents, the seeds
    parents = {str(p) for item in files + dirs for p in PurePosixPath(item).parents} - {"."}
    assert tree(shared) == {*files, *dirs, *parents, f"{dirs[0]}/kept"}


@FAST
@given(deploy_to=SEGMENT, message=TEXT, owner=st.dictionaries(
    st.sampled_from(["user", "origin", "deploy_id", "command"]), TEXT, min_size=1))
def test_history_messages_and_lock_owner_round_trip(tmp_path_factory, deploy_to, message,
                                                    owner):
    base = tmp_path_factory.mktemp("hist")
    lay = Layout(str(base / deploy_to / "app"))
    r = sh(C.acquire(lay, owner))
    assert r.returncode == 0, r.stderr.decode()
    entries = [{"event": "deploy_started", "message": message},
               {"event": "cleanup", "message": message[::-1], "removed": [message]}]
    assert sh(C.append_history(lay, entries)).returncode == 0
    state = parse_state(sh(C.dump_state(lay)).stdout.decode())
    assert state.history == entries
    assert state.lock == owner
    # a second deploy sees the owner exactly, in its "locked by" report
    r2 = sh(C.acquire(lay, {"deploy_id": "other"}))
    assert r2.returncode == C.RC_LOCKED
    assert C.parse_sections(r2.stdout.decode())["lock"][0] == C.history_line(owner)
    assert sorted(os.listdir(base)) == [deploy_to]


@FAST
@given(values=st.dictionaries(st.sampled_from(["SWITCHOVER_APP", "SWITCHOVER_ENV",
                                               "SWITCHOVER_HOST", "SWITCHOVER_RELEASE_PATH"]),
                              TEXT, min_size=1), deploy_to=SEGMENT)
def test_hook_env_values_arrive_verbatim(tmp_path_factory, values, deploy_to):
    base = tmp_path_factory.mktemp("env")
    lay = Layout(str(base / deploy_to))
    Path(lay.release(RID)).mkdir(parents=True)
    names = sorted(values)
    cmd = "".join(f'printf "%s\\0" "${n}"; ' for n in names) + "pwd"
    r = sh(C.run_in_release(lay, RID, cmd, values))
    assert r.returncode == 0, r.stdout
    *got, cwd = r.stdout.decode().split("\0")
    assert dict(zip(names, got, strict=True)) == values
    assert cwd.rstrip("\n") == lay.release(RID)


@FAST
@given(deploy_to=SEGMENT, content=st.binary(max_size=300))
def test_secrets_reach_the_file_through_stdin_only(tmp_path_factory, deploy_to, content):
    base = tmp_path_factory.mktemp("sec")
    lay = Layout(str(base / deploy_to / "app"))
    script = write_script(lay, len(content))
    assume(len(content) < 4 or content not in script.encode())
    r = sh(script, input=content)
    assert r.returncode == 0, r.stderr.decode()
    env = Path(lay.shared, ".env")
    assert env.read_bytes() == content
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert os.listdir(lay.shared) == [".env"]
    # a cut-off stdin is refused, and the live file is kept
    r = sh(write_script(lay, len(content) + 1), input=content)
    assert r.returncode != 0 and b"incomplete" in r.stderr
    assert env.read_bytes() == content and os.listdir(lay.shared) == [".env"]


@settings(max_examples=300, deadline=None)
@given(spec=st.text(alphabet=st.sampled_from(HOSTILE + list("@:[]0123456789")), max_size=30))
@example("root\n@web1")
@example("web1\n:22")
@example("[::1\n]:22")
@example("-oProxyCommand=x")
def test_host_specs_are_refused_or_safe(spec):
    try:
        h = parse_host(spec)
    except ValueError:
        return
    # what reaches ssh and rsync argv: never an option, never a shell character, one line
    for text in (h.destination, h.name, h.host):
        assert not text.startswith("-")
        assert set(text) <= set(string.ascii_letters + string.digits + "._-@:[]"), text
    assert h.port is None or 0 < h.port < 65536


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(TEXT, st.from_regex(r"\A\d{8}_\d{6}\s?\Z")))
@example("20260101_000000\n")
@example("\u0662" * 8 + "_" + "\u0660" * 6)  # Arabic-Indic digits
def test_release_ids_are_plain_ascii(value):
    if is_release_id(value):
        assert set(value) <= set(string.digits + "_"), repr(value)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(TEXT, st.from_regex(r"\A[A-Za-z0-9_.-]{1,10}\s?\Z")))
@example("prod\n")
@example("API_KEY\n")
def test_app_env_and_variable_names_are_plain_ascii(value):
    safe = set(string.ascii_letters + string.digits + "_.-")
    try:
        _check_name(value, "app name")
    except ValueError:
        pass
    else:
        assert set(value) <= safe and not value.startswith(("-", ".")), repr(value)
    if ENV_NAME_RE.fullmatch(value):
        assert set(value) <= safe - set(".-"), repr(value)
    try:
        SecretsConfig(from_env=[value])
    except ValueError:
        pass
    else:
        assert set(value) <= safe - set(".-"), repr(value)


# -- the same through a real sshd: the remote login shell parses the string once more ---------


@pytest.fixture(scope="module")
def web1(ssh_fleet):
    if not ssh_fleet.shared_path:
        pytest.skip("per-host mount namespaces unavailable")
    ssh_fleet.ensure_running()
    host = ssh_fleet.host("web1")
    t = SshTransport(HostSpec(host="web1"), SshOptions(ssh_config=ssh_fleet.ssh_config))
    t.connect()
    yield host, ssh_fleet.remote_root, t
    t.close()


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deploy_to=SEGMENT, message=TEXT, value=TEXT,
       content=st.text(alphabet=st.sampled_from(HOSTILE), max_size=60))
def test_ssh_round_trip_of_hostile_values(web1, tmp_path_factory, deploy_to, message, value,
                                          content):
    host, remote_root, t = web1
    top = tmp_path_factory.mktemp("sshq").name
    remote = posixpath.join(remote_root, top, deploy_to, "app")
    local = host.root / top / deploy_to / "app"
    lay = Layout(remote)
    owner = {"user": value, "deploy_id": "d1"}
    r = t.run(C.acquire(lay, owner))
    assert r.ok, r.stderr
    entries = [{"event": "deploy_started", "message": message}]
    assert t.run(C.append_history(lay, entries)).ok
    state = parse_state(t.run(C.dump_state(lay)).stdout)
    assert state.history == entries and state.lock == owner
    (local / "releases" / RID).mkdir(parents=True)
    r = t.run(C.run_in_release(lay, RID, 'printf %s "$SWITCHOVER_APP"', {"SWITCHOVER_APP": value}))
    assert r.ok and r.stdout == value.replace("\r\n", "\n").replace("\r", "\n")
    data = content.encode()
    assert t.run(write_script(lay, len(data)), input=data).ok
    assert (local / "shared" / ".env").read_bytes() == data
    assert stat.S_IMODE((local / "shared" / ".env").stat().st_mode) == 0o600
    # nothing was created beside the intended tree
    assert tree(host.root / top) == {deploy_to, f"{deploy_to}/app",
                                     *(f"{deploy_to}/app/{p}" for p in tree(local))}
