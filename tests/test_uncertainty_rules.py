"""Uncertainty rules, pure numpy (no model): uncertainty needs at least 2 members,
a review threshold must separate poor from good cases (never +inf), it records the
member count it was chosen with, `check_calibration` validates a calibration from
any source, and the leave-one-fold-out thresholds by hand."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

# The module, not its names: a missing name fails one test, not the whole file.
import medseg.uncertainty as U
from medseg.errors import MedsegError
from medseg.labels import REGIONS

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "uncertainty.py"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/uncertainty.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_uncertainty", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- (1) uncertainty needs members ------------------------------------------------

@pytest.mark.parametrize("statistic", U.STATISTICS)
def test_one_member_has_no_uncertainty_map(statistic):
    # One model without mirror TTA: one member, std and MI 0 everywhere, every case
    # scored 0 and never flagged. It must be an error that says how to get members.
    s = U.MemberStats(entropy=True)
    s.add(np.full((3, 2, 2, 2), 0.7, np.float32))
    np.testing.assert_allclose(s.mean(), 0.7)             # the prediction itself is fine
    with pytest.raises(MedsegError, match=r"at least 2 members.*got 1.*mirror TTA.*several fold models"):
        s.maps((statistic,))
    s.add(np.full((3, 2, 2, 2), 0.3, np.float32))         # two members: a spread
    assert s.maps((statistic,))[statistic].shape == (3, 2, 2, 2)
    np.testing.assert_allclose(s.maps(("std",))["std"], 0.2, atol=1e-6)


@pytest.mark.parametrize("n, ok", [(0, False), (1, False), (2, True), (40, True)])
def test_require_members(n, ok):
    if ok:
        U.require_members(n)
    else:
        with pytest.raises(MedsegError, match=f"got {n}"):
            U.require_members(n)


# ---- (2)+(3) choosing a threshold ---------------------------------------------------

@pytest.mark.parametrize("scores, dice", [
    ([0.3] * 6, [0.9, 0.9, 0.9, 0.6, 0.6, 0.9]),                # all equal: nothing separates
    ([0.5, 0.625, 0.75, 0.125, 0.25, 0.875],                    # poor cases score lowest:
     [0.9, 0.9, 0.9, 0.6, 0.7, 0.9]),                          # no threshold has J > 0
])
def test_an_uninformative_score_gives_no_threshold(scores, dice):
    # Today's code returned threshold +inf (JSON Infinity): nothing ever flagged.
    with pytest.raises(MedsegError, match=r"does not separate poor from good.*no review threshold chosen"):
        U.choose_threshold(scores, dice, members=8)


def test_the_threshold_records_its_member_count():
    scores = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    dice = [0.95, 0.90, 0.92, 0.70, 0.60, 0.85]               # poor: 0.5 and 0.625
    got = U.choose_threshold(scores, dice, members=40)
    assert got["members"] == 40 and got["threshold"] == 0.4375   # halfway 0.375 → 0.5
    with pytest.raises(MedsegError, match="at least 2 members"):
        U.choose_threshold(scores, dice, members=1)
    with pytest.raises(MedsegError, match="finite scores"):
        U.choose_threshold([np.nan, *scores[1:]], dice, members=8)


# ---- (2) reading a calibration: one check for every source ------------------------

GOOD = {"statistic": "std", "case_score": "sum_ratio, max over regions", "threshold": 0.1457,
        "members": 8, "chosen_on": "a test"}


def test_check_calibration_accepts_a_good_record_and_notes_other_member_counts():
    assert GOOD["statistic"] == U.STATISTIC and GOOD["case_score"] == U.CASE_SCORE
    assert U.check_calibration(dict(GOOD), "cv/uncertainty.json", 8) == (0.1457, [])
    assert U.check_calibration(dict(GOOD), "cv/uncertainty.json", None) == (0.1457, [])
    t, notes = U.check_calibration(dict(GOOD), "the model's metadata", 40)
    assert t == 0.1457 and len(notes) == 1
    assert notes[0].startswith("chosen with 8 members per case, predicting with 40: ")
    # numpy scalars (a record built in Python, not read from JSON) are numbers too
    assert U.check_calibration({**GOOD, "threshold": np.float32(0.25), "members": np.int64(8)},
                               "a record", 8) == (0.25, [])


@pytest.mark.parametrize("change, match", [
    ({"threshold": float("inf")}, r"threshold inf; expected a finite number.*Infinity flags no case"),
    ({"threshold": float("-inf")}, r"threshold -inf; expected a finite number"),
    ({"threshold": float("nan")}, r"threshold nan; expected a finite number"),
    ({"threshold": None}, r"threshold None; expected a finite number"),
    ({"threshold": "0.1"}, r"threshold '0.1'; expected a finite number"),
    ({"threshold": True}, r"threshold True; expected a finite number"),
    ({"threshold": 1.5}, r"threshold 1.5; expected a finite number in \[0, 1\)"),
    ({"threshold": -0.1}, r"threshold -0.1; expected"),
    ({"statistic": "entropy"}, r"chosen for the 'entropy' map"),
    ({"case_score": "mean_near, max over regions"}, r"'mean_near, max over regions' score"),
    ({"members": None}, r"members None; expected the member count"),
    ({"members": 1}, r"members 1; expected"),
    ({"members": "8"}, r"members '8'; expected"),
    ({"members": True}, r"members True; expected"),
])
def test_check_calibration_refuses_bad_records(change, match):
    cal = {**GOOD, **change}
    with pytest.raises(MedsegError, match=r"^cv/uncertainty\.json: .*" + match + r".*--review-threshold"):
        U.check_calibration(cal, "cv/uncertainty.json", 8)


@pytest.mark.parametrize("drop", ["threshold", "members", "statistic"])
def test_check_calibration_refuses_missing_fields(drop):
    cal = {k: v for k, v in GOOD.items() if k != drop}
    with pytest.raises(MedsegError, match="cv/uncertainty.json: "):
        U.check_calibration(cal, "cv/uncertainty.json", 8)


def test_check_calibration_refuses_json_infinity_and_non_objects():
    # What `--write-calibration` wrote for an uninformative score, read back as predict does.
    text = json.dumps({**GOOD, "threshold": float("inf")})
    assert "Infinity" in text
    with pytest.raises(MedsegError, match="threshold inf"):
        U.check_calibration(json.loads(text), "runs/x/uncertainty.json", 8)
    with pytest.raises(MedsegError, match="expected a review calibration .* found list"):
        U.check_calibration([0.1], "the model's metadata", 8)


# ---- (4) leave-one-fold-out thresholds, by hand -------------------------------------
# Cases are (fold, case score, mean Dice); poor = Dice < 0.8. Scores are multiples of
# 1/16 so every halfway threshold is exact in binary (no ties broken by rounding).
# For each held-out fold: the other folds' threshold maximises Youden's J of
# "score ≥ t" for poor cases, halfway between the lowest flagged and the next lower
# score; on equal J the higher threshold wins (scikit-learn's ROC order).

A = [(0, 0.125, 0.9), (0, 0.625, 0.6),       # hold out 0: others .25g .5p .375g .4375g
     (1, 0.25, 0.9), (1, 0.5, 0.7),          #   ≥ .5 J = 1: t = (.5 + .4375)/2 = .46875
     (2, 0.375, 0.85), (2, 0.4375, 0.95)]    # hold out 1: ≥ .625 J = 1: t = (.625 + .4375)/2
#                                              hold out 2: ≥ .5 J = 1: t = (.5 + .25)/2 = .375,
#                                              which flags fold 2's 0.375 (≥) and 0.4375
B = [(0, 0.125, 0.9), (0, 0.25, 0.7), (0, 0.375, 0.9), (0, 0.5, 0.6),
     (1, 0.0625, 0.9), (1, 0.75, 0.6), (1, 0.3125, 0.9)]
#   hold out 0: others .0625g .75p .3125g: ≥ .75 J = 1: t = (.75 + .3125)/2 = .53125 → none of fold 0
#   hold out 1: others .125g .25p .375g .5p: J = .5 at ≥ .5 and at ≥ .25 (tie): the higher,
#               t = (.5 + .375)/2 = .4375 → fold 1's .75 only
C = [(0, 0.25, 0.9), (0, 0.5, 0.6),          # hold out 0: others .5g .25p, the poor case lowest:
     (1, 0.5, 0.9), (1, 0.25, 0.6)]          #   no J > 0 (the old code: t = +inf, no flag)
D = [(0, 0.25, 0.9), (0, 0.5, 0.9),          # hold out 0: others all poor
     (1, 0.75, 0.6), (1, 0.125, 0.7)]


@pytest.mark.parametrize("cases, thresholds, flagged, sensitivity, specificity", [
    (A, {0: 0.46875, 1: 0.53125, 2: 0.375}, [0, 1, 0, 0, 1, 1], 1 / 2, 2 / 4),
    (B, {0: 0.53125, 1: 0.4375}, [0, 0, 0, 0, 0, 1, 0], 1 / 3, 4 / 4),
])
def test_fold_thresholds_by_hand(cases, thresholds, flagged, sensitivity, specificity):
    folds, scores, dice = zip(*cases)
    got = U.fold_thresholds(scores, dice, folds, 0.8, members=8)
    assert got["thresholds"] == thresholds               # exact: dyadic scores
    assert got["flagged"].tolist() == [bool(f) for f in flagged]
    assert got["sensitivity"] == pytest.approx(sensitivity)
    assert got["specificity"] == pytest.approx(specificity)
    assert got["flagged_count"] == sum(flagged)


@pytest.mark.parametrize("cases, match", [
    (C, r"fold 0 held out: .*does not separate poor from good"),
    (D, r"fold 0 held out: .*2 of 2 cases have Dice < 0.8; it needs both poor and good"),
])
def test_fold_thresholds_name_the_fold_that_cannot_choose(cases, match):
    folds, scores, dice = zip(*cases)
    with pytest.raises(MedsegError, match=match):
        U.fold_thresholds(scores, dice, folds, 0.8, members=8)


def _rows(cases, members=8) -> list[dict]:
    """Benchmark rows whose case score (max over regions) and mean Dice are the case's."""
    methods = [f"{s}/{m}" for s in U.STATISTICS for m in U.SCORES] + ["soft_dice_error"]
    return [{"fold": k, "case": f"c{i}", "members": members, "dice": {r: d for r in REGIONS},
             "scores": {r: {m: s for m in methods} for r in REGIONS}} for i, (k, s, d) in enumerate(cases)]


