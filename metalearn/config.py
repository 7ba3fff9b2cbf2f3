"""Turn plain mappings into typed config dataclasses: unknown keys and wrong types fail early."""

import dataclasses
import types
import typing
from typing import Any, TypeVar

from metalearn.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `data`; `where` names the config section in error messages."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"valid keys of {where}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {key: _check(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    return cls(**values)


def _check(value: Any, hint: Any, key: str) -> Any:
    """Return `value` converted to `hint` (int -> float only), or raise a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range (about 1.8e308)
            raise ConfigError(f"{key} must be float, got {value} (too large for a float)") from None
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if hint is typing.Any:
        return value
    raise ConfigError(f"{key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")


def check_seed(value: Any, key: str) -> None:
    """A seed of torch's generators, which take less than 2**64 (evaluation adds small offsets)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ConfigError(f"{key} must be an integer in [0, 2**63), got {value!r}")


def as_dict(config: Any) -> dict[str, Any]:
    """A dataclass as a plain nested dict (for checkpoints, results and W&B)."""
    return dataclasses.asdict(config)
