import textwrap
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchover import config
from switchover.config import load_environment
from switchover.errors import ConfigError, ExitCode

GOOD = """
app = "hello"
keep_releases = 3
[artifact]
path = "build"
[shared]
files = [".env"]
dirs = ["storage"]
[health]
urls = ["http://{host}:8080/health"]
retries = 2
[hooks]
after_switch = ["echo hi"]
[environments.production]
hosts = ["deploy@web1.example.com", "web2:2222", "[::1]:22"]
deploy_to = "/srv/hello"
keep_releases = 7
[environments.production.health]
retries = 9
[environments.local]
deploy_to = "./.deploy/hello"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "switchover.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_environment_merges_overrides_key_by_key(tmp_path):
    env = load_environment(write(tmp_path, GOOD), "production")
    assert env.keep_releases == 7
    assert env.health.retries == 9
    assert env.health.urls == ["http://{host}:8080/health"]  # inherited
    assert [h.name for h in env.hosts] == ["deploy@web1.example.com", "web2:2222", "[::1]:22"]
    assert env.hosts[1].port == 2222 and env.hosts[0].user == "deploy"


def test_local_deploy_to_is_relative_to_config(tmp_path):
    env = load_environment(write(tmp_path, GOOD), "local")
    assert env.is_local
    assert env.deploy_to == str((tmp_path / ".deploy/hello").resolve())
    assert env.keep_releases == 3


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ('app = "hello"\nkeep_relases = 3\n[environments.a]\ndeploy_to="/srv/x"', "keep_relases"),
        ('app = "hello"\nkeep_releases = 0\n[environments.a]\ndeploy_to="/srv/x"', "keep_releases"),
        (
            'app = "hello"\nkeep_releases = "5"\n[environments.a]\ndeploy_to="/srv/x"',
            "keep_releases",
        ),
        ('app = "he llo"\n[environments.a]\ndeploy_to="/srv/x"', "app"),
        (
            'app = "x"\n[health]\ntimeout = -1\n[environments.a]\ndeploy_to="/srv/x"',
            "health.timeout",
        ),
        (
            'app = "x"\n[health]\nurls = ["ftp://x"]\n[environments.a]\ndeploy_to="/srv/x"',
            "health.urls",
        ),
        (
            'app = "x"\n[shared]\nfiles = ["../etc/passwd"]\n[environments.a]\ndeploy_to="/srv/x"',
            "shared.files",
        ),
        (
            'app = "x"\n[environments.a]\nhosts=["bad host"]\ndeploy_to="/srv/x"',
            "environments.a.hosts",
        ),
        (
            'app = "x"\n[environments.a]\nhosts=["h:99999"]\ndeploy_to="/srv/x"',
            "environments.a.hosts",
        ),
        ('app = "x"\n[environments.a]\nhosts=["h"]', "environments.a.deploy_to"),
        (
            'app = "x"\n[environments.a]\ndeploy_to="/x"\n[environments.a.hooks]\nbefore=["x"]',
            "environments.a.hooks.before",
        ),
        ('app = "x"\n[environments."a;b"]\ndeploy_to="/srv/x"', "environments"),
        ('[environments.a]\ndeploy_to="/srv/x"', "app"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, snippet, key):
    p = write(tmp_path, snippet)
    with pytest.raises(ConfigError) as exc:
        load_environment(p, "a")
    assert exc.value.code == ExitCode.USAGE
    assert str(p) in str(exc.value)
    assert key in str(exc.value)


@pytest.mark.parametrize("deploy_to", ["relative/path", "/", "/etc", "/usr/", "/srv"])
def test_remote_deploy_to_must_be_absolute_and_not_system(tmp_path, deploy_to):
    p = write(tmp_path, f'app="x"\n[environments.a]\nhosts=["h"]\ndeploy_to="{deploy_to}"\n')
    with pytest.raises(ConfigError, match="deploy_to"):
        load_environment(p, "a")


def test_malformed_toml(tmp_path):
    p = write(tmp_path, "app = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_environment(p, "a")


def test_missing_file_and_unknown_env(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_environment(tmp_path / "nope.toml", "a")
    with pytest.raises(ConfigError, match="no environment 'staging'"):
        load_environment(write(tmp_path, GOOD), "staging")


def test_missing_identity_file_is_config_error(tmp_path):
    p = write(
        tmp_path,
        'app="x"\n[environments.a]\nhosts=["h"]\ndeploy_to="/srv/x"\n'
        'identity_file="~/nope/id_ed25519_missing"\n',
    )
    with pytest.raises(ConfigError, match="identity_file") as exc:
        load_environment(p, "a")
    assert exc.value.code == 2


def test_errors_name_each_broken_environment_in_the_files_own_terms(tmp_path):
    # The checker stops at its first error and hides table keys ("environments[...]"):
    # every broken environment is still named, one line each, under its own key.
    p = write(tmp_path, """
        app = "x"
        strategy = "blue-green"
        [environments.prod]
        deploy_to = "/srv/x"
        parallel = true
        [environments.stage]
        deploy_to = "/srv/y"
        health = 3
        [environments.ok]
        deploy_to = "/srv/z"
    """)
    with pytest.raises(ConfigError) as exc:
        load_environment(p, "ok")
    lines = str(exc.value).splitlines()
    assert lines == [
        f"{p}: strategy: 'blue-green' is not one of 'all', 'rolling', 'canary'",
        f"{p}: environments.prod.parallel: Expected `int`, got `bool`",
        f"{p}: environments.stage.health: Expected `table`, got `int`",
    ]


def test_bounds_and_checks_are_reported_at_their_key(tmp_path):
    cases = {
        "timeout = 0": "timeout: must be greater than 0",
        "[health]\nretries = -1": "health.retries: must be greater than or equal to 0",
        "[health]\nurls = ['http://a', 'ftp://b']": "health.urls: 'ftp://b' is not an http://",
        "[notify]\nwebhooks = ['ftp://token']": "notify.webhooks: webhooks must be http:// or",
        "canary_hosts = []": "canary_hosts: must name at least one host",
    }
    for n, (snippet, expected) in enumerate(cases.items()):
        d = tmp_path / str(n)
        d.mkdir()
        p = write(d, f'app = "x"\n{snippet}\n[environments.a]\ndeploy_to = "/srv/x"\n')
        with pytest.raises(ConfigError) as exc:
            load_environment(p, "a")
        assert f"{p}: {expected}" in str(exc.value), (snippet, str(exc.value))
        assert "token" not in str(exc.value)  # a webhook URL is not repeated: it may be secret


def test_each_table_reports_its_own_first_error(tmp_path):
    p = write(tmp_path, """
        app = "x"
        keep_releases = 0
        [environments.p]
        deploy_to = "/srv/x"
        parallel = 0
        [health]
        timeout = 0
        [hooks]
        after_switch = "echo"
    """)
    with pytest.raises(ConfigError) as exc:
        load_environment(p, "p")
    assert str(exc.value).splitlines() == [
        f"{p}: keep_releases: must be greater than or equal to 1",
        f"{p}: health.timeout: must be greater than 0",
        f"{p}: hooks.after_switch: Expected `array`, got `str`",
        f"{p}: environments.p.parallel: must be greater than or equal to 1",
    ]


def _error_lines(p: Path) -> list[str]:
    """The lines of the ConfigError loading `p` gives, sorted."""
    with pytest.raises(ConfigError) as exc:
        load_environment(p, "p")
    return sorted(str(exc.value).splitlines())


def test_every_wrong_key_gets_its_own_line(tmp_path):
    # msgspec stops at the first error: each key it names is set aside and the rest checked
    # again, at the top level, in each table and in each environment.
    p = write(tmp_path, """
        keep_releases = 0
        parallel = "x"
        typo = 1
        batch_size = "0%"
        [environments.p]
        deploy_to = 5
        parallel = 0
        [environments.q]
        [health]
        timeout = 0
        urls = ["ftp://x"]
    """)
    assert _error_lines(p) == sorted(f"{p}: {line}" for line in [
        "keep_releases: must be greater than or equal to 1",
        "parallel: Expected `int`, got `str`",
        "typo: unknown key (a typo?)",
        "app: required key is missing",
        "batch_size: '0%' must be a positive number of hosts or a percentage like '25%'",
        "health.timeout: must be greater than 0",
        "health.urls: 'ftp://x' is not an http:// or https:// URL",
        "environments.p.deploy_to: Expected `str`, got `int`",
        "environments.p.parallel: must be greater than or equal to 1",
        "environments.q.deploy_to: required key is missing",
    ])


def test_a_wrong_required_key_is_reported_once(tmp_path):
    # a wrong app name is set aside with a stand-in, not dropped: no "missing" line follows
    p = write(tmp_path, 'app = "bad name"\nenvironments = {}\n')
    with pytest.raises(ConfigError) as exc:
        load_environment(p, "p")
    lines = str(exc.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{p}: app: app name 'bad name'")
    assert lines[1] == f"{p}: environments: at least one [environments.NAME] section is needed"
    p = write(tmp_path, "environments = 3\ntimeout = true\n")
    assert _error_lines(p) == sorted([
        f"{p}: environments: Expected `table`, got `int`",
        f"{p}: timeout: Expected `float`, got `bool`",
        f"{p}: app: required key is missing",
    ])


def test_every_required_key_has_a_stand_in():
    tables = [config.FileConfig, config.EnvironmentConfig, *config._TABLES.values()]
    for table in tables:
        for f in msgspec.structs.fields(table):
            if f.required:
                assert f.name in config._STAND_INS, (table, f.name)
                msgspec.convert(config._STAND_INS[f.name], f.type)


_KEYS = [*(f.name for f in msgspec.structs.fields(config.FileConfig)),
         *(f.name for f in msgspec.structs.fields(config.EnvironmentConfig)), "typo",
         "health.timeout", "a[0]", "", "parallel.x"]  # names msgspec's messages blur
_SCALARS = st.one_of(st.integers(-2, 3), st.booleans(), st.sampled_from(["", "x", "/srv/a"]),
                     st.floats(-1, 2), st.lists(st.sampled_from(["h", "a b", "25%"]), max_size=2))
_TABLES = st.dictionaries(st.sampled_from(_KEYS), _SCALARS, max_size=4)
_FILES = st.builds(
    lambda top, tables, envs: {**top, **tables, **({"environments": envs} if envs else {})},
    st.dictionaries(st.sampled_from(_KEYS), _SCALARS, max_size=5),
    st.dictionaries(st.sampled_from(list(config._TABLES)), st.one_of(_SCALARS, _TABLES),
                    max_size=2),
    st.one_of(st.none(), _SCALARS, st.dictionaries(st.sampled_from(["p", "q", "bad name", "a.b"]),
                                                   st.one_of(_SCALARS, _TABLES), max_size=3)),
)


@settings(max_examples=300, deadline=None)
@given(data=_FILES)
def test_any_wrong_file_gives_a_config_error_with_a_line_per_key(data):
    # whatever the TOML holds: a checked config or a ConfigError, never a crash, never empty
    try:
        config._validate(Path("f.toml"), data)
    except ConfigError as e:
        lines = str(e).splitlines()
        assert lines and all(line.startswith("f.toml: ") for line in lines)
        assert len(lines) == len(set(lines))
        for key in data:  # every unknown top-level key is named
            if key not in _KEYS[:len(msgspec.structs.fields(config.FileConfig))]:
                named = key or config.EMPTY_KEY
                assert f"f.toml: {named}: unknown key (a typo?)" in lines, (key, lines)


def test_keys_with_dots_or_brackets_and_tables_inside_environments(tmp_path):
    # msgspec's messages put such keys in a path: each is still named once, whole, and the
    # keys after it are still checked; an environment's tables list every wrong key too.
    p = write(tmp_path, """
        app = "x"
        "health.timeout" = 5
        "a[0]" = 1
        keep_releases = 0
        [environments."bad name"]
        deploy_to = "/srv/x"
        parallel = 0
        [environments.p]
        deploy_to = "/srv/x"
        [environments.p.health]
        timeout = 0
        bogus = 1
    """)
    assert _error_lines(p) == sorted(f"{p}: {line}" for line in [
        "health.timeout: unknown key (a typo?)",
        "a[0]: unknown key (a typo?)",
        "keep_releases: must be greater than or equal to 1",
        "environments: environment name 'bad name' must start with a letter or digit and "
        "contain only letters, digits, '.', '_' and '-' (at most 64 characters)",
        "environments.bad name.parallel: must be greater than or equal to 1",
        "environments.p.health.timeout: must be greater than 0",
        "environments.p.health.bogus: unknown key (a typo?)",
    ])