def test_benchmark_thresholds_by_hand(bench):
    got = bench.thresholds(_rows(A, members=8), 0.8)
    # In sample: ≥ .5 flags both poor cases (.625, .5) and no good one (the highest is
    # .4375): J = 1, t = (.5 + .4375)/2.
    assert got["threshold"] == 0.46875 and got["youden_j"] == 1.0 and got["members"] == 8
    assert got["lofo_sensitivity"] == 0.5 and got["lofo_specificity"] == 0.5 and got["lofo_flagged"] == 3
    assert got["lofo_thresholds"] == {0: 0.46875, 1: 0.53125, 2: 0.375}
    # Rows of an earlier --out without "members" were one fold model x 8 flips.
    old = [{k: v for k, v in r.items() if k != "members"} for r in _rows(A)]
    assert bench.thresholds(old, 0.8)["members"] == 8
    with pytest.raises(MedsegError, match=r"\[8, 40\] members"):
        bench.thresholds(_rows(A[:3], 8) + _rows(A[3:], 40), 0.8)


def _benchmark_json(path: Path, cases) -> None:
    auroc = {f"{r}/{s}/{z}": 0.9 for r in REGIONS for s in U.STATISTICS for z in ("brain", "near")}
    auroc.update({f"{r}/wrong_fraction/{z}": 0.01 for r in REGIONS for z in ("brain", "near")})
    path.write_text(json.dumps({"rows": _rows(cases), "auroc": auroc}))


