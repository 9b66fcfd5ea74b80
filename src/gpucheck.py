"""`python -m src.gpucheck [--device cuda] [--datasets ml-100k,ml-1m,filmtrust,lastfm-2k] [--clients 48]
[--rtol 1e-4] [--no-full] [--out gpu_check.json] [overrides ...]`

Every round path on the device against the CPU, per dataset, then one full-size round of each fast path on the
device (`make gpu-check`; exit status 1 when any comparison fails). The code, and what it compares:
`src/perf/gpucheck.py`.
"""

import sys

from src.runtime.errors import overrides_help, reported

if __name__ == "__main__":
    overrides_help(__doc__, sys.argv[1:])  # before torch is imported: --help at once, not after seconds
    from src.perf.gpucheck import main

    with reported():
        sys.exit(main())
