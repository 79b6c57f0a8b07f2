"""Scoring rule sets (medseg.scoring) interpreted by medseg.metrics.score_region:
one table of tiny volumes with hand-computed answers per rule set, then the
outputs that must name their rule set and never mix two."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.evaluate import evaluate_folder, format_table, metric_rows, read_rows, summarize, write_rows
from medseg.metrics import _area_percentile, score_region
from medseg.scoring import DEFAULT_RULES, RULE_SETS, get_rules, rule_metrics

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scoring_rules.py"
NAN = float("nan")
R2, R3 = math.sqrt(2), math.sqrt(3)


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# ----------------------------------------------------------------------------- the cases
# name → (pred, ref, spacing). Cubes are [lo, hi) voxel boxes; 1 mm unless said.
def _cases():
    c = {}
    c["both empty"] = (np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool), (1, 1, 1))
    cube = box((12, 12, 12), (2, 2, 2), (6, 6, 6))                    # 64 voxels
    c["ref only"] = (np.zeros_like(cube), cube, (1, 1, 1))
    c["pred only"] = (cube, np.zeros_like(cube), (1, 1, 1))
    # An 8³ tumour (512 voxels, 296 surface voxels) found exactly, plus one stray voxel
    # 11 voxels beyond its x = 9 face: far outside any dilation zone.
    big = box((24, 12, 12), (2, 2, 2), (10, 10, 10))
    fp = big.copy()
    fp[20, 5, 5] = True
    c["far FP voxel"] = (fp, big, (1, 1, 1))
    # The same tumour plus a satellite the prediction misses: 3×3×5 = 45 voxels (≤ 50,
    # dropped by brats23) or 3×3×6 = 54 (kept).
    big30 = box((30, 12, 12), (2, 2, 2), (10, 10, 10))
    c["missed 45-voxel lesion"] = (big30, big30 | box(big30.shape, (20, 3, 3), (23, 6, 8)), (1, 1, 1))
    c["missed 54-voxel lesion"] = (big30, big30 | box(big30.shape, (20, 3, 3), (23, 6, 9)), (1, 1, 1))
    # Two 4³ GT cubes with a 3-voxel gap (x = 6, 7, 8): a 3-voxel dilation merges them,
    # a 1-voxel one does not (x ≤ 6 and x ≥ 8 do not touch). The prediction finds one.
    c1 = box((20, 10, 10), (2, 3, 3), (6, 7, 7))
    c2 = box((20, 10, 10), (9, 3, 3), (13, 7, 7))
    c["two lesions, one found"] = (c1, c1 | c2, (1, 1, 1))
    # One predicted bar (10×4×4 = 160) across both cubes of a 2-voxel gap.
    d1, d2 = box((16, 10, 10), (2, 3, 3), (6, 7, 7)), box((16, 10, 10), (8, 3, 3), (12, 7, 7))
    c["one prediction over two lesions"] = (box((16, 10, 10), (2, 3, 3), (12, 7, 7)), d1 | d2, (1, 1, 1))
    # A 4³ prediction 1 voxel beside a 4³ lesion (x 7..10 vs 2..5): no overlap, but
    # inside the lesion's 3-voxel dilation zone.
    c["near miss"] = (box((14, 10, 10), (7, 3, 3), (11, 7, 7)), box((14, 10, 10), (2, 3, 3), (6, 7, 7)),
                      (1, 1, 1))
    # 6³ lesion, prediction eroded to its 4³ core: ref surface 152 voxels = 96 face (1
    # from the core's surface), 48 edge (√2), 8 corner (√3); core surface 56, all at 1.
    c["eroded"] = (box((10, 10, 10), (3, 3, 3), (7, 7, 7)), box((10, 10, 10), (2, 2, 2), (8, 8, 8)),
                   (1, 1, 1))
    # 6³ lesion, prediction shifted 1 voxel along x: of each surface's 152 voxels, 52
    # are 1 from the other surface, 100 lie on it → pooled HD95 = 1 voxel.
    shifted = (box((12, 10, 10), (3, 2, 2), (9, 8, 8)), box((12, 10, 10), (2, 2, 2), (8, 8, 8)))
    c["shifted"] = (*shifted, (1, 1, 1))
    c["shifted, 2 mm along x"] = (*shifted, (2, 1, 1))
    return c


CASES = _cases()

# Expected scores: (case, rule set) → {metric: value}. Only the metrics listed are
# checked; the reasoning is in the case comments above and in the README table.
ER = (1 + 96 / 152) / 2                  # panoptica NSD@1 of "eroded": (56/56 + 96/152) / 2
# Whole-image NSD is at 0.5 voxel under brats-eval: only distances of 0 count.
EXPECTED = {
    # ---- both empty
    ("both empty", "brats21"): dict(dice=1, hd95=0),
    ("both empty", "brats23"): dict(dice=1, hd95=0, lesion_dice=1, lesion_hd95=0, lesions_tp=0,
                                    lesions_fp=0, lesions_fn=0),
    ("both empty", "brats-eval"): dict(dice=NAN, hd95=NAN, nsd=NAN, lesion_dice=NAN, lesion_hd95=NAN,
                                       lesion_nsd=NAN, lesions_tp=0, lesions_fp=0, lesions_fn=0),
    # ---- one empty
    ("ref only", "brats21"): dict(dice=0, hd95=373.13, hausdorff=373.13),
    ("ref only", "brats23"): dict(dice=0, hd95=374, lesion_dice=0, lesion_hd95=374, lesions_tp=0,
                                  lesions_fp=0, lesions_fn=1),
    ("ref only", "brats-eval"): dict(dice=0, hd95=373, nsd=0, lesion_dice=0, lesion_hd95=373,
                                     lesion_nsd=0, lesions_tp=0, lesions_fp=0, lesions_fn=1),
    ("pred only", "brats21"): dict(dice=0, hd95=373.13),
    ("pred only", "brats23"): dict(dice=0, hd95=374, lesion_dice=0, lesion_hd95=374, lesions_tp=0,
                                   lesions_fp=1, lesions_fn=0),
    ("pred only", "brats-eval"): dict(dice=0, hd95=373, lesion_dice=0, lesion_hd95=373, lesions_tp=0,
                                      lesions_fp=1, lesions_fn=0),
    # ---- a far false-positive voxel: 1 of 593 pooled surface distances, < 2 % of
    # the prediction's surfel area → whole-image HD95 0 everywhere; lesion-wise it is
    # half the score under brats23, outside the means under brats-eval.
    ("far FP voxel", "brats21"): dict(dice=1024 / 1025, hd95=0, hausdorff=11),
    ("far FP voxel", "brats23"): dict(dice=1024 / 1025, hd95=0, lesion_dice=0.5, lesion_hd95=187,
                                      lesions_tp=1, lesions_fp=1, lesions_fn=0),
    ("far FP voxel", "brats-eval"): dict(dice=1024 / 1025, hd95=0, nsd=(296 / 297 + 1) / 2,
                                         lesion_dice=1, lesion_hd95=0, lesion_nsd=1, lesions_tp=1,
                                         lesions_fp=1, lesions_fn=0),
    # ---- a missed small lesion below / above the size threshold
    ("missed 45-voxel lesion", "brats21"): dict(dice=1024 / 1069),
    ("missed 45-voxel lesion", "brats23"): dict(lesion_dice=1, lesion_hd95=0, lesions_tp=1,
                                                lesions_fp=0, lesions_fn=0),
    ("missed 45-voxel lesion", "brats23-met"): dict(lesion_dice=0.5, lesion_hd95=187, lesions_tp=1,
                                                    lesions_fn=1),
    ("missed 45-voxel lesion", "brats-eval"): dict(lesion_dice=1, lesion_hd95=0, lesions_tp=1,
                                                   lesions_fp=0, lesions_fn=1),
    ("missed 54-voxel lesion", "brats21"): dict(dice=1024 / 1078),
    ("missed 54-voxel lesion", "brats23"): dict(lesion_dice=0.5, lesion_hd95=187, lesions_tp=1,
                                                lesions_fp=0, lesions_fn=1),
    ("missed 54-voxel lesion", "brats-eval"): dict(lesion_dice=1, lesion_hd95=0, lesions_fn=1),
    # ---- two GT lesions merged by dilation (brats23: one lesion of 128 voxels, half
    # found → Dice 2·64/192) or not (brats23-met, brats-eval: one found, one missed)
    ("two lesions, one found", "brats21"): dict(dice=2 / 3),
    ("two lesions, one found", "brats23"): dict(lesion_dice=2 / 3, lesions_tp=1, lesions_fp=0,
                                                lesions_fn=0),
    ("two lesions, one found", "brats23-men"): dict(lesion_dice=0.5, lesion_hd95=187, lesions_tp=1,
                                                    lesions_fn=1),
    ("two lesions, one found", "brats23-met"): dict(lesion_dice=0.5, lesion_hd95=187, lesions_tp=1,
                                                    lesions_fn=1),
    ("two lesions, one found", "brats-eval"): dict(lesion_dice=1, lesion_hd95=0, lesion_nsd=1,
                                                   lesions_tp=1, lesions_fp=0, lesions_fn=1),
    # ---- one predicted component over two lesions: brats23 merges the lesions (Dice
    # 2·128/288); panoptica pairs it with one of them (Dice 2·64/224), the other is missed
    ("one prediction over two lesions", "brats23"): dict(lesion_dice=256 / 288, lesions_tp=1,
                                                         lesions_fp=0, lesions_fn=0),
    ("one prediction over two lesions", "brats-eval"): dict(lesion_dice=128 / 224, lesions_tp=1,
                                                            lesions_fp=0, lesions_fn=1),
    # ---- a near miss: no overlap. Pooled distances 32×2, 24×3, 24×4, 32×5 → HD95 5;
    # brats23 counts the prediction as the lesion's match (inside its dilation zone);
    # panoptica has no match (a FN and a FP) and scores "no overlap" as the penalty.
    ("near miss", "brats21"): dict(dice=0, hd95=5, hausdorff=5),
    ("near miss", "brats23"): dict(dice=0, hd95=5, lesion_dice=0, lesion_hd95=5, lesions_tp=1,
                                   lesions_fp=0, lesions_fn=0),
    ("near miss", "brats-eval"): dict(dice=0, hd95=373, nsd=0, lesion_dice=0, lesion_hd95=373,
                                      lesions_tp=0, lesions_fp=1, lesions_fn=1),
    # ---- eroded: pooled sorted distances 152×1, 48×√2, 8×√3 → 95th percentile √2;
    # surfels: edge area puts the ref→pred 95th percentile on √2 as well
    ("eroded", "brats21"): dict(dice=128 / 280, hd95=R2, hausdorff=R3),
    ("eroded", "brats23"): dict(dice=128 / 280, hd95=R2, lesion_dice=128 / 280, lesion_hd95=R2,
                                lesions_tp=1),
    ("eroded", "brats-eval"): dict(dice=128 / 280, hd95=R2, nsd=0, lesion_dice=128 / 280,
                                   lesion_hd95=R2, lesion_nsd=ER, lesions_tp=1),
    # ---- shifted by one voxel: overlap 5·6·6 → Dice 360/432
    ("shifted", "brats21"): dict(dice=5 / 6, hd95=1, hausdorff=1),
    ("shifted", "brats23"): dict(dice=5 / 6, hd95=1, lesion_dice=5 / 6, lesion_hd95=1),
    ("shifted", "brats-eval"): dict(dice=5 / 6, hd95=1, nsd=100 / 152, lesion_dice=5 / 6, lesion_hd95=1,
                                    lesion_nsd=1),
    # ---- the same in mm with 2 mm voxels along x: brats-eval stays in voxels
    ("shifted, 2 mm along x", "brats21"): dict(hd95=2, vol_ref_ml=216 * 2 / 1000),
    ("shifted, 2 mm along x", "brats23"): dict(hd95=2, lesion_hd95=2),
    ("shifted, 2 mm along x", "brats-eval"): dict(hd95=1, lesion_hd95=1, lesion_nsd=1, nsd=100 / 152,
                                                  vol_ref_ml=216 * 2 / 1000),
}


@pytest.mark.parametrize("case, rules", list(EXPECTED), ids=[f"{c}|{r}" for c, r in EXPECTED])
def test_rule_set_scores_hand_computed(case, rules):
    pred, ref, spacing = CASES[case]
    got = score_region(pred, ref, spacing, get_rules(rules))
    want = EXPECTED[case, rules]
    assert {k: got[k] for k in want} == {k: pytest.approx(v, abs=1e-6, nan_ok=True)
                                          for k, v in want.items()}


@pytest.mark.parametrize("rules", list(RULE_SETS))
def test_columns_are_the_rule_sets_columns_in_order(rules):
    pred, ref, spacing = CASES["far FP voxel"]
    r = get_rules(rules)
    assert tuple(score_region(pred, ref, spacing, r)) == rule_metrics(r)


@pytest.mark.parametrize("name, task, dilation, min_size", [
    ("brats23", "GLI", 3, 50), ("brats23-ssa", "SSA", 3, 50), ("brats23-ped", "PED", 3, 50),
    ("brats23-men", "MEN", 1, 50), ("brats23-met", "MET", 1, 2),
])
def test_brats23_task_parameters(name, task, dilation, min_size):
    r = get_rules(name)
    assert (r.task, r.lesions.dilation, r.lesions.min_size, r.penalty) == (task, dilation, min_size, 374)
    assert r.lesions.connectivity == 26 and r.hd95 == "directed-max"


def test_unknown_rule_set_lists_the_names():
    with pytest.raises(MedsegError, match="brats21.*brats23.*brats-eval"):
        get_rules("brats2023")
    assert DEFAULT_RULES == "brats21"


def test_area_weighted_percentile_hand_computed():
    # areas 1, 1, 2 at distances 0, 1, 5: cumulative 0.25, 0.5, 1.0 → 95th is 5, 40th is 1.
    d, a = np.array([5.0, 0.0, 1.0]), np.array([2.0, 1.0, 1.0])
    assert _area_percentile(d, a, 95) == 5.0 and _area_percentile(d, a, 40) == 1.0


# ----------------------------------------------------------------------------- outputs
def _rows(rules, case="far FP voxel", case_id="c1"):
    pred, ref, spacing = CASES[case]
    m = score_region(pred, ref, spacing, get_rules(rules))
    return metric_rows(case_id, {r: m for r in ("TC", "WT", "ET")}, rules=rules)


def test_summaries_never_mix_rule_sets():
    with pytest.raises(MedsegError, match="different rule sets"):
        summarize(_rows("brats21") + _rows("brats23", case_id="c2"))


def test_summary_leaves_out_nan_and_counts_what_it_averaged():
    rows = _rows("brats-eval", "both empty", "a") + _rows("brats-eval", "shifted", "b")
    s = summarize(rows)
    assert s["WT"]["dice"] == {"mean": pytest.approx(5 / 6), "std": 0.0,
                               "median": pytest.approx(5 / 6), "n": 1}
    assert s["WT"]["lesions_tp"]["n"] == 2
    only_nan = summarize(_rows("brats-eval", "both empty"))
    assert only_nan["ET"]["dice"] == {"mean": None, "std": None, "median": None, "n": 0}
    assert "–" in format_table(only_nan, rules="brats-eval")


def test_rows_round_trip_with_their_rule_set(tmp_path):
    rows = _rows("brats23")
    write_rows(rows, tmp_path / "m.csv")
    back = read_rows(tmp_path / "m.csv")
    assert back == rows and back[0]["rules"] == "brats23"
    assert "LW Dice" in format_table(summarize(back), rules="brats23")


def test_rows_written_before_rule_sets_read_as_brats21(tmp_path):
    rows = _rows("brats21")
    legacy = [{k: v for k, v in r.items() if k != "rules"} for r in rows]
    write_rows(legacy, tmp_path / "old.csv")
    assert read_rows(tmp_path / "old.csv") == rows


def _write_labels(path, lab):
    img = nib.Nifti1Image(lab.astype(np.uint8), np.eye(4))
    nib.save(img, str(path))


def _label_folders(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    ref = np.zeros((16, 16, 16), np.uint8)
    ref[4:10, 4:10, 4:10] = 2          # edema (WT only); ET empty in both
    ref[5:9, 5:9, 5:9] = 1             # necrosis → TC
    _write_labels(tmp_path / "pred" / "BraTS-GLI-00001-000.nii.gz", np.roll(ref, 1, axis=0))
    _write_labels(tmp_path / "ref" / "BraTS-GLI-00001-000.nii.gz", ref)


@pytest.mark.parametrize("rules", ["brats21", "brats23", "brats-eval"])
def test_evaluate_folder_records_the_rule_set(tmp_path, rules):
    """metrics.csv has a rules column, summary.json names and defines the rule set."""
    _label_folders(tmp_path)
    summary = evaluate_folder(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", "brats2023", rules)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["rules"] == summary["rules"] == rules
    assert saved["rule_set"]["name"] == rules and saved["metric_conventions"]
    with open(tmp_path / "out" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["rules"] for r in rows} == {rules}
    assert list(rows[0])[3:] == list(rule_metrics(get_rules(rules))) + ["mean_iou"]
    et = saved["overall"]["ET"]["dice"]
    assert et["mean"] == (None if rules == "brats-eval" else 1.0)   # both empty


def test_cli_evaluate_takes_rules(tmp_path, capsys):
    from medseg.cli import main
    _label_folders(tmp_path)
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
            "--out", str(tmp_path / "out"), "--convention", "brats2023"]
    assert main([*args, "--rules", "brats-eval"]) == 0
    out = capsys.readouterr().out
    assert "LW Dice" in out and "HD95 vox" in out and "scoring rules: brats-eval" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rules"] == "brats-eval"
    assert main(args) == 0 and "scoring rules: brats21" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([*args, "--rules", "brats2023"])
    assert exc.value.code == 2 and "brats23-met" in capsys.readouterr().err


# ----------------------------------------------------------------------------- references
#: Test-only environments with the reference scorers (benchmarks/scoring_rules.py says
#: how to make them); neither is a medseg dependency:
#: /tmp/refenv: `pip install BraTS-evaluation`; /tmp/refenv23: `pip install "numpy<2"
#: "pandas<2" "scipy<1.12" nibabel connected-components-3d`, with BraTS-2023-Metrics'
#: metrics.py and surface_distance/ in /tmp/brats23.
REF_PYTHON, BRATS23_PYTHON = Path("/tmp/refenv/bin/python"), Path("/tmp/refenv23/bin/python")
BRATS23_CODE = Path("/tmp/brats23")


@pytest.mark.slow
def test_agrees_with_the_reference_implementations():
    """Every case above plus a BraTS-size case, scored by BraTS-evaluation and by
    BraTS-2023-Metrics (GLI, MET), and that case's gli2024 and ped2024 versions on all
    their regions by BraTS-evaluation (gli, ped configs): Dice within 1e-4, HD95 within
    0.05 mm + 1 %, TP/FP/FN exact."""
    args = ["--cases", "1", "--no-timing"]
    if REF_PYTHON.is_file():
        args += ["--ref-python", str(REF_PYTHON)]
    if BRATS23_PYTHON.is_file() and (BRATS23_CODE / "metrics.py").is_file():
        args += ["--brats23-python", str(BRATS23_PYTHON), "--brats23-code", str(BRATS23_CODE)]
    if len(args) == 3:
        pytest.skip(f"no reference environment ({REF_PYTHON}, or {BRATS23_PYTHON} with "
                    f"{BRATS23_CODE}/metrics.py): see the comment above")
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all within tolerance" in r.stdout
