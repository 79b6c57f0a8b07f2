"""IoU (Jaccard) per region and the case's mean IoU: hand-computed under every rule
set (each takes its own Dice conventions for empty masks), then the outputs that
report it: metric rows, metrics.csv/summary.json of `medseg evaluate`, the printed
table and the report page."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.evaluate import evaluate_folder, format_table, metric_rows, read_rows, summarize, write_rows
from medseg.metrics import iou, mean_iou, score_case, score_region
from medseg.scoring import ALL_METRICS, RULE_SETS, get_rules, rule_metrics

NAN = float("nan")
SHAPE = (8, 4, 4)


def line(lo, hi, shape=SHAPE):
    """Voxels x = lo..hi-1 on one row (y = z = 1): hand-countable masks."""
    m = np.zeros(shape, bool)
    m[lo:hi, 1, 1] = True
    return m


EMPTY = np.zeros(SHAPE, bool)


def _same(got, want):
    return math.isnan(want) and math.isnan(got) or got == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------- per region
@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_both_empty_follows_the_rule_sets_dice(rules):
    r = get_rules(rules)
    m = score_region(EMPTY, EMPTY, (1, 1, 1), r)
    want = NAN if r.both_empty == "nan" else 1.0        # brats-eval NaN, the others 1
    assert _same(m["iou"], want) and _same(m["dice"], want)


@pytest.mark.parametrize("rules", list(RULE_SETS))
@pytest.mark.parametrize("which", ["pred empty", "ref empty"])
def test_one_empty_is_zero(rules, which):
    mask = line(1, 4)
    pred, ref = (EMPTY, mask) if which == "pred empty" else (mask, EMPTY)
    m = score_region(pred, ref, (1, 1, 1), get_rules(rules))
    assert m["iou"] == 0.0 and m["dice"] == 0.0


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_known_overlap(rules):
    # pred x = 0, 1, 2 (3 voxels), ref x = 1..4 (4 voxels): overlap 2, union 5.
    m = score_region(line(0, 3), line(1, 5), (1, 1, 1), get_rules(rules))
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["iou"] == pytest.approx(m["dice"] / (2 - m["dice"]))     # the voxelwise identity


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_disjoint_is_zero(rules):
    m = score_region(line(0, 2), line(4, 7), (1, 1, 1), get_rules(rules))
    assert m["iou"] == 0.0 and m["dice"] == 0.0


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_iou_is_dice_over_two_minus_dice_and_spacing_free(rules):
    a = np.zeros((10, 9, 8), bool)
    b = np.zeros_like(a)
    a[1:6, 2:7, 1:5] = True             # 100 voxels
    b[3:8, 1:6, 2:7] = True             # 125 voxels; overlap 3·4·3 = 36
    for spacing in ((1, 1, 1), (2, 1, 0.5)):
        m = score_region(a, b, spacing, get_rules(rules))
        assert m["iou"] == pytest.approx(36 / (100 + 125 - 36))
        assert m["iou"] == pytest.approx(m["dice"] / (2 - m["dice"]))


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_iou_column_follows_dice(rules):
    r = get_rules(rules)
    cols = rule_metrics(r)
    assert cols[:2] == ("dice", "iou") and "lesion_iou" not in cols   # no lesion-wise IoU
    assert tuple(score_region(line(0, 3), line(1, 5), (1, 1, 1), r)) == cols
    assert {"iou", "mean_iou"} <= set(ALL_METRICS)


def test_plain_iou_function():
    assert iou(EMPTY, EMPTY) == 1.0
    assert iou(EMPTY, line(0, 3)) == 0.0 and iou(line(0, 3), EMPTY) == 0.0
    assert iou(line(0, 3), line(1, 5)) == pytest.approx(2 / 5)


# ----------------------------------------------------------------------------- per case
@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_mean_iou_is_the_mean_of_the_regions(rules):
    r = get_rules(rules)
    # TC: 2 of 3 vs 4 → 2/5; WT: 3 vs 3 identical → 1; ET: both empty → 1 or NaN.
    pred = np.stack([line(0, 3), line(0, 3), EMPTY])
    ref = np.stack([line(1, 5), line(0, 3), EMPTY])
    case = score_case(pred, ref, (1, 1, 1), r)
    want = (2 / 5 + 1) / 2 if r.both_empty == "nan" else (2 / 5 + 1 + 1) / 3   # NaN left out
    assert mean_iou(case) == pytest.approx(want)
    rows = metric_rows("c1", case, rules=rules)
    assert [row["iou"] for row in rows[:2]] == pytest.approx([2 / 5, 1.0])
    assert [row["mean_iou"] for row in rows] == pytest.approx([want] * 3)
    assert list(rows[0])[3:] == list(rule_metrics(r)) + ["mean_iou"]


def test_mean_iou_of_nothing_is_nan():
    case = {reg: {"iou": NAN} for reg in ("TC", "WT", "ET")}
    assert math.isnan(mean_iou(case))
    case["WT"]["iou"] = 0.5
    assert mean_iou(case) == 0.5


def test_summary_has_iou_and_mean_iou_and_rows_round_trip(tmp_path):
    rows = []
    for cid, lo in (("a", 0), ("b", 1)):    # TC: x 0..2 then 1..2 vs 1..4 → IoU 2/5, 2/4
        pred = np.stack([line(lo, 3), line(0, 3), line(0, 2)])
        ref = np.stack([line(1, 5), line(0, 3), line(0, 2)])
        rows += metric_rows(cid, score_case(pred, ref, (1, 1, 1), get_rules("brats21")))
    s = summarize(rows)
    assert s["TC"]["iou"]["mean"] == pytest.approx((2 / 5 + 2 / 4) / 2)
    assert s["WT"]["iou"]["mean"] == 1.0
    assert s["ET"]["mean_iou"] == s["TC"]["mean_iou"]
    assert s["TC"]["mean_iou"]["mean"] == pytest.approx(((2 / 5 + 2) / 3 + (2 / 4 + 2) / 3) / 2)
    write_rows(rows, tmp_path / "m.csv")
    assert read_rows(tmp_path / "m.csv") == rows
    table = format_table(s)
    assert re.search(r"^IoU\s+0\.450", table, re.M) and "mean IoU" in table
    # Rows written before IoU existed still summarise (without it).
    legacy = [{k: v for k, v in row.items() if k not in ("iou", "mean_iou")} for row in rows]
    old = summarize(legacy)
    assert "iou" not in old["TC"] and "mean_iou" not in old["TC"] and "IoU" not in format_table(old)


# ----------------------------------------------------------------------------- evaluate
AFFINE = np.eye(4)


def _nii(arr, path: Path, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(dtype), AFFINE), str(path))


def _ref():
    """brats2023 labels: WT = 4³ edema box (64 voxels) holding a 2³ necrosis core
    (TC, 8 voxels); no enhancing tumour (ET empty)."""
    ref = np.zeros((12, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 2
    ref[3:5, 3:5, 3:5] = 1
    return ref


# The prediction is the reference moved 1 voxel along x: WT overlap 3·4·4 = 48 of a
# union of 80 → 3/5; TC overlap 1·2·2 = 4 of 12 → 1/3; ET both empty.
WANT = {"brats21": (1 / 3, 3 / 5, 1.0), "brats23": (1 / 3, 3 / 5, 1.0),
        "brats23-met": (1 / 3, 3 / 5, 1.0), "brats-eval": (1 / 3, 3 / 5, NAN)}


@pytest.mark.parametrize("rules", list(WANT))
def test_evaluate_writes_iou_and_mean_iou(tmp_path, rules):
    ref = _ref()
    _nii(ref, tmp_path / "ref" / "c1.nii.gz")
    _nii(np.roll(ref, 1, axis=0), tmp_path / "pred" / "c1.nii.gz")
    summary = evaluate_folder(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", "brats2023", rules)
    with open(tmp_path / "out" / "metrics.csv", newline="") as fh:
        rows = {r["region"]: r for r in csv.DictReader(fh)}
    want = dict(zip(("TC", "WT", "ET"), WANT[rules]))
    for reg, v in want.items():
        assert _same(float(rows[reg]["iou"]), v), (reg, rows[reg]["iou"])
        d = float(rows[reg]["dice"])
        assert _same(float(rows[reg]["iou"]), d / (2 - d))
    mean = float(np.nanmean(list(want.values())))
    assert [float(r["mean_iou"]) for r in rows.values()] == pytest.approx([mean] * 3)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["overall"]["WT"]["iou"]["mean"] == pytest.approx(3 / 5)
    assert saved["overall"]["ET"]["iou"]["mean"] == (None if rules == "brats-eval" else 1.0)
    assert saved["overall"]["TC"]["mean_iou"]["mean"] == pytest.approx(mean)
    assert "mean IoU" in format_table(saved["overall"], rules=rules)


def test_report_shows_iou_per_region_and_mean(tmp_path):
    pytest.importorskip("matplotlib")
    from medseg.report import make_report
    ref = _ref()
    rng = np.random.default_rng(0)
    for key in ("t1n", "t1c", "t2w", "t2f"):
        _nii(rng.uniform(10, 100, ref.shape), tmp_path / "images" / "c1" / f"c1-{key}.nii.gz", np.float32)
    _nii(ref, tmp_path / "ref" / "c1.nii.gz")
    _nii(np.roll(ref, 1, axis=0), tmp_path / "pred" / "c1.nii.gz")
    page = make_report(tmp_path / "pred", tmp_path / "images", tmp_path / "rep", ref=tmp_path / "ref",
                       convention="brats2023").read_text()
    assert "<th colspan=4>IoU</th>" in page and "<th>mean</th>" in page
    row = re.search(r"<tr[^>]*><td><a href='#c1'>.*?</tr>", page).group(0)
    cells = re.findall(r"<td>(.*?)</td>", row)
    # … Dice TC WT ET, IoU TC WT ET mean, HD95 TC WT ET, predicted without.
    assert cells[-8:-4] == ["0.333", "0.600", "1.000", f"{(1 / 3 + 3 / 5 + 1) / 3:.3f}"]
    assert cells[-11:-8] == ["0.500", "0.750", "1.000"]          # Dice 8/16, 96/128, 1
