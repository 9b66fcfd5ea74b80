"""Where dataset files are looked for: config, environment, ../shared/data, then the download cache."""

from __future__ import annotations

import os
from pathlib import Path

from src.data.download import SHARED_DATA, download
from src.runtime.cache import default_cache_dir
from src.runtime.errors import UserError

ENV_VAR = "ALIGNFEDREC_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]


class DataNotFound(UserError, FileNotFoundError):
    """A dataset's files are not where the config, the environment or the defaults say (one line, exit 2)."""


def candidate_roots(config_root: str | None) -> list[tuple[str, Path]]:
    """Data roots in the order they are tried, each with the rule that produced it.

    A set $ALIGNFEDREC_DATA that is not a folder is an error, not skipped: the user asked for that root.
    """
    roots: list[tuple[str, Path]] = []
    if config_root:
        roots.append(("data.root", Path(config_root).expanduser()))
    if os.environ.get(ENV_VAR):
        env_root = Path(os.environ[ENV_VAR]).expanduser()
        if not env_root.is_dir():
            raise DataNotFound(
                f"${ENV_VAR}={os.environ[ENV_VAR]!r}: {env_root} is not an existing folder; expected a data root "
                f"holding <dataset>/ folders, or the variable unset to use ../shared/data or the download cache"
            )
        roots.append((ENV_VAR, env_root))
    if SHARED_DATA.is_dir():
        roots.append(("../shared/data", SHARED_DATA))
    roots.append(("download cache", default_cache_dir() / "data"))
    return roots


def resolve_dataset_dir(
    name: str, required: list[list[str]], config_root: str | None, allow_download: bool = True
) -> Path:
    """Return the first folder `<root>/<name>` holding one of the `required` file sets.

    `required` lists alternatives (e.g. the original ratings.dat, or the partial ML-1M files);
    an explicitly configured root that lacks the files is an error rather than silently skipped.
    """
    tried = []
    for rule, root in candidate_roots(config_root):
        folder = root / name
        if any(all((folder / f).is_file() for f in files) for files in required):
            return folder
        tried.append(f"{folder} ({rule})")
        if rule == "data.root":
            raise DataNotFound(
                f"data.root={config_root!r}: {folder} lacks the files of dataset {name!r}; expected one of {required}"
            )
        if rule == "download cache" and allow_download:
            download(name, root)
            return folder
    raise DataNotFound(
        f"dataset {name!r} not found; looked in: " + "; ".join(tried) + f"; expected one of {required} in one of them"
    )
