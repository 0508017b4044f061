"""YAML + dotted overrides -> typed config dataclasses, with errors naming file:line and key.

Generic over a dataclass tree (``RunConfig`` of config/schema.py by default): every key is checked against the
fields (unknown keys name the closest valid ones), every value against the field's type, and each
error carries where the value came from: ``file:line`` for keys of the YAML file, ``--set key``
for overrides. ``__post_init__`` checks of the sections raise ConfigError, re-located the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_mel.config.schema import RENAMED_KEYS, RunConfig
from megatron_mel.errors import ConfigError


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    cls: type[Any] = RunConfig,
) -> Any:
    """Build ``cls`` from a YAML file plus ``key.sub=value`` overrides (values parsed as YAML).

    Raises ConfigError naming ``file:line`` (for keys from the file) or ``--set key`` (for
    overrides) and what was expected.
    """
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        text = _read_text(Path(path))
        try:
            loaded = yaml.safe_load(text)
            lines = _key_lines(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
        data = loaded
    origins = {key: f"{source}:{line}" for key, line in lines.items()}
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        origins[key] = f"--set {key}"
        # A section the override created (``--set nosuch.key=1``) is the override's doing too.
        parts = key.split(".")
        for i in range(1, len(parts)):
            origins.setdefault(".".join(parts[:i]), f"--set {key}")
    try:
        return from_dict(cls, data, prefix="", origins=origins, source=source)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ check of a library type
        raise ConfigError(f"{source}: {exc}") from exc


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}:{_line_of(raw, exc.start)}: {not_utf8(raw, exc)}") from None


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def not_utf8(raw: bytes, exc: UnicodeDecodeError, of: str = "the file") -> str:
    """What to say about bytes that are not UTF-8 (shared by the recipe and dataset readers)."""
    byte = raw[exc.start : exc.start + 1].hex()
    return (
        f"not UTF-8 text (byte 0x{byte} at offset {exc.start} of {of}); save the file as "
        "UTF-8, e.g. with `iconv -f latin1 -t utf-8`"
    )


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set parallel.tp=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from exc
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML mapping tree to its 1-based line number."""
    out: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                out[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")

    root = yaml.compose(text)
    if root is not None:
        walk(root, "")
    return out


def from_dict(
    cls: type[Any],
    data: Any,
    *,
    prefix: str = "",
    origins: dict[str, str] | None = None,
    source: str = "<dict>",
) -> Any:
    """Instantiate dataclass ``cls`` from nested dicts, checking keys and types."""
    origins = origins or {}
    section = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_where(origins, prefix.rstrip('.'), source)}: {section} must be a mapping, "
            f"got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in RENAMED_KEYS:
            raise ConfigError(
                f"{_where(origins, dotted, source)}: {dotted} is now {RENAMED_KEYS[dotted]}"
            )
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{_where(origins, dotted, source)}: unknown key {dotted!r} in {section}{hint} "
                f"(valid: {', '.join(fields)})"
            )
        kwargs[key] = _coerce(hints[key], value, dotted, origins, source)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(f"{prefix}{m}" for m in missing)
        raise ConfigError(f"{source}: missing required key {keys}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(f"{_where(origins, key, source)}: {exc}") from None


def _where(origins: dict[str, str], dotted: str, source: str) -> str:
    while dotted:
        if dotted in origins:
            return origins[dotted]
        dotted = dotted.rpartition(".")[0]
    return source


def _coerce(tp: Any, value: Any, dotted: str, origins: dict[str, str], source: str) -> Any:
    where = _where(origins, dotted, source)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, dotted, origins, source)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{where}: {dotted}: {' or '.join(errors)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{where}: {dotted}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{dotted}.", origins=origins, source=source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {dotted}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{dotted}[{i}]", origins, source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {dotted}: expected a mapping, got {value!r}")
        return {
            str(k): _coerce(args[1], v, f"{dotted}.{k}", origins, source) for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "3e-6" (no dot) as a string; accept what Python reads as a float.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"config field {dotted} has unsupported type {tp!r}")
    raise ConfigError(f"{where}: {dotted}: expected {tp.__name__}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf of the config."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(to_dict(cfg), "")
    return out


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