@pytest.mark.parametrize("informative", [True, False])
def test_write_calibration_records_members_and_refuses_infinity(bench, tmp_path, monkeypatch, capsys,
                                                                informative):
    # poor cases scoring highest (informative) or lowest (not: the old code wrote Infinity)
    cases = A if informative else [(0, 0.5, 0.9), (0, 0.125, 0.6), (1, 0.625, 0.9), (1, 0.25, 0.7)]
    _benchmark_json(tmp_path / "old.json", cases)
    run = tmp_path / "cv"
    run.mkdir()
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--run", str(run), "--datalist", "-", "--data-root", "-",
                                      "--time-cases", "0", "--brats-cases", "0", "--write-calibration",
                                      "--from-json", str(tmp_path / "old.json"),
                                      "--out", str(tmp_path / "out.json")])
    target = run / U.CALIBRATION
    if informative:
        bench.main()
        cal = json.loads(target.read_text())
        assert cal["members"] == 8 and cal["threshold"] == 0.46875
        assert U.check_calibration(cal, str(target), 8) == (0.46875, [])
    else:
        with pytest.raises(SystemExit) as exit_:
            bench.main()
        assert exit_.value.code == 2 and not target.exists()
        said = capsys.readouterr()
        assert "no review threshold: " in said.out
        assert re.search(r"^error: no review calibration written to .*does not separate poor", said.err, re.M)
        # the measurements are kept, with the reason there is no threshold
        out = json.loads((tmp_path / "out.json").read_text())
        assert "does not separate" in out["threshold"]["error"] and len(out["rows"]) == 4
    assert "Infinity" not in (tmp_path / "out.json").read_text()
