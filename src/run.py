"""`python -m src.run [overrides]`: one federated experiment, written to its Hydra run folder.

The code: `src/cli/train.py`.
"""

import sys

import hydra
from omegaconf import DictConfig

from src.cli.config import simulator_checks
from src.cli.jobs import check_command_line


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: the run of `cfg` (`src.cli.train.hydra_job`)."""
    # Lightning is imported once the command line has passed its checks: a bad input is refused in a second
    from src.cli.train import hydra_job

    return hydra_job(cfg)


if __name__ == "__main__":
    # every job composes and validates before Hydra starts the first; a moved key runs under its new name
    sys.argv[1:] = check_command_line(sys.argv[1:], simulator_checks)
    main()
