"""`python -m src.plots <kind> <folder> [...] [--out DIR]`: figures and tables of runs (PNG, SVG, CSV, Markdown)

The code: `src/analysis/plots.py`.
"""

from src.analysis.plots import main
from src.runtime.errors import one_line_warnings, reported

if __name__ == "__main__":
    one_line_warnings()
    with reported():
        main()
