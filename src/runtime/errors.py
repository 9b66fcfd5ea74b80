"""One-line errors: a mistake in what the user gave prints `error: <what was wrong>; <what is expected>`, exit 2.

Every command (`src.run`, `src.campaign`, `src.report`, `src.audit`, `src.bench`, `src.flower.simulate`,
`src.data`) reports a `UserError` (a bad config value or override, data file, run folder or checkpoint) and
Hydra's own composition errors this way, with no traceback; `HYDRA_FULL_ERROR=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from hydra.errors import HydraException, MissingConfigException, OverrideParseException

EXIT_USAGE = 2  # what argparse and the shells use for a usage error


class UserError(Exception):
    """A mistake in the user's input (config value, override, data file, run folder); its message says what was
    wrong and what is expected, in one line."""


def full_errors() -> bool:
    """`HYDRA_FULL_ERROR=1`: show the traceback instead of the one line."""
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def flatten(text: str) -> str:
    """A multi-line message as one line: its non-empty lines joined by '; '."""
    return "; ".join(line.strip().rstrip(".") for line in str(text).splitlines() if line.strip())


def describe(err: BaseException) -> str:
    """The one-line message of a user error or of Hydra's composition errors."""
    if isinstance(err, MissingConfigException) and err.options:
        missing = err.missing_cfg_file or "the config"
        group = missing.rsplit("/", 1)[0] if "/" in missing else missing
        return f"no config {missing!r} in conf/; expected one of {group}: {', '.join(sorted(err.options))}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse override {err.override!r}; expected key=value (Hydra override syntax)"
    if isinstance(err, HydraException):
        cause = err.__cause__
        head = flatten(str(err))
        return head if cause is None or str(cause) in head else f"{head}; {flatten(str(cause).split(chr(10))[0])}"
    return flatten(str(err))


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


@contextmanager
def reported(prefix: str = "") -> Iterator[None]:
    """Inside the block, a `UserError` or a Hydra composition error ends the command with one line and exit 2
    (`prefix` names the job it belongs to); with `HYDRA_FULL_ERROR=1` it propagates with its traceback."""
    try:
        yield
    except (UserError, HydraException) as err:
        if full_errors():
            raise
        fail(prefix + describe(err))


def one_line_warnings() -> None:
    """Python warnings print as `warning: <message>`, one line each, without the source line that raised them (the
    reading tools' notes on skipped or duplicate runs are meant for the user, not for a debugger)."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {flatten(message)}\n"


def overrides_help(doc: str, argv: list[str]) -> None:
    """A command that takes Hydra overrides answers `-h` / `--help` with its docstring (exit 0), not with a parse
    error naming `--help` as an override."""
    if "-h" in argv or "--help" in argv:
        print(doc.strip())
        raise SystemExit(0)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ...; see --help`), exit 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        fail(message if "; expected" in message else f"{message}; expected the usage of `{self.prog} --help`")
