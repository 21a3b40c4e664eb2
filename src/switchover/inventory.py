"""Hosts from an Ansible-style inventory (INI or YAML) or a plain list file.

Many teams already keep their fleet in an Ansible inventory; reading it avoids a second
list that drifts. Supported: groups, `[group:children]` / `children:` nesting, and the
`ansible_host`, `ansible_user` and `ansible_port` variables. Patterns, ranges
(`web[01:50]`) and dynamic inventories are not: they are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from switchover.hosts import HostSpec, parse_host

_SECTION = re.compile(r"^\[([^\]:]+)(?::(\w+))?\]\s*$")


class InventoryError(ValueError):
    pass


def _spec(name: str, variables: dict[str, Any], where: str) -> HostSpec:
    if "[" in name and ":" in name:
        raise InventoryError(f"{where}: host ranges like {name!r} are not supported")
    try:
        base = parse_host(str(variables.get("ansible_host", name)))
        user = variables.get("ansible_user", base.user)
        port = variables.get("ansible_port", base.port)
        spec = parse_host(
            (f"{user}@" if user else "") + (f"[{base.host}]" if ":" in base.host else base.host)
            + (f":{int(port)}" if port else "")
        )
        parse_host(name)  # the inventory name itself must be a sane label
    except (ValueError, TypeError) as e:
        raise InventoryError(f"{where}: host {name!r}: {e}") from None
    label = name if "ansible_host" in variables or "ansible_user" in variables or (
        "ansible_port" in variables) else None
    return HostSpec(host=spec.host, user=spec.user, port=spec.port, label=label)


def _resolve(group: str, hosts: dict[str, list[tuple[str, dict[str, Any]]]],
             children: dict[str, list[str]], where: str) -> list[HostSpec]:
    out: list[HostSpec] = []
    seen: set[str] = set()

    def walk(g: str, depth: int) -> None:
        if depth > 20:
            raise InventoryError(f"{where}: group nesting too deep (a cycle?) at {g!r}")
        if g not in hosts and g not in children:
            raise InventoryError(f"{where}: no group {g!r}")
        for name, variables in hosts.get(g, []):
            if name not in seen:
                seen.add(name)
                out.append(_spec(name, variables, where))
        for child in children.get(g, []):
            walk(child, depth + 1)

    walk(group, 0)
    return out


def parse_ini(text: str, group: str, where: str = "inventory") -> list[HostSpec]:
    hosts: dict[str, list[tuple[str, dict[str, Any]]]] = {"ungrouped": []}
    children: dict[str, list[str]] = {}
    section, kind = "ungrouped", None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip() if not raw.lstrip().startswith(
            ("#", ";")) else ""
        if not line:
            continue
        m = _SECTION.match(line)
        if m:
            section, kind = m.group(1), m.group(2)
            if kind == "children":
                children.setdefault(section, [])
            elif kind is None:
                hosts.setdefault(section, [])
            continue
        if kind == "vars":
            continue
        if kind == "children":
            children[section].append(line.split()[0])
            continue
        parts = line.split()
        variables: dict[str, Any] = {}
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise InventoryError(f"{where}:{n}: expected key=value, got {item!r}")
            variables[key] = value.strip("'\"")
        hosts.setdefault(section, []).append((parts[0], variables))
    if group == "all":
        children["all"] = [g for g in {*hosts, *children} if g != "all"]
    return _resolve(group, hosts, children, where)


def parse_yaml(text: str, group: str, where: str = "inventory") -> list[HostSpec]:
    import yaml  # only YAML inventories pay for it; every command starts faster without

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InventoryError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{where}: expected a mapping of groups")
    hosts: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    children: dict[str, list[str]] = {}

    def load(name: str, body: Any) -> None:
        body = body or {}
        if not isinstance(body, dict):
            raise InventoryError(f"{where}: group {name!r} must be a mapping")
        entries = []
        for host, variables in (body.get("hosts") or {}).items():
            entries.append((str(host), variables if isinstance(variables, dict) else {}))
        hosts[name] = hosts.get(name, []) + entries
        for child, child_body in (body.get("children") or {}).items():
            children.setdefault(name, []).append(str(child))
            load(str(child), child_body)

    for name, body in data.items():
        load(str(name), body)
    return _resolve(group, hosts, children, where)


def load_inventory(path: Path, group: str | None) -> list[HostSpec]:
    try:
        text = path.read_text()
    except OSError as e:
        raise InventoryError(f"{path}: cannot read inventory: {e.strerror}") from None
    where = str(path)
    if path.suffix in (".yml", ".yaml"):
        return parse_yaml(text, group or "all", where)
    return parse_ini(text, group or "all", where)


def load_host_list(path: Path) -> list[HostSpec]:
    """One host spec per line; blank lines and # comments ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InventoryError(f"{path}: cannot read host list: {e.strerror}") from None
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            try:
                out.append(parse_host(line))
            except ValueError as e:
                raise InventoryError(f"{path}:{n}: {e}") from None
    return out
