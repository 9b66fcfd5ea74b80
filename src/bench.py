"""`python -m src.bench [overrides]`: where a round's time goes, side by side with a baseline

The code: `src/perf/bench.py`.
"""

import sys

from src.runtime.errors import overrides_help, reported

if __name__ == "__main__":
    overrides_help(__doc__, sys.argv[1:])  # before torch and Lightning are imported: --help at once, not after seconds
    from src.perf.bench import main

    with reported():
        main(sys.argv[1:])
