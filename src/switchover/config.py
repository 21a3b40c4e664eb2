"""Load and validate switchover.toml.

Everything is checked before any host is touched; an error names the file, the key and what
was expected, and maps to exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, NoReturn, get_args

import msgspec
from msgspec import Meta

from switchover.errors import ConfigError
from switchover.hosts import HostSpec, parse_host
from switchover.inventory import InventoryError, load_inventory
from switchover.secrets import ENV_NAME_RE, SECRETS_FILE, check_private_file

DEFAULT_CONFIG = "switchover.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Directories a typo in deploy_to must never be allowed to clobber.
SYSTEM_DIRS = frozenset(
    {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
     "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/www", "/usr/local"}
)


def _check_name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-' (at most 64 characters)"
        )
    return value


def _check_relative(value: str) -> str:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts or value in (".", "./"):
        raise ValueError(f"{value!r} must be a relative path inside the release, without '..'")
    return value


def _check(key: str, check: Callable[[Any], Any], value: Any) -> None:
    """Run one key's check from a table's __post_init__. msgspec reports such an error at
    the table, so the key goes in front of the message, where _describe finds it."""
    try:
        check(value)
    except ValueError as e:
        raise ValueError(f"`{key}`: {e}") from None


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A table of the file: unknown keys are refused (a typo), and nothing is coerced
    ("5" is not 5: a quoted number in a config is a mistake worth naming)."""


PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
AtLeastOne = Annotated[int, Meta(ge=1)]


