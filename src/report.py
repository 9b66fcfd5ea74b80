"""`python -m src.report <folder> [...] [--out DIR]`: tables of stored runs beside the published numbers

The code: `src/analysis/report.py`.
"""

from src.analysis.report import main
from src.runtime.errors import one_line_warnings, reported

if __name__ == "__main__":
    one_line_warnings()
    with reported():
        main()
