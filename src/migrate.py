"""`python -m src.migrate [FOLDER ...]`: add the method labels (`ablation.engine`, `ablation.unread`) to stored runs

The code: `src/cli/migrate.py`.
"""

from src.cli.migrate import main
from src.runtime.errors import reported

if __name__ == "__main__":
    with reported():
        main()
