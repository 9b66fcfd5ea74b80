"""The documentation cannot rot: the site builds with `mkdocs build --strict` (a broken link or a page missing from
the nav fails), and every generated table in README.md and docs/ equals what `src.report` makes of results/runs/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from src.analysis.report import block_kinds, generated, results_page_text

REPO = Path(__file__).resolve().parents[1]
GENERATED_IN = [
    REPO / "README.md",
    *(REPO / "docs" / f"{p}.md" for p in ("reproducing", "findings", "communication-privacy")),
]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "methods" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    assert {p.name for p in (REPO / "docs").glob("*.md")} == set(re.findall(r": (\S+\.md)$", nav, flags=re.M))


@pytest.mark.parametrize("path", GENERATED_IN, ids=lambda p: p.name)
def test_generated_tables_are_up_to_date_with_the_stored_runs(path):
    text = path.read_text()
    kinds = block_kinds(text)
    assert kinds, f"{path} holds no generated block"
    for kind in kinds:
        block = text.split(f"<!-- {kind} -->\n", 1)[1].split(f"\n<!-- /{kind} -->", 1)[0]
        assert block == generated(kind, REPO / "results" / "runs"), (
            f"{path.name}: the {kind} block is out of date; run "
            "`python -m src.report results/runs --update README.md docs/*.md`"
        )


def test_the_readme_is_a_how_to():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_the_results_page_is_up_to_date_with_the_stored_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    page = (REPO / "results" / "README.md").read_text()
    assert page == results_page_text(Path("results/runs"), Path("results")), (
        "results/README.md is out of date; run `python -m src.report results/runs --out results`"
    )
    for image in re.findall(r"\]\((curves/[^)]+\.png)\)", page):
        assert (REPO / "results" / image).is_file() and (REPO / "results" / image).with_suffix(".svg").is_file()
