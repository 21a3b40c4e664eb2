"""Secrets: reading, quoting, redaction, file permissions, and the config that drives them."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchover.config import load_environment
from switchover.errors import ConfigError, ExitCode
from switchover.secrets import (
    MASK,
    Redactor,
    check_private_file,
    dotenv_value,
    env_file_values,
    load_secrets,
    redact_doc,
)


def write(tmp_path: Path, text: str, env_file: str | None = None) -> Path:
    if env_file is not None:
        f = tmp_path / ".env.production"
        f.write_text(env_file)
        f.chmod(0o600)
    p = tmp_path / "switchover.toml"
    p.write_text(textwrap.dedent(text))
    return p


BASE = """
app = "x"
[secrets]
env_file = ".env.production"
from_env = ["API_KEY"]
[environments.prod]
hosts = ["web1"]
deploy_to = "/srv/x"
[environments.local]
deploy_to = "./deploy"
[environments.local.secrets]
from_env = ["LOCAL_ONLY"]
"""


def test_secrets_config_merges_and_links_dotenv(tmp_path):
    p = write(tmp_path, BASE, env_file="DB_PASSWORD=hunter2hunter2\n")
    prod = load_environment(p, "prod")
    assert prod.secrets.env_file == str(tmp_path / ".env.production")  # relative to config
    assert prod.secrets.from_env == ["API_KEY"]
    assert prod.shared.files == [".env"]  # linked into releases like any shared file
    local = load_environment(p, "local")
    assert local.secrets.from_env == ["LOCAL_ONLY"]  # key by key: env_file inherited
    assert local.secrets.env_file == prod.secrets.env_file


def test_no_secrets_means_no_dotenv_link(tmp_path):
    p = write(tmp_path, 'app="x"\n[environments.a]\ndeploy_to="./d"\n')
    env = load_environment(p, "a")
    assert env.shared.files == [] and load_secrets(env, strict=True) is None


def test_load_secrets_content_and_values(tmp_path):
    p = write(tmp_path, BASE, env_file='DB_PASSWORD="hunter2 hunter2"\nPLAIN=abcdef')
    env = load_environment(p, "prod")
    s = load_secrets(env, strict=True, environ={"API_KEY": "k3y-$(x) 'q'"})
    assert s is not None
    assert s.content.decode() == (
        'DB_PASSWORD="hunter2 hunter2"\nPLAIN=abcdef\nAPI_KEY="k3y-\\$(x) \'q\'"\n'
    )
    assert "hunter2 hunter2" in s.values and "k3y-$(x) 'q'" in s.values
    assert "hunter2" not in repr(s) and "k3y" not in repr(s)


def test_missing_from_env_is_exit_2_only_when_strict(tmp_path):
    p = write(tmp_path, BASE, env_file="A=bbbbbb\n")
    env = load_environment(p, "prod")
    with pytest.raises(ConfigError) as exc:
        load_secrets(env, strict=True, environ={})
    assert exc.value.code == ExitCode.USAGE
    assert "secrets.from_env" in str(exc.value) and "API_KEY" in str(exc.value)
    lenient = load_secrets(env, strict=False, environ={})
    assert lenient is not None and lenient.names == ()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_private_file_refused_when_group_or_others_have_access(tmp_path, mode):
    f = tmp_path / "key"
    f.write_text("x")
    f.chmod(mode)
    with pytest.raises(ConfigError) as exc:
        check_private_file(f, "cfg: identity_file")
    assert "too open" in str(exc.value) and f"{mode:04o}" in str(exc.value)
    assert exc.value.hint == f"chmod 600 {f}"
    f.chmod(0o600)
    check_private_file(f, "cfg: identity_file")
    f.chmod(0o400)
    check_private_file(f, "cfg: identity_file")


def test_env_file_values_finds_every_form():
    text = textwrap.dedent("""\
        # comment
        export A=plainvalue
        B='single quoted'
        C="double \\"quoted\\" line1\\nline2"
        D="multi
        line value"
        E=unquoted # trailing comment
        garbage line here
        """)
    values = env_file_values(text)
    for v in ("plainvalue", "single quoted", "'single quoted'", 'double "quoted" line1\nline2',
              "multi\nline value", "unquoted", "garbage line here"):
        assert v in values, v


def test_redactor_masks_values_and_their_forms():
    secret = 'pa"ss\nword-2'
    r = Redactor([secret, "abc", "tok_123456"])
    assert r(f"x {secret} y") == f"x {MASK} y"
    assert r("line: word-2") == f"line: {MASK}"  # one line of a multi-line value
    assert r(json.dumps({"e": secret})) == json.dumps({"e": MASK})  # JSON-escaped form
    assert r("abc stays") == "abc stays"  # too short to mask without garbling output
    assert r("Authorization: tok_123456tok_123456") == f"Authorization: {MASK}{MASK}"
    assert not Redactor([]) and Redactor([])("same") == "same"


def test_redact_doc_keeps_json_valid():
    r = Redactor(["true", "8080", "s3cret-value"])
    doc = {"ok": True, "port": 8080, "msg": "s3cret-value on 8080", "list": ["true", None, 1.5]}
    out = redact_doc(doc, r)
    assert out == {"ok": True, "port": 8080, "msg": f"{MASK} on {MASK}",
                   "list": [MASK, None, 1.5]}
    json.loads(json.dumps(out))


VALUES = st.text(
    alphabet=st.sampled_from(list("abcXYZ019 '\"$`;()|&<>*?!\\\t#=é中-_./:@%+,{}")),
    max_size=24,
)


@settings(max_examples=60, deadline=None)
@given(value=VALUES)
def test_dotenv_value_reads_back_in_sh(tmp_path_factory, value):
    f = tmp_path_factory.mktemp("env") / ".env"
    f.write_text(f"NAME={dotenv_value(value)}\n")
    r = subprocess.run(["sh", "-c", '. "$1" && printf %s "$NAME"', "sh", str(f)],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout == value


def test_env_file_must_be_private_and_exist(tmp_path):
    p = write(tmp_path, BASE, env_file="A=bbbbbb\n")
    os.chmod(tmp_path / ".env.production", 0o644)
    with pytest.raises(ConfigError, match=r"secrets\.env_file: permissions 0644") as exc:
        load_environment(p, "prod")
    assert exc.value.code == ExitCode.USAGE
    (tmp_path / ".env.production").unlink()
    with pytest.raises(ConfigError, match=r"secrets\.env_file: file .* does not exist"):
        load_environment(p, "prod")
