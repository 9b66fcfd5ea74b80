"""The checks of config values, one line each: `<key>=<value> is invalid; expected <what>` (a `ConfigError`).

`src/cli/config.py` runs them on the shared keys and each method module (`src/methods/<name>.py`, its `validate`)
on its own keys, so a method's ranges live with the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from src.runtime.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is out of its valid range; the message names the key."""


def check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; expected {expected}")


def shown(value: Any) -> Any:
    """A config value as plain Python (lists and dicts of a DictConfig), for messages."""
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def get(cfg: DictConfig, key: str) -> Any:
    """The (resolved) value at dotted `key`; a missing key is a ConfigError."""
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing)
    if value is missing:
        raise ConfigError(f"{key} is missing; expected it in the composed config (conf/)")
    return value


def is_int(value: Any) -> bool:
    """An integer, and not a bool (True is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(cfg: DictConfig, key: str, minimum: int, nullable: bool = False, note: str = "") -> int | None:
    """The integer at `key`, >= minimum (or null when `nullable`); a float is refused, never truncated."""
    value = get(cfg, key)
    if nullable and value is None:
        return None
    expected = f"{'null or ' if nullable else ''}an integer >= {minimum}{note}"
    check(is_int(value) and value >= minimum, key, shown(value), expected)
    return value


def number(cfg: DictConfig, key: str, ok: Callable[[float], bool], bounds: str, nullable: bool = False) -> float | None:
    """The finite number at `key` with ok(value) true (`bounds` says which, e.g. '> 0' or 'in (0, 1]')."""
    value = get(cfg, key)
    if nullable and value is None:
        return None
    expected = f"{'null or ' if nullable else ''}a finite number {bounds}"
    check(is_number(value) and ok(value), key, shown(value), expected)
    return float(value)


def choice(cfg: DictConfig, key: str, options: tuple[Any, ...]) -> Any:
    """The value at `key`, one of `options` (compared with its type: 8.0 is not the choice 8)."""
    value = get(cfg, key)
    check(
        any(type(value) is type(o) and value == o for o in options),
        key,
        shown(value),
        "one of " + ", ".join(map(str, options)),
    )
    return value


def boolean(cfg: DictConfig, key: str) -> bool:
    value = get(cfg, key)
    check(isinstance(value, bool), key, shown(value), "true or false")
    return value


def positive(x: float) -> bool:
    return x > 0


def non_negative(x: float) -> bool:
    return x >= 0
