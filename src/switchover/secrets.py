"""Secrets: `[secrets]` values written to `shared/.env` on each host, and kept out of sight.

Values come from a local env file (`env_file`) and from the deploying process's environment
(`from_env`). They reach a host only on the stdin of one remote command (never on a command
line, where `ps` would show them), land in `shared/.env` through a temp file and a rename
with mode 0600, and a `Redactor` replaces them with `***` in everything switchover prints,
returns as JSON, or records in the history.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchover.commands import q
from switchover.errors import ConfigError, HostError
from switchover.layout import Layout

if TYPE_CHECKING:
    from switchover.config import Environment
    from switchover.hostops import HostOps

MASK = "***"
#: Shorter values are not redacted: masking every "1" or "on" would garble all output, and
#: a value that short is no secret. Documented in SECURITY.md.
MIN_REDACT = 4
#: Where the secrets go, relative to deploy_to/shared (and so to every release).
SECRETS_FILE = ".env"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Values needing no quotes in a dotenv file (and no escaping in sh or systemd either).
_PLAIN_RE = re.compile(r"^[A-Za-z0-9_./:@%+,=-]*$")
_ASSIGN_RE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*)$")
_TMP_PREFIX = ".env.switchover-"


def check_private_file(path: Path, what: str) -> None:
    """Refuse a key or secrets file that group or others may read or write (as OpenSSH does).

    `what` names the config key, e.g. "switchover.toml: environments.prod.identity_file".
    """
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{what}: permissions {stat.S_IMODE(mode):04o} for {path} are too open: "
            "it must not be accessible by group or others",
            hint=f"chmod 600 {path}",
        )


# -- reading the values --------------------------------------------------------------------


def _unquote(raw: str) -> str:
    """The value of a dotenv right-hand side: quotes removed, \\n and friends decoded."""
    v = raw.strip()
    if len(v) >= 2 and v[0] == v[-1] == "'":
        return v[1:-1]
    if len(v) >= 2 and v[0] == v[-1] == '"':
        inner = v[1:-1]
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), inner,
                      flags=re.S)
    if " #" in v:  # an unquoted value ends at an inline comment
        v = v.split(" #", 1)[0].rstrip()
    return v


def env_file_values(text: str) -> list[str]:
    """Every value in a dotenv text, as written and as a parser would read it.

    Lenient on purpose: a line that is not NAME=VALUE is treated as a value, since redacting
    too much is harmless and too little is a leak. Quoted values may span lines.
    """
    values: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _ASSIGN_RE.match(line)
        if not m:
            values.append(line.strip())
            continue
        raw = m[2]
        quote = raw[:1]
        if quote in ("'", '"') and (len(raw.rstrip()) < 2 or raw.rstrip()[-1] != quote):
            # a quoted value continued on the next lines, up to its closing quote
            while i < len(lines):
                raw += "\n" + lines[i]
                i += 1
                if lines[i - 1].rstrip().endswith(quote):
                    break
        values += [raw.strip(), _unquote(raw)]
    return values


def dotenv_value(value: str) -> str:
    """Quote a value for a `NAME=value` line of the .env file.

    Plain when safe; else single quotes (literal everywhere); else double quotes with
    backslash escapes. `. .env` in sh reads any value without a newline back exactly; dotenv
    libraries also decode the `\\n` written for a newline.
    """
    if _PLAIN_RE.fullmatch(value):
        return value
    if "'" not in value and "\n" not in value and "\\" not in value:
        return f"'{value}'"
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
               .replace("`", "\\`").replace("\n", "\\n"))
    return f'"{escaped}"'


@dataclass(frozen=True)
class Secrets:
    """What to write to shared/.env. The repr never shows a value."""

    content: bytes = field(repr=False)
    names: tuple[str, ...]  # from_env names; safe to show
    values: tuple[str, ...] = field(repr=False)  # everything to redact


def load_secrets(env: Environment, *, strict: bool,
                 environ: Mapping[str, str] | None = None) -> Secrets | None:
    """Read the configured secrets, or None when there are none.

    strict (deploy): a `from_env` name missing from the environment is a ConfigError. Other
    commands only need the values to redact them, so they skip missing names.
    """
    cfg = env.secrets
    if cfg.env_file is None and not cfg.from_env:
        return None
    environ = os.environ if environ is None else environ
    where = f"{env.config_path}: secrets"
    parts: list[str] = []
    values: list[str] = []
    if cfg.env_file is not None:
        path = Path(cfg.env_file)
        check_private_file(path, f"{where}.env_file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}.env_file: {path} is not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"{where}.env_file: cannot read {path}: {e.strerror}") from None
        if "\0" in text:
            raise ConfigError(f"{where}.env_file: {path} contains a NUL byte")
        parts.append(text if not text or text.endswith("\n") else text + "\n")
        values += env_file_values(text)
    missing = [n for n in cfg.from_env if n not in environ]
    if missing and strict:
        raise ConfigError(
            f"{where}.from_env: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set in the environment",
            hint="export it before deploying (the value is read from switchover's environment)",
        )
    names = tuple(n for n in cfg.from_env if n in environ)
    for name in names:
        value = environ[name]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{where}.from_env: {name} is not valid UTF-8") from None
        parts.append(f"{name}={dotenv_value(value)}\n")
        values.append(value)
    return Secrets("".join(parts).encode("utf-8"), names, tuple(values))


# -- keeping them out of sight -------------------------------------------------------------


class Redactor:
    """Replace every secret value (and its quoted, JSON and per-line forms) with ***."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        needles: set[str] = set()
        for v in values:
            # As written in the .env file (`cat .env` in a hook), in JSON and in a repr.
            forms = {v, json.dumps(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1],
                     repr(v)[1:-1], dotenv_value(v).strip("'\"")}
            # Output is shown line by line: each line of a multi-line value is a secret too.
            forms |= {line.strip() for line in v.splitlines()}
            needles |= {f for f in forms if len(f) >= MIN_REDACT}
        # Longest first, so a value containing another is masked whole.
        ordered = sorted(needles, key=lambda s: (-len(s), s))
        self._re = re.compile("|".join(re.escape(n) for n in ordered)) if ordered else None

    def __bool__(self) -> bool:
        return self._re is not None

    def __call__(self, text: str) -> str:
        return self._re.sub(MASK, text) if self._re is not None and text else text