Strategy = Literal["all", "rolling", "canary"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
_BATCH_RE = re.compile(r"^([1-9][0-9]?|100)%$")


def check_batch_size(v: int | str | None) -> int | str | None:
    if isinstance(v, str) and not _BATCH_RE.fullmatch(v):
        raise ValueError(f"{v!r} must be a positive number of hosts or a percentage like '25%'")
    if isinstance(v, int) and v < 1:
        raise ValueError("must be at least 1")
    return v


def check_canary_hosts(v: int | list[str] | None) -> int | list[str] | None:
    if isinstance(v, int) and v < 1:
        raise ValueError("must be at least 1 host")
    if isinstance(v, list) and not v:
        raise ValueError("must name at least one host")
    return v


def _check_relatives(v: list[str]) -> None:
    for x in v:
        _check_relative(x)


def _check_urls(v: list[str]) -> None:
    for url in v:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")


def _check_webhooks(v: list[str]) -> None:
    # The URL is not repeated: a webhook URL often carries its token.
    for url in v:
        if not url.startswith(("http://", "https://")):
            raise ValueError("webhooks must be http:// or https:// URLs")


def _check_env_names(v: list[str]) -> None:
    for name in v:
        if not ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
    if len(set(v)) != len(v):
        raise ValueError("a name is listed more than once")


def _check_hosts(v: list[str]) -> None:
    for h in v:
        parse_host(h)  # raises ValueError with a precise message
    if len(set(v)) != len(v):
        raise ValueError("hosts are listed more than once")


def _check_environments(v: dict[str, Any]) -> None:
    if not v:
        raise ValueError("at least one [environments.NAME] section is needed")
    for name in v:
        _check_name(name, "environment name")


class ArtifactConfig(_Strict):
    path: str | None = None
    build: str | None = None
    exclude: list[str] = []


class SharedConfig(_Strict):
    files: list[str] = []
    dirs: list[str] = []

    def __post_init__(self) -> None:
        _check("files", _check_relatives, self.files)
        _check("dirs", _check_relatives, self.dirs)


class HealthConfig(_Strict):
    commands: list[str] = []
    urls: list[str] = []
    timeout: PositiveFloat = 10.0
    retries: Annotated[int, Meta(ge=0)] = 3
    interval: NonNegFloat = 1.0

    def __post_init__(self) -> None:
        _check("urls", _check_urls, self.urls)


class HooksConfig(_Strict):
    before_switch: list[str] = []
    after_switch: list[str] = []
    after_rollback: list[str] = []


class NotifyConfig(_Strict):
    """[notify]: JSON POSTs after a deploy or rollback (see notify.py)."""

    webhooks: list[str] = []
    timeout: PositiveFloat = 5.0  # seconds per webhook

    def __post_init__(self) -> None:
        _check("webhooks", _check_webhooks, self.webhooks)


class SecretsConfig(_Strict):
    """[secrets]: written to shared/.env on each host (see secrets.py)."""

    env_file: str | None = None  # local; relative to the config file
    from_env: list[str] = []  # names read from the deploying process's environment

    def __post_init__(self) -> None:
        _check("from_env", _check_env_names, self.from_env)

    @property
    def configured(self) -> bool:
        return self.env_file is not None or bool(self.from_env)


class EnvironmentConfig(_Strict):
    deploy_to: str
    hosts: list[str] = []
    ssh_config: str | None = None
    identity_file: str | None = None
    keep_releases: AtLeastOne | None = None
    parallel: AtLeastOne | None = None
    timeout: PositiveFloat | None = None
    lock_timeout: PositiveFloat | None = None
    strategy: Strategy | None = None
    batch_size: int | str | None = None
    canary_hosts: int | list[str] | None = None
    canary_wait: NonNegFloat | None = None
    inventory: str | None = None
    group: str | None = None
    # An environment's section overrides the top-level one key by key: only the keys it
    # sets count (see ConfigFile.given).
    health: HealthConfig | None = None
    hooks: HooksConfig | None = None
    shared: SharedConfig | None = None
    secrets: SecretsConfig | None = None
    notify: NotifyConfig | None = None

    def __post_init__(self) -> None:
        _check("hosts", _check_hosts, self.hosts)
        _check("batch_size", check_batch_size, self.batch_size)
        _check("canary_hosts", check_canary_hosts, self.canary_hosts)


class FileConfig(_Strict):
    app: str
    environments: dict[str, EnvironmentConfig]
    keep_releases: AtLeastOne = 5
    parallel: AtLeastOne = 10
    # Seconds one remote step may take on a host (an upload: seconds without progress).
    timeout: PositiveFloat = 60.0
    # Seconds without a heartbeat after which a lock taken on another machine is stale.
    lock_timeout: PositiveFloat = 300.0
    strategy: Strategy = "all"
    batch_size: int | str = 1
    canary_hosts: int | list[str] = 1
    canary_wait: NonNegFloat = 30.0
    inventory: str | None = None
    group: str | None = None
    artifact: ArtifactConfig = msgspec.field(default_factory=ArtifactConfig)
    shared: SharedConfig = msgspec.field(default_factory=SharedConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    hooks: HooksConfig = msgspec.field(default_factory=HooksConfig)
    secrets: SecretsConfig = msgspec.field(default_factory=SecretsConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)
    log_dir: str | None = None  # this run's log files; relative to the config file

    def __post_init__(self) -> None:
        _check("app", lambda v: _check_name(v, "app name"), self.app)
        _check("batch_size", check_batch_size, self.batch_size)
        _check("canary_hosts", check_canary_hosts, self.canary_hosts)
        _check("environments", _check_environments, self.environments)


def default(table: type[msgspec.Struct], key: str) -> Any:
    """The value `key` takes in `table` when the file leaves it out."""
    for f in msgspec.structs.fields(table):
        if f.name == key:
            return f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
    raise KeyError(key)


@dataclass(frozen=True)
class ConfigFile:
    """A checked switchover.toml: its values, and which keys each environment's sections
    set (an override replaces only those, even where it repeats a default)."""

    config: FileConfig
    data: Mapping[str, Any]  # the TOML as read

    @property
    def environments(self) -> dict[str, EnvironmentConfig]:
        return self.config.environments

    def given(self, env_name: str, section: str) -> set[str]:
        table = self.data["environments"][env_name].get(section)
        return set(table) if isinstance(table, dict) else set()


@dataclass(frozen=True)
class Environment:
    """One environment with the top-level defaults merged in: what a command works with."""

    app: str
    name: str
    config_path: Path
    hosts: list[HostSpec]
    deploy_to: str  # absolute; on this machine for a local environment
    ssh_config: Path | None
    identity_file: Path | None
    keep_releases: int
    parallel: int
    timeout: float
    artifact: ArtifactConfig
    shared: SharedConfig
    health: HealthConfig
    hooks: HooksConfig
    lock_timeout: float = 300.0
    strategy: Strategy = "all"
    batch_size: int | str = 1
    canary_hosts: int | list[str] = 1
    canary_wait: float = 30.0
    # env_file resolved to an absolute path
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    log_dir: Path | None = None  # None: the platform's state dir (see runlog.py)

    @property
    def is_local(self) -> bool:
        return not self.hosts

    def replace(self, **changes: Any) -> Environment:
        return dataclasses.replace(self, **changes)


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_KEYED = re.compile(r"^`(?P<key>[^`]+)`: (?P<msg>.*)$", re.DOTALL)
_BOUND = re.compile(r"^Expected `\w+` (?P<op>>=|>|<=|<) (?P<n>\S+)$")
EMPTY_KEY = '""'  # how an error names a key that is the empty string (TOML allows it)
_BOUNDS = {">=": "greater than or equal to", ">": "greater than",
           "<=": "less than or equal to", "<": "less than"}


def _describe(error: msgspec.ValidationError, prefix: str = "") -> tuple[str, str]:
    """(where, what) of msgspec's message, in the file's own terms: `health.timeout`,
    `environments.prod.hosts[1]`; a TOML table is a table and an array an array."""
    m = _AT.match(str(error))
    assert m is not None  # the pattern matches any text
    msg, path = m["msg"], (m["path"] or "").lstrip(".")
    loc = ".".join(p for p in (prefix, path) if p)
    if keyed := _KEYED.match(msg):  # raised by a table's __post_init__ (see _check)
        loc, msg = f"{loc}.{keyed['key']}".lstrip("."), keyed["msg"]
    elif found := re.fullmatch(r"Object contains unknown field `(.*)`", msg, re.S):
        loc, msg = f"{loc}.{found[1] or EMPTY_KEY}".lstrip("."), "unknown key (a typo?)"
    elif found := re.fullmatch(r"Object missing required field `(.*)`", msg, re.S):
        loc, msg = f"{loc}.{found[1]}".lstrip("."), "required key is missing"
    elif bound := _BOUND.match(msg):
        n = bound["n"].removesuffix(".0")
        msg = f"must be {_BOUNDS[bound['op']]} {n}"
    elif (found := re.fullmatch(r"Invalid enum value (.*)", msg)) and loc.endswith("strategy"):
        msg = f"{found[1]} is not one of " + ", ".join(repr(s) for s in STRATEGIES)
    else:
        msg = msg.replace(" | null", "").replace("`object`", "`table`")
    return loc or "(top level)", msg


# The tables a table holds: each is checked on its own when the file has errors.
_TABLES: dict[str, type[msgspec.Struct]] = {
    "artifact": ArtifactConfig, "shared": SharedConfig, "health": HealthConfig,
    "hooks": HooksConfig, "secrets": SecretsConfig, "notify": NotifyConfig,
}
_SUB_TABLES: dict[type[msgspec.Struct], dict[str, type[msgspec.Struct]]] = {
    FileConfig: _TABLES,
    EnvironmentConfig: {k: _TABLES[k] for k in ("health", "hooks", "shared", "secrets",
                                                 "notify")},
}

_STAND_IN_ENV: dict[str, Any] = {"deploy_to": "/srv/app"}
# Valid values for the required keys, put in place of a wrong one while the rest of its
# table is checked (see _key_errors).
_STAND_INS: dict[str, Any] = {
    "app": "app", "environments": {"env": _STAND_IN_ENV}, "deploy_to": "/srv/app",
}


def _key_of(where: str, prefix: str, keys: Iterable[str], required: set[str]) -> str | None:
    """The key of the table at `prefix` an error at `where` is under: one the table sets
    (the longest, as a key may hold dots or brackets), else a required one it lacks; None
    for an error of the table itself."""
    if prefix:
        rel = where[len(prefix) + 1:] if where.startswith(prefix + ".") else None
    else:
        rel = None if where == "(top level)" else where
    if rel is None:
        return None
    if rel == EMPTY_KEY and "" in keys:
        return ""
    matches = [k for k in keys if rel == k or rel.startswith((k + ".", k + "["))]
    if matches:
        return max(matches, key=len)
    first = re.split(r"[.\[]", rel, maxsplit=1)[0]
    return first if first in required else None


def _key_errors(value: Any, table: type[msgspec.Struct], prefix: str = "",
                ) -> list[tuple[str, str]]:
    """The first error of every key of one table, and of every table in it (environments
    by name). msgspec stops at the first error, so the key it names is set aside (dropped,
    or a required one given a valid stand-in) and the table checked again."""
    if not isinstance(value, dict):
        try:
            msgspec.convert(value, table)
            return []
        except msgspec.ValidationError as e:
            return [_describe(e, prefix)]
    at = f"{prefix}." if prefix else ""
    rest = dict(value)
    inner: list[tuple[str, str]] = []
    for key, sub in _SUB_TABLES.get(table, {}).items():
        if key in rest:  # no table is required: checked here, then left out
            inner += _key_errors(rest.pop(key), sub, at + key)
    envs = rest.get("environments") if table is FileConfig else None
    if isinstance(envs, dict):
        for name, env in envs.items():
            inner += _key_errors(env, EnvironmentConfig, f"{at}environments.{name}")
        rest["environments"] = {name: _STAND_IN_ENV for name in envs}  # names still checked
    found: list[tuple[str, str]] = []
    required = {f.name for f in msgspec.structs.fields(table) if f.required}
    stood_in: set[str] = set()
    for _ in range(len(rest) + len(required) + 1):
        try:
            msgspec.convert(rest, table)
            break
        except msgspec.ValidationError as e:
            where, what = _describe(e, prefix)
        if (where, what) not in found:
            found.append((where, what))
        key = _key_of(where, prefix, rest, required)
        if key is None or key in stood_in:
            break  # the table itself is wrong, or no progress: nothing more to learn
        if key in required:
            rest[key] = _STAND_INS[key]
            stood_in.add(key)
        else:
            del rest[key]
    return found + inner


def _validate(path: Path, data: dict[str, Any]) -> FileConfig:
    try:
        return msgspec.convert(data, FileConfig)
    except msgspec.ValidationError as e:
        first = _describe(e)
    # msgspec stops at the first error and names no environment ("environments[...]"):
    # every key of every table and environment is checked on its own to list them all.
    return _fail(path, _key_errors(data, FileConfig) or [first])


def _fail(path: Path, errors: Sequence[tuple[str, str]]) -> NoReturn:
    raise ConfigError("\n".join(f"{path}: {where}: {what}" for where, what in errors))


def config_path_from(explicit: str | None) -> Path:
    """-c wins, then $SWITCHOVER_CONFIG, then ./switchover.toml."""
    return Path(explicit or os.environ.get("SWITCHOVER_CONFIG") or DEFAULT_CONFIG)


def load_file(path: Path) -> ConfigFile:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found",
            hint="pass -c FILE, set SWITCHOVER_CONFIG, or run where switchover.toml is",
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return ConfigFile(_validate(path, data), data)


def _merge(file: ConfigFile, env_name: str, section: str) -> Any:
    """The top-level [section] with the keys the environment's own section sets."""
    base = getattr(file.config, section)
    override = getattr(file.environments[env_name], section)
    if override is None:
        return base
    return msgspec.structs.replace(
        base, **{k: getattr(override, k) for k in file.given(env_name, section)})


def _check_deploy_to(value: str, env_name: str, path: Path, *, remote: bool) -> None:
    key = f"{path}: environments.{env_name}.deploy_to"
    if not value.strip():
        raise ConfigError(f"{key}: must not be empty")
    if "\n" in value or "\0" in value:
        raise ConfigError(f"{key}: must not contain newlines or NUL bytes")
    if remote and not value.startswith("/"):
        raise ConfigError(f"{key}: must be an absolute path on remote hosts, got {value!r}")
    normal = os.path.normpath(value) if value.startswith("/") else None
    if normal is not None and normal in SYSTEM_DIRS:
        raise ConfigError(
            f"{key}: {value!r} is a system directory; deploy into a directory of its own"
        )


def resolve_environment(file: ConfigFile, env_name: str, path: Path) -> Environment:
    """Merge an environment's overrides over the top-level defaults and resolve paths."""
    cfg = file.config
    env = cfg.environments.get(env_name)
    if env is None:
        known = ", ".join(sorted(cfg.environments)) or "none"
        raise ConfigError(f"{path}: no environment {env_name!r} (known: {known})")
    base_dir = path.resolve().parent
    hosts = [parse_host(h) for h in env.hosts]
    inventory = env.inventory or cfg.inventory
    if inventory:
        inv_path = Path(inventory).expanduser()
        inv_path = inv_path if inv_path.is_absolute() else base_dir / inv_path
        try:
            extra = load_inventory(inv_path, env.group or cfg.group)
        except InventoryError as e:
            raise ConfigError(f"{path}: environments.{env_name}.inventory: {e}") from None
        known = {h.name for h in hosts}
        hosts += [h for h in extra if h.name not in known]
        if not hosts:
            raise ConfigError(f"{path}: environments.{env_name}.inventory: no hosts in "
                              f"group {env.group or cfg.group or 'all'!r}")
    remote = bool(hosts)
    _check_deploy_to(env.deploy_to, env_name, path, remote=remote)
    deploy_to = env.deploy_to
    if not remote:
        deploy_to = str((base_dir / Path(deploy_to).expanduser()).resolve())
        _check_deploy_to(deploy_to, env_name, path, remote=False)

    def local_file(value: str | None, key: str) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if not p.is_file():
            raise ConfigError(f"{path}: environments.{env_name}.{key}: file {p} does not exist")
        return p

    secrets = _resolve_secrets(file, env_name, path, base_dir)
    return Environment(
        app=cfg.app,
        name=env_name,
        config_path=path,
        hosts=hosts,
        deploy_to=deploy_to,
        ssh_config=local_file(env.ssh_config, "ssh_config"),
        identity_file=_private(local_file(env.identity_file, "identity_file"),
                               f"{path}: environments.{env_name}.identity_file"),
        keep_releases=env.keep_releases or cfg.keep_releases,
        parallel=env.parallel or cfg.parallel,
        timeout=env.timeout or cfg.timeout,
        lock_timeout=env.lock_timeout or cfg.lock_timeout,
        strategy=env.strategy or cfg.strategy,
        batch_size=env.batch_size if env.batch_size is not None else cfg.batch_size,
        canary_hosts=env.canary_hosts if env.canary_hosts is not None else cfg.canary_hosts,
        canary_wait=env.canary_wait if env.canary_wait is not None else cfg.canary_wait,
        artifact=cfg.artifact,
        shared=_with_secrets_file(_merge(file, env_name, "shared"), secrets),
        health=_merge(file, env_name, "health"),
        hooks=_merge(file, env_name, "hooks"),
        secrets=secrets,
        notify=_merge(file, env_name, "notify"),
        log_dir=(base_dir / Path(cfg.log_dir).expanduser()) if cfg.log_dir else None,
    )


def _private(p: Path | None, key: str) -> Path | None:
    if p is not None:
        check_private_file(p, key)
    return p


def _resolve_secrets(file: ConfigFile, env_name: str, path: Path,
                     base_dir: Path) -> SecretsConfig:
    """Merge [secrets] key by key; the env file must exist and be private (exit 2)."""
    merged: SecretsConfig = _merge(file, env_name, "secrets")
    if merged.env_file is None:
        return merged
    own = "env_file" in file.given(env_name, "secrets")
    key = f"{path}: {f'environments.{env_name}.' if own else ''}secrets.env_file"
    p = Path(merged.env_file).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise ConfigError(f"{key}: file {p} does not exist")
    check_private_file(p, key)
    return msgspec.structs.replace(merged, env_file=str(p))


def _with_secrets_file(shared: SharedConfig, secrets: SecretsConfig) -> SharedConfig:
    """With secrets configured, shared/.env is linked into every release like other files."""
    if not secrets.configured or SECRETS_FILE in shared.files:
        return shared
    return msgspec.structs.replace(shared, files=[*shared.files, SECRETS_FILE])


def load_environment(path: Path, env_name: str) -> Environment:
    return resolve_environment(load_file(path), env_name, path)
