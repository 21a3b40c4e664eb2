"""Load and validate switchover.toml.

Everything is checked before any host is touched; an error names the file, the key and what
was expected, and maps to exit code 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class _Strict(BaseModel):
    # strict: "5" is not 5. A quoted number in a config is a mistake worth naming.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


Strategy = Literal["all", "rolling", "canary"]
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


class ArtifactConfig(_Strict):
    path: str | None = None
    build: str | None = None
    exclude: list[str] = []


class SharedConfig(_Strict):
    files: list[str] = []
    dirs: list[str] = []

    @field_validator("files", "dirs")
    @classmethod
    def _relative(cls, v: list[str]) -> list[str]:
        return [_check_relative(x) for x in v]


class HealthConfig(_Strict):
    commands: list[str] = []
    urls: list[str] = []
    timeout: PositiveFloat = 10.0
    retries: Annotated[int, Field(ge=0)] = 3
    interval: NonNegFloat = 1.0

    @field_validator("urls")
    @classmethod
    def _http(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return v


class HooksConfig(_Strict):
    before_switch: list[str] = []
    after_switch: list[str] = []
    after_rollback: list[str] = []


def _check_webhooks(v: list[str]) -> list[str]:
    for url in v:
        if not url.startswith(("http://", "https://")):
            raise ValueError("webhooks must be http:// or https:// URLs")
    return v


class NotifyConfig(_Strict):
    """[notify]: JSON POSTs after a deploy or rollback (see notify.py)."""

    webhooks: list[str] = []
    timeout: PositiveFloat = 5.0  # seconds per webhook

    _urls = field_validator("webhooks")(classmethod(lambda cls, v: _check_webhooks(v)))


class SecretsConfig(_Strict):
    """[secrets]: written to shared/.env on each host (see secrets.py)."""

    env_file: str | None = None  # local; relative to the config file
    from_env: list[str] = []  # names read from the deploying process's environment

    @field_validator("from_env")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return _check_env_names(v)

    @property
    def configured(self) -> bool:
        return self.env_file is not None or bool(self.from_env)


def _check_env_names(v: list[str]) -> list[str]:
    for name in v:
        if not ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
    if len(set(v)) != len(v):
        raise ValueError("a name is listed more than once")
    return v


class EnvironmentConfig(_Strict):
    hosts: list[str] = []
    deploy_to: str
    ssh_config: str | None = None
    identity_file: str | None = None
    keep_releases: Annotated[int, Field(ge=1)] | None = None
    parallel: Annotated[int, Field(ge=1)] | None = None
    timeout: PositiveFloat | None = None
    lock_timeout: PositiveFloat | None = None
    strategy: Strategy | None = None
    batch_size: int | str | None = None
    canary_hosts: int | list[str] | None = None
    canary_wait: NonNegFloat | None = None
    inventory: str | None = None
    group: str | None = None
    # An environment's section overrides the top-level one key by key. It is checked by
    # the same class, so by the same rules; only the keys it sets count (see _merge). One
    # class per section, not two, also means fewer models to build at every start.
    health: HealthConfig | None = None
    hooks: HooksConfig | None = None
    shared: SharedConfig | None = None
    secrets: SecretsConfig | None = None
    notify: NotifyConfig | None = None

    _batch = field_validator("batch_size")(classmethod(lambda cls, v: check_batch_size(v)))
    _canary = field_validator("canary_hosts")(classmethod(lambda cls, v: check_canary_hosts(v)))

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            parse_host(h)  # raises ValueError with a precise message
        if len(set(v)) != len(v):
            raise ValueError("hosts are listed more than once")
        return v


class FileConfig(_Strict):
    app: str
    keep_releases: Annotated[int, Field(ge=1)] = 5
    parallel: Annotated[int, Field(ge=1)] = 10
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
    artifact: ArtifactConfig = ArtifactConfig()
    shared: SharedConfig = SharedConfig()
    health: HealthConfig = HealthConfig()
    hooks: HooksConfig = HooksConfig()
    secrets: SecretsConfig = SecretsConfig()
    notify: NotifyConfig = NotifyConfig()
    log_dir: str | None = None  # this run's log files; relative to the config file
    environments: dict[str, EnvironmentConfig]

    _batch = field_validator("batch_size")(classmethod(lambda cls, v: check_batch_size(v)))
    _canary = field_validator("canary_hosts")(classmethod(lambda cls, v: check_canary_hosts(v)))

    @field_validator("app")
    @classmethod
    def _app(cls, v: str) -> str:
        return _check_name(v, "app name")

    @field_validator("environments")
    @classmethod
    def _envs(cls, v: dict[str, EnvironmentConfig]) -> dict[str, EnvironmentConfig]:
        if not v:
            raise ValueError("at least one [environments.NAME] section is needed")
        for name in v:
            _check_name(name, "environment name")
        return v


class Environment(BaseModel):
    """One environment with the top-level defaults merged in: what a command works with."""

    model_config = ConfigDict(frozen=True)

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
    lock_timeout: float = 300.0
    strategy: Strategy = "all"
    batch_size: int | str = 1
    canary_hosts: int | list[str] = 1
    canary_wait: float = 30.0
    artifact: ArtifactConfig
    shared: SharedConfig
    health: HealthConfig
    hooks: HooksConfig
    secrets: SecretsConfig = SecretsConfig()  # env_file resolved to an absolute path
    notify: NotifyConfig = NotifyConfig()
    log_dir: Path | None = None  # None: the platform's state dir (see runlog.py)

    @property
    def is_local(self) -> bool:
        return not self.hosts


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _format_validation(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{path}: {loc}: {msg}")
    return "\n".join(lines)


def config_path_from(explicit: str | None) -> Path:
    """-c wins, then $SWITCHOVER_CONFIG, then ./switchover.toml."""
    return Path(explicit or os.environ.get("SWITCHOVER_CONFIG") or DEFAULT_CONFIG)


def load_file(path: Path) -> FileConfig:
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
    try:
        return FileConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(path, e)) from None


def _merge(base: BaseModel, override: BaseModel | None) -> Any:
    """`base` with the keys the environment's section sets (not its defaults)."""
    if override is None:
        return base
    return base.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})


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