def redact_doc(doc: Any, redact: Callable[[str], str]) -> Any:
    """A copy of a JSON-like document with every string (keys too) redacted."""
    if isinstance(doc, str):
        return redact(doc)
    if isinstance(doc, Mapping):
        return {redact_doc(k, redact): redact_doc(v, redact) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [redact_doc(x, redact) for x in doc]
    if doc is None or isinstance(doc, (bool, int, float)):
        return doc
    return redact(str(doc))  # what json.dumps(default=str) would print


def redactor_for(env: Environment) -> Redactor:
    """The redactor for a command's output: every configured value that can be read."""
    found = load_secrets(env, strict=False)
    return Redactor(found.values if found else ())


# -- writing them to a host ----------------------------------------------------------------


def write_script(layout: Layout, size: int) -> str:
    """Read the secrets from stdin into shared/.env: temp file (0600) + rename.

    The content never appears in the script, only its length (to catch a cut-off stdin).
    """
    shared = layout.shared
    dest = f"{shared}/{SECRETS_FILE}"
    return "\n".join([
        "set -e",
        "umask 077",
        f"mkdir -p {q(shared)}",
        # `mv` onto a directory (or a link to one) would move the file *into* it.
        f"if [ -d {q(dest)} ]; then echo {q(dest)}' is a directory: refusing to replace it'"
        " >&2; exit 1; fi",
        # We hold the lock: a temp file left here is debris of a deploy that was killed.
        f"rm -f {q(shared)}/{_TMP_PREFIX}*",
        f'tmp={q(f"{shared}/{_TMP_PREFIX}")}"$$"',
        "trap 'rm -f \"$tmp\"' EXIT",
        'cat > "$tmp"',
        'n=$(wc -c < "$tmp" | tr -d " ")',
        f'[ "$n" = {int(size)} ] || {{ echo "secrets arrived incomplete ($n of {int(size)}'
        ' bytes)" >&2; exit 1; }',
        'chmod 600 "$tmp"',
        f'mv -f "$tmp" {q(dest)}',
        "",
    ])


def upload(ops: HostOps, secrets: Secrets) -> None:
    """Write the secrets to shared/.env on one host (content over stdin only)."""
    script = write_script(ops.layout, len(secrets.content))
    r = ops.transport.run(script, timeout=ops.timeout, input=secrets.content)
    if r.rc != 0:
        raise HostError(f"writing secrets to {ops.layout.shared}/{SECRETS_FILE} failed: "
                        f"{r.message}", host=ops.name)
