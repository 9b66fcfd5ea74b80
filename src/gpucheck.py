"""`python -m src.gpucheck [--device cuda] [--datasets ...]`: every round path on the GPU against the CPU

The code: `src/perf/gpucheck.py`.
"""

import sys

from src.perf.gpucheck import main
from src.runtime.errors import reported

if __name__ == "__main__":
    with reported():
        sys.exit(main())
