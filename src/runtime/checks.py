"""The error of a bad config value, and what counts as an integer or a number (the schema's rules,
src/config/schema.py, use these)."""

from __future__ import annotations

import math
import os
from pathlib import Path
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


def writable_ancestor(key: str, value: str, path: Path, expected: str) -> None:
    """The nearest existing ancestor of `path` must be a folder this process can write (`expected`: what `key` is)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={value}: {probe} is a file; expected {expected}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: {probe} is not writable; expected a folder this user can write")


def check_output_dir(key: str, folder: str) -> None:
    """An output folder (`hydra.run.dir`, the plots' `--out`) must be one this process can create or write: checked
    before any work, instead of a raw OSError once the work is done."""
    writable_ancestor(key, folder, Path(folder).expanduser().absolute(), "a folder (or a path under one)")


def check_output_file(key: str, file: str) -> None:
    """An output file (`bench.out`, `audit.out`, a report's `--out`) must be a file path in a folder this process can
    create or write, checked before any work."""
    path = Path(file).expanduser().absolute()
    if path.is_dir():
        raise ConfigError(f"{key}={file} is a folder; expected the path of a file")
    writable_ancestor(key, file, path.parent, "a path under a folder")
