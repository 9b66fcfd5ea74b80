"""A run's console: Lightning's start-up banners and its LeafSpec deprecation are silenced, nothing
else is, and the run ends with the best round beside what its numbers mean."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from src.runtime.loggers import quiet_fit, quiet_lightning

REPO = Path(__file__).resolve().parents[1]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_banners_are_dropped():
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        quiet_lightning()
        quiet_lightning()  # idempotent
        for text in (
            "GPU available: False, used: False",
            "TPU available: False, using: 0 TPU cores",
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
            "`Trainer.fit` stopped: `max_epochs=2` reached.",
            "GPU out of memory",
        ):
            rank_zero_info(text)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert handler.messages == ["`Trainer.fit` stopped: `max_epochs=2` reached.", "GPU out of memory"]


def test_only_the_leafspec_deprecation_is_ignored():
    leafspec = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and ...`"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_fit():  # what a run's fit is wrapped in
            for message, category, module in [
                (leafspec, FutureWarning, "lightning.pytorch.utilities._pytree"),
                ("something else is deprecated", FutureWarning, "lightning.pytorch.utilities._pytree"),
                (leafspec, FutureWarning, "src.clients.model"),
                (leafspec, UserWarning, "lightning.pytorch.utilities._pytree"),
            ]:
                warnings.warn_explicit(message, category, "x.py", 1, module=module)
    assert [(str(w.message), w.category) for w in seen] == [
        ("something else is deprecated", FutureWarning),
        (leafspec, FutureWarning),
        (leafspec, UserWarning),
    ]


def test_a_run_prints_no_banners_and_ends_with_what_its_numbers_mean(tmp_path, cache_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.run",
            "dataset=synthetic",
            "fl.rounds=2",
            f"data.cache_dir='{cache_dir}'",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for banner in ("GPU available:", "TPU available:", "litlogger", "LeafSpec"):
        assert banner not in text, banner
    assert "best round" in text and "val/hit@10" in text
    assert "at random (1 of 100 candidates)" in text and "full ranking" in text


@pytest.mark.parametrize(
    "module, documented",
    [
        ("src.audit", "src.audit"),
        ("src.data", "src.data.__main__"),
        ("src.campaign", "src.cli.campaign"),
    ],
)
def test_every_command_answers_help_with_its_whole_usage(module, documented):
    """`--help` prints the command's docstring and exits 0 (the override commands had parsed it as an override;
    argparse ones had shown only its first line, cut mid-sentence)."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    doc = importlib.import_module(documented).__doc__
    assert doc.strip().splitlines()[-1].strip() in out.stdout
