"""`python -m src.run [overrides]`: one federated experiment, written to its Hydra run folder.

The code: `src/cli/train.py`.
"""

import sys

import hydra
from omegaconf import DictConfig

from src.cli.jobs import check_command_line
from src.cli.train import hydra_job


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: the run of `cfg` (`src.cli.train.hydra_job`)."""
    return hydra_job(cfg)


if __name__ == "__main__":
    # every job composes and validates before Hydra starts the first; a moved key runs under its new name
    sys.argv[1:] = check_command_line(sys.argv[1:])
    main()
