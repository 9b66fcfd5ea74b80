"""`python -m src.plots <kind> <folder> [...] [--out DIR]`: figures and tables of runs (PNG, SVG, CSV, Markdown)

The code: `src/analysis/plots.py`.
"""

from src.analysis.plots import main
from src.runtime.errors import reported

if __name__ == "__main__":
    with reported():
        main()
