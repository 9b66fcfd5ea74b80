"""`python -m src.cooccurrence [--datasets ...]`: what the server graph can hold at most, from the data alone

The code: `src/analysis/cooccurrence.py`.
"""

import sys

from src.analysis.cooccurrence import main
from src.runtime.errors import reported

if __name__ == "__main__":
    with reported():
        main(sys.argv[1:])
