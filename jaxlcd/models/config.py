"""Model configs read from the original config.json, validated at the boundary.

Each model has a frozen dataclass of the keys it uses. ``from_dict`` checks values and raises
`ConfigError` naming the key; ``to_dict`` returns the original JSON dict with the known keys
overwritten, so a saved config.json keeps keys jaxlcd does not use.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable
from jaxlcd.errors import InputError


class ConfigError(InputError):
    """A model config.json holds a value the Flax port does not support."""


def _to_json(value):
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base: subclasses add fields; ``source`` keeps the original dict as JSON (hashable)."""
    source: str = "{}"

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "ModelConfig":
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "source":
                continue
            if f.name in overrides:
                kwargs[f.name] = overrides[f.name]
            elif f.name in d and d[f.name] is not None:
                v = d[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        cfg = cls(source=json.dumps(d, sort_keys=True), **kwargs)
        cfg.validate(d)
        return cfg

    def validate(self, d: dict) -> None:
        """Raise ConfigError for unsupported values (override per model)."""

    def to_dict(self) -> dict:
        d = json.loads(self.source)
        for f in dataclasses.fields(self):
            if f.name != "source":
                d[f.name] = _to_json(getattr(self, f.name))
        return d


def require(d: dict, key: str, allowed: Iterable[Any], default: Any = None, what: str = "config") -> None:
    """Raise ConfigError unless ``d[key]`` (or ``default`` when absent) is one of ``allowed``."""
    value = d.get(key, default)
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{what}: {key}={value!r} is not supported by the Flax port; supported: {allowed}")


def per_block(value, n: int, key: str) -> tuple:
    """An int-or-list config value as a tuple of length n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"config: {key} has {len(value)} entries but there are {n} blocks")
        return tuple(value)
    return (value,) * n
