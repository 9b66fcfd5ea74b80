"""`python -m src.campaign experiment=<overlay> [...] [overrides] [--jobs N]`: a resumable campaign of experiment
overlays, stored in results/runs/.

The code: `src/cli/campaign.py`.
"""

import sys

from src.cli.campaign import main
from src.runtime.errors import reported

if __name__ == "__main__":
    with reported():
        sys.exit(main())
