"""`python -m src.bench [overrides]`: where a round's time goes, side by side with a baseline

The code: `src/perf/bench.py`.
"""

import sys

from src.perf.bench import main
from src.runtime.errors import overrides_help, reported

if __name__ == "__main__":
    overrides_help(__doc__, sys.argv[1:])
    with reported():
        main(sys.argv[1:])
