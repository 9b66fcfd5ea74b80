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
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GENERATED_IN = [p for p in PAGES if block_kinds(p.read_text())]
BLOCK = re.compile(r"<!-- (\S+) -->\n(.*?)\n<!-- /\1 -->", re.S)
MEAN_STD = re.compile(r"\d+\.\d\d ± \d+\.\d\d")  # a figure over seeds, as the generated tables print it


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


def test_generated_tables_are_found_in_every_page_that_has_them():
    names = {p.name for p in GENERATED_IN}
    assert {"README.md", "reproducing.md", "findings.md", "communication-privacy.md", "performance.md"} <= names


def test_every_figure_over_seeds_in_the_prose_is_one_a_generated_table_shows():
    """Prose may quote a table's mean ± std, never a figure of its own: once the tables are regenerated from new
    runs, a quote that no longer matches fails here instead of going stale."""
    pages = [*PAGES, REPO / "results" / "README.md"]
    shown = {f for p in pages for m in BLOCK.finditer(p.read_text()) for f in MEAN_STD.findall(m.group(2))}
    quoted = [(p.name, f) for p in pages for f in MEAN_STD.findall(BLOCK.sub("", p.read_text()))]
    assert quoted and [q for q in quoted if q[1] not in shown] == []


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
