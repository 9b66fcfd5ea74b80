"""`python -m src.audit [overrides]`: what an honest-but-curious server learns from one upload

The code: `src/analysis/audit.py`.
"""

import sys

from src.runtime.errors import overrides_help, reported

if __name__ == "__main__":
    overrides_help(__doc__, sys.argv[1:])  # before torch and Lightning are imported: --help at once, not after seconds
    from src.analysis.audit import main

    with reported():
        main(sys.argv[1:])
