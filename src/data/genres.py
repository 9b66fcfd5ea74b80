"""MovieLens genres of a split's items, for evaluation-only diagnostics (never for training).

A film with several genres counts under its **first listed** genre: the first flag set in
ML-100K's `u.item` (in `u.genre` order: unknown, Action, Adventure, ...), the first name in
ML-1M's `movies.dat` (`Animation|Children's|Comedy` counts as Animation). The files are verified
against their known sha256 like every data file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.data.dataset import FedData
from src.data.download import file_digests, verify_known

FILES = {"ml-100k": "u.item", "ml-1m": "movies.dat"}


def first_genres(dataset: str, path: Path) -> dict[int, str]:
    """Original item id -> its first listed genre."""
    out: dict[int, str] = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        if dataset == "ml-100k":
            parts = line.split("|")
            flags = [i for i, flag in enumerate(parts[5:]) if flag == "1"]
            out[int(parts[0])] = f"genre{flags[0]}" if flags else "none"
        else:
            movie, _, genres = line.split("::")
            out[int(movie)] = genres.split("|")[0]
    return out


def item_genres(data: FedData, verify: bool = True) -> np.ndarray | None:
    """Genre index [m] of every item of the split (first listed genre), or None for datasets without genres."""
    name = FILES.get(data.name)
    if name is None or data.item_ids is None or data.folder == "synthetic":
        return None
    path = Path(data.folder) / name
    if not path.is_file():
        return None
    if verify:
        verify_known(data.name, path, file_digests(path))
    genres = first_genres(data.name, path)
    names = sorted(set(genres.values()) | {"none"})
    index = {g: i for i, g in enumerate(names)}
    return np.array([index[genres.get(int(i), "none")] for i in data.item_ids], dtype=np.int64)
