"""`python -m src.migrate [FOLDER ...]`: stored runs up to the method labels and the folder names of today

The code: `src/cli/migrate.py`.
"""

from src.cli.migrate import main
from src.runtime.errors import reported

if __name__ == "__main__":
    with reported():
        main()
