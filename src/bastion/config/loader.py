"""Reading a config file: YAML to `Settings`, every problem with its key path and line, and
relative paths resolved against the file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bastion.config.settings import Settings, audit_path_problems, environment_problems
from bastion.config.upstreams import HttpUpstream, StdioUpstream
from bastion.errors import ConfigError

__all__ = [
    "load",
    "parse",
]


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a config file; raise ConfigError naming every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from exc
    return parse(text, source=str(file), base=file.parent)


def parse(text: str, *, source: str = "<config>", base: Path | None = None) -> Settings:
    """Validate YAML text into Settings; relative paths resolve against `base`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{source}{where}: not valid YAML: {exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source} (line 1): expected a mapping at the top level"])
    lines = _key_lines(node)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(error, lines) for error in exc.errors()]) from exc
    settings = _resolve_paths(settings, base) if base is not None else settings
    problems = {**audit_path_problems(settings), **environment_problems(settings)}
    if problems:
        raise ConfigError(
            [
                f"{key} (line {_nearest_line(lines, key)}): {problem}"
                for key, problem in problems.items()
            ]
        )
    return settings


def _nearest_line(lines: dict[tuple[str, ...], int], key: str) -> int:
    """The line of a key path, else of its nearest written parent (a defaulted key)."""
    parts = tuple(key.split("."))
    for cut in range(len(parts), 0, -1):
        if parts[:cut] in lines:
            return lines[parts[:cut]]
    return 1


def _describe(error: Any, lines: dict[tuple[str, ...], int]) -> str:
    # Discriminated unions put the tag ("http", "stdio") into loc; the user never wrote it.
    loc = tuple(str(part) for part in error["loc"] if part not in ("http", "stdio"))
    path = ".".join(loc) or "(top level)"
    line = None
    for cut in range(len(loc), -1, -1):
        line = lines.get(loc[:cut])
        if line is not None:
            break
    where = f" (line {line})" if line is not None else ""
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{path}{where}: {message}"


def _key_lines(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}

    def walk(current: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, current.start_mark.line + 1)
        if isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                child = (*path, str(key.value))
                lines[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(current, yaml.SequenceNode):
            for index, value in enumerate(current.value):
                walk(value, (*path, str(index)))

    if node is not None:
        walk(node, ())
    return lines


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    upstreams: dict[str, HttpUpstream | StdioUpstream] = {}
    for name, upstream in settings.upstreams.items():
        if upstream.cwd is not None:
            upstream = upstream.model_copy(update={"cwd": str((base / upstream.cwd).resolve())})
        upstreams[name] = upstream
    spiffe = tuple(
        domain.model_copy(update={"bundle": str((base / domain.bundle).resolve())})
        for domain in settings.auth.spiffe
    )
    auth = settings.auth.model_copy(update={"spiffe": spiffe})
    state_dir = str((base / settings.state_dir).resolve())
    files = tuple(str((base / f).resolve()) for f in settings.policy.files)
    policy = settings.policy.model_copy(update={"files": files})
    sinks = tuple(
        sink.model_copy(
            update={
                key: str((base / value).resolve())
                for key in ("path", "ca_file")
                if (value := getattr(sink, key)) is not None
            }
        )
        for sink in settings.audit.sinks
    )
    audit = settings.audit.model_copy(update={"sinks": sinks, **_audit_paths(settings, base)})
    listen, tls = settings.listen, settings.listen.tls
    if tls is not None:  # the listener's certificate and key files
        paths = {"cert": str((base / tls.cert).resolve()), "key": str((base / tls.key).resolve())}
        listen = listen.model_copy(update={"tls": tls.model_copy(update=paths)})
    return settings.model_copy(
        update={
            "listen": listen,
            "upstreams": upstreams,
            "auth": auth,
            "state_dir": state_dir,
            "policy": policy,
            "audit": audit,
        }
    )


def _audit_paths(settings: Settings, base: Path) -> dict[str, Any]:
    """The audit signer key file and anchor, resolved against the config file's folder."""
    update: dict[str, Any] = {}
    signer, anchor = settings.audit.signer, settings.audit.anchor
    if signer is not None and signer.path is not None:
        update["signer"] = signer.model_copy(update={"path": str((base / signer.path).resolve())})
    if anchor is not None:
        update["anchor"] = anchor.model_copy(update={"path": str((base / anchor.path).resolve())})
    return update
