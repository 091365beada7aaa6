"""Reading settings (TOML file, then ``ZBROKER_*`` overrides, then validation) and writing them back.

Every problem becomes one line of a ``ConfigError`` that names the key as it is written in TOML
(``[cluster] nodes[1].peer_endpoint``) and, for an override, the variable it came from.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from client.errors import ConfigError
from config.durations import format_duration, format_size
from config.schema import ClusterMember, ClusterSettings, NodeSettings, Settings, Unit

__all__ = ["dump_settings_toml", "load_settings"]

_SECTIONS: dict[str, type[BaseModel]] = {"node": NodeSettings, "cluster": ClusterSettings}
_CLUSTER_NODES_HELP = (
    'a JSON array like [{"id": "n1", "client_endpoint": "tcp://…", "peer_endpoint": "tcp://…"}]'
)

# (section, TOML key) -> the ZBROKER_* variable that set it.
_Origins = dict[tuple[str, str], str]


def _toml_keys(model: type[BaseModel]) -> list[str]:
    return [field.serialization_alias or name for name, field in model.model_fields.items()]


def load_settings(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Settings:
    """Read, override and validate a node's settings.

    Args:
        path: The TOML file to read; ``None`` means no file, so every key takes its default.
        env: Where ``ZBROKER_NODE_*`` and ``ZBROKER_CLUSTER_*`` overrides are read; ``os.environ``
            when ``None``. Other ``ZBROKER_*`` variables (e.g. ``ZBROKER_ENDPOINTS``) are ignored.

    Returns:
        The validated, immutable settings.

    Raises:
        ConfigError: If the file is missing or not TOML, a variable is unknown or malformed, or a
            value is invalid; the message has one line per problem, each naming its key.
    """
    source = None if path is None else str(path)
    raw = {} if path is None else _read_toml(Path(path))
    origins = _apply_env(raw, os.environ if env is None else env)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error, origins, source) for error in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file; check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from None


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> _Origins:
    """Write ``ZBROKER_NODE_*`` / ``ZBROKER_CLUSTER_*`` values into ``raw``; return where each came from."""
    origins: _Origins = {}
    problems: list[str] = []
    for variable in sorted(env):
        for section, model in _SECTIONS.items():
            prefix = f"ZBROKER_{section.upper()}_"
            if not variable.startswith(prefix):
                continue
            key = variable.removeprefix(prefix).lower()
            keys = _toml_keys(model)
            if key not in keys or variable != prefix + key.upper():
                names = ", ".join(prefix + known.upper() for known in keys)
                problems.append(f"{variable}: unknown variable; the [{section}] overrides are {names}")
                continue
            value: Any = env[variable]
            if (section, key) == ("cluster", "nodes"):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    problems.append(f"{variable}: not valid JSON ({exc}); expected {_CLUSTER_NODES_HELP}")
                    continue
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                problems.append(f"{variable}: cannot override a key of [{section}], which is not a table")
                continue
            table[key] = value
            origins[(section, key)] = variable
    if problems:
        raise ConfigError("\n".join(problems))
    return origins


def _describe(error: ErrorDetails, origins: _Origins, source: str | None) -> str:
    """Render one pydantic error as ``[section] key.path: what is wrong``."""
    loc = error["loc"]
    message = _message(error)
    if not loc:
        text = message  # a check across sections, which names its keys itself
    elif len(loc) == 1 and error["type"] == "extra_forbidden":
        text = f"{loc[0]}: unknown top-level key; expected the tables [node] and [cluster]"
    elif len(loc) == 1:
        text = f"[{loc[0]}] {message}"
    else:
        text = f"[{loc[0]}] {_key_path(loc[1:])}: {message}"
    key = (str(loc[0]), str(loc[1])) if len(loc) >= 2 else None
    if key in origins:
        return f"{text} (from {origins[key]})"
    if key is None:  # a check across keys: name every override that may have fed it
        variables = [variable for (section, _), variable in origins.items() if not loc or section == loc[0]]
        if variables:
            text += f" (with overrides {', '.join(variables)})"
    return text if source is None else f"{source}: {text}"


def _message(error: ErrorDetails) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key" + _did_you_mean(error["loc"])
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "value_error" and "ctx" in error:
        return str(error["ctx"]["error"])  # our own validators' messages already include the value
    given = error["input"]
    if isinstance(given, str | int | float | bool):
        return f"{error['msg']}, got {given!r}"
    return error["msg"]


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    model = _SECTIONS.get(str(loc[0]), NodeSettings) if len(loc) == 2 else ClusterMember
    close = difflib.get_close_matches(str(loc[-1]), _toml_keys(model), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _key_path(parts: tuple[int | str, ...]) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def dump_settings_toml(settings: Settings) -> str:
    """Render ``settings`` as TOML that ``load_settings`` reads back to equal settings."""
    lines = ["[node]", *_table_lines(settings.node)]
    cluster = settings.cluster
    if cluster is not None:
        lines += ["", "[cluster]", *_table_lines(cluster)]
        if cluster.nodes:
            lines.append("nodes = [")
            lines += [f"    {_inline_table(member)}," for member in cluster.nodes]
            lines.append("]")
    return "\n".join(lines) + "\n"


def _table_lines(model: BaseModel) -> list[str]:
    lines = []
    for name, field in type(model).model_fields.items():
        if name != "nodes":  # an array of tables, written after the scalars by the caller
            lines.append(
                f"{field.serialization_alias or name} = {_toml_value(getattr(model, name), field.metadata)}"
            )
    return lines


def _inline_table(model: BaseModel) -> str:
    pairs = (
        f"{field.serialization_alias or name} = {_toml_value(getattr(model, name), field.metadata)}"
        for name, field in type(model).model_fields.items()
    )
    return "{ " + ", ".join(pairs) + " }"


def _toml_value(value: object, metadata: list[Any]) -> str:
    if Unit.SECONDS in metadata and isinstance(value, float):
        return _toml_string(format_duration(value))
    if Unit.BYTES in metadata and isinstance(value, int):
        return _toml_string(format_size(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return _toml_string(str(value))


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """Quote ``text`` as a TOML basic string, escaping what TOML forbids raw."""
    escaped = (
        _ESCAPES.get(char, f"\\u{ord(char):04X}" if ord(char) < 0x20 or ord(char) == 0x7F else char)
        for char in text
    )
    return '"' + "".join(escaped) + '"'
