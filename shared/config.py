"""Typed configuration: pydantic models, YAML files, command-line overrides, saved resolved configs.

Every stage has one config model derived from :class:`Config`. A run resolves its config as

    defaults (the paper's settings)  <-  YAML file (optional)  <-  overrides ("a.b=value")

and saves the resolved config next to its outputs. An unknown or mistyped key is an error that
names the key, never a silent default.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration could not be loaded: unknown key, wrong type, unreadable file."""


class Config(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (update wins)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(cls: type[BaseModel], exc: ValidationError, source: str) -> str:
    lines = [f"invalid {cls.__name__} config ({source}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key {where!r}")
        else:
            lines.append(f"  - {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def read_yaml(uri: str) -> dict[str, Any]:
    """Read a YAML mapping from any fsspec URI; the error names the file."""
    from shared import storage

    try:
        text = storage.read_text(uri)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {uri}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {uri} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri} must hold a mapping at top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[C],
    path: str | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
) -> C:
    """Resolve a config: ``cls`` defaults, then the YAML file at ``path``, then ``overrides``."""
    data: dict[str, Any] = {}
    sources = ["defaults"]
    if path:
        data = deep_merge(data, read_yaml(path))
        sources.append(str(path))
    if overrides:
        update = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
        data = deep_merge(data, update)
        sources.append("overrides")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(cls, exc, " <- ".join(sources))) from None


def save_config(config: BaseModel, uri: str) -> None:
    """Write the resolved config as YAML, atomically, to any fsspec URI."""
    from shared import storage

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    storage.write_text(uri, text)