def resolve_environment(cfg: FileConfig, env_name: str, path: Path) -> Environment:
    """Merge an environment's overrides over the top-level defaults and resolve paths."""
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

    secrets = _resolve_secrets(cfg, env, env_name, path, base_dir)
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
        shared=_with_secrets_file(_merge(cfg.shared, env.shared), secrets),
        health=_merge(cfg.health, env.health),
        hooks=_merge(cfg.hooks, env.hooks),
        secrets=secrets,
        notify=_merge(cfg.notify, env.notify),
        log_dir=(base_dir / Path(cfg.log_dir).expanduser()) if cfg.log_dir else None,
    )


def _private(p: Path | None, key: str) -> Path | None:
    if p is not None:
        check_private_file(p, key)
    return p


def _resolve_secrets(cfg: FileConfig, env: EnvironmentConfig, env_name: str, path: Path,
                     base_dir: Path) -> SecretsConfig:
    """Merge [secrets] key by key; the env file must exist and be private (exit 2)."""
    merged: SecretsConfig = _merge(cfg.secrets, env.secrets)
    if merged.env_file is None:
        return merged
    own = env.secrets is not None and "env_file" in env.secrets.model_fields_set
    key = f"{path}: {f'environments.{env_name}.' if own else ''}secrets.env_file"
    p = Path(merged.env_file).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise ConfigError(f"{key}: file {p} does not exist")
    check_private_file(p, key)
    return merged.model_copy(update={"env_file": str(p)})


def _with_secrets_file(shared: SharedConfig, secrets: SecretsConfig) -> SharedConfig:
    """With secrets configured, shared/.env is linked into every release like other files."""
    if not secrets.configured or SECRETS_FILE in shared.files:
        return shared
    return shared.model_copy(update={"files": [*shared.files, SECRETS_FILE]})


def load_environment(path: Path, env_name: str) -> Environment:
    return resolve_environment(load_file(path), env_name, path)
