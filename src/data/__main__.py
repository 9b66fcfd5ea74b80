"""`python -m src.data dataset=<name> protocol=<paper|clean>`: print the split summary as JSON."""

from __future__ import annotations

import json
import sys

from src.cli.config import load_config
from src.data.dataset import build
from src.runtime.errors import overrides_help, reported


def main(argv: list[str]) -> None:
    """Compose the config from `argv` overrides, build (or load) the split, print its summary."""
    cfg = load_config(argv)
    data = build(
        cfg.dataset,
        cfg.protocol,
        cfg.seed,
        cfg.data.root,
        cfg.data.cache_dir,
        verify=bool(cfg.data.verify),
    )
    print(json.dumps(data.summary(), indent=2))


if __name__ == "__main__":
    overrides_help(__doc__, sys.argv[1:])
    with reported():
        main(sys.argv[1:])
