"""The README demo end to end (slow: about 12 minutes on 2 cores): synthetic data →
check → split → 5-fold cross-validation with the cpu preset, reaching the Dice
targets of the training issue on out-of-fold predictions."""

import json
from pathlib import Path

import pytest

from medseg.demo import run_demo

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"WT": 0.85, "TC": 0.75, "ET": 0.70}


@pytest.mark.slow
def test_demo_cross_validation_reaches_dice_targets(tmp_path):
    run = tmp_path / "run"
    # The folder name is part of the committed datalist's description.
    assert run_demo(tmp_path / "brats2023", REPO / "data_lists/demo_brats2023.json", run) == 0
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["cases"] == 40 and summary["folds"] == [0, 1, 2, 3, 4]
    for region, target in TARGETS.items():
        assert summary["overall"][region]["dice"]["mean"] >= target, region
