"""Load and validate switchover.toml.

Everything is checked before any host is touched; an error names the file, the key and what
was expected, and maps to exit code 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from switchover.errors import ConfigError
from switchover.hosts import HostSpec, parse_host

DEFAULT_CONFIG = "switchover.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Directories a typo in deploy_to must never be allowed to clobber.
SYSTEM_DIRS = frozenset(
    {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
     "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/www", "/usr/local"}
)


def _check_name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
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


# Environment sections may override these top-level sections key by key.
class HealthOverride(_Strict):
    commands: list[str] | None = None
    urls: list[str] | None = None
    timeout: PositiveFloat | None = None
    retries: Annotated[int, Field(ge=0)] | None = None
    interval: NonNegFloat | None = None


class HooksOverride(_Strict):
    before_switch: list[str] | None = None
    after_switch: list[str] | None = None
    after_rollback: list[str] | None = None


class SharedOverride(_Strict):
    files: list[str] | None = None
    dirs: list[str] | None = None

    @field_validator("files", "dirs")
    @classmethod
    def _relative(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [_check_relative(x) for x in v]


class EnvironmentConfig(_Strict):
    hosts: list[str] = []
    deploy_to: str
    ssh_config: str | None = None
    identity_file: str | None = None
    keep_releases: Annotated[int, Field(ge=1)] | None = None
    parallel: Annotated[int, Field(ge=1)] | None = None
    timeout: PositiveFloat | None = None
    health: HealthOverride | None = None
    hooks: HooksOverride | None = None
    shared: SharedOverride | None = None

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
    timeout: PositiveFloat = 600.0
    artifact: ArtifactConfig = ArtifactConfig()
    shared: SharedConfig = SharedConfig()
    health: HealthConfig = HealthConfig()
    hooks: HooksConfig = HooksConfig()
    environments: dict[str, EnvironmentConfig]

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
    artifact: ArtifactConfig
    shared: SharedConfig
    health: HealthConfig
    hooks: HooksConfig

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
    if override is None:
        return base
    changes = {k: v for k, v in override.model_dump().items() if v is not None}
    return base.model_copy(update=changes)


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
    remote = bool(env.hosts)
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

    return Environment(
        app=cfg.app,
        name=env_name,
        config_path=path,
        hosts=[parse_host(h) for h in env.hosts],
        deploy_to=deploy_to,
        ssh_config=local_file(env.ssh_config, "ssh_config"),
        identity_file=local_file(env.identity_file, "identity_file"),
        keep_releases=env.keep_releases or cfg.keep_releases,
        parallel=env.parallel or cfg.parallel,
        timeout=env.timeout or cfg.timeout,
        artifact=cfg.artifact,
        shared=_merge(cfg.shared, env.shared),
        health=_merge(cfg.health, env.health),
        hooks=_merge(cfg.hooks, env.hooks),
    )


def load_environment(path: Path, env_name: str) -> Environment:
    return resolve_environment(load_file(path), env_name, path)
