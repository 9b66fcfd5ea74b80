"""The tree shows the architecture: only the commands sit directly under src/ (a few lines each), no two modules
share a name, the run plumbing imports
none of the library, and no two packages import each other (directly or through others)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {"run", "campaign", "report", "plots", "audit", "bench", "gpucheck", "cooccurrence", "migrate"}


def package_imports() -> dict[str, set[str]]:
    """package -> the other packages of src/ its modules import (a package's `__main__` is a command: left out)."""
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).parts
        if len(parts) == 1 or parts[-1] == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("src.")]
            else:
                continue
            for name in names:
                other = name.split(".")[1]
                if other != parts[0] and (SRC / other).is_dir():
                    edges.setdefault(parts[0], set()).add(other)
    return edges


def test_only_commands_sit_directly_under_src():
    flat = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert flat == COMMANDS
    for name in flat:
        assert len((SRC / f"{name}.py").read_text().splitlines()) <= 30, f"src/{name}.py is more than a command"
    assert not list(SRC.glob("*.c"))


def test_no_two_modules_of_the_library_share_a_name():
    """(a command is named after the module it runs: `src/report.py` runs `src/analysis/report.py`)"""
    names = Counter(p.stem for p in SRC.glob("*/**/*.py") if p.stem not in ("__init__", "__main__"))
    assert [n for n, c in names.items() if c > 1] == []


def test_no_import_cycle_between_packages():
    edges = package_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    assert [(a, b) for a in edges for b in edges[a] if reaches(b, a)] == []
    assert edges.get("runtime", set()) == set(), "the run plumbing imports none of the library"


def test_pandas_is_imported_only_where_a_raw_file_is_read_or_split():
    """No module of src imports pandas when it is imported (only inside the functions that read raw files or split
    them, or for type checking): a run that reads its split from the cache starts without it."""
    at_top = []
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: a function's body is not walked
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n == "pandas" or n.startswith("pandas.") for n in names):
                at_top.append(str(path.relative_to(SRC)))
    assert at_top == []


def runs_as_main(path: Path) -> bool:
    """Whether a module has a top-level `if __name__ == "__main__":` (not merely the words in a docstring)."""
    for node in ast.parse(path.read_text()).body:
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__":
            if [getattr(c, "value", None) for c in test.comparators] == ["__main__"]:
                return True
    return False


def test_every_module_a_script_or_page_runs_is_a_command():
    """Every `python -m src...` in the Makefile, deploy/, the README and docs/ names a module that runs something
    (a `__main__` guard, or a package's `__main__.py`): a moved module would otherwise import, do nothing and exit
    0, as `make gpu-check` once did."""
    root = SRC.parent
    texts = [root / "Makefile", root / "README.md", *root.glob("deploy/*.sh"), *root.glob("docs/*.md")]
    named = {m for path in texts for m in re.findall(r"-m (src(?:\.\w+)+)", path.read_text())}
    assert {"src.run", "src.gpucheck", "src.campaign"} <= named
    idle = []
    for module in sorted(named):
        path = root.joinpath(*module.split("."))
        code = (path / "__main__.py") if path.is_dir() else path.with_suffix(".py")
        if not (code.is_file() and (code.name == "__main__.py" or runs_as_main(code))):
            idle.append(module)
    assert idle == []
