"""The error of a bad config value, and what counts as an integer or a number (the schema's rules,
src/config/schema.py, use these)."""

from __future__ import annotations

import math
from typing import Any

from src.runtime.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is out of its valid range; the message names the key."""


def is_int(value: Any) -> bool:
    """An integer, and not a bool (True is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
