"""Uncertainty: member statistics against hand-computed values and batch numpy, case
and lesion scores, the review threshold, the map on the input grid in several
orientations and spacings, the manifest record, and both engines agreeing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.discover import discover
from medseg.edge import EdgePredictor, read_metadata
from medseg.errors import MedsegError
from medseg.infer import Predictor
from medseg.predict import resolve_checkpoints, review_calibration
from medseg.uncertainty import (CALIBRATION, CASE_SCORE, DOUBT, STATISTIC, STATISTICS, MemberStats,
                                binary_entropy, choose_threshold, lesion_scores, region_score,
                                uncertainty_record)

from conftest import reoriented_case, tiny_cv_run

H07 = 0.8812908992306927          # -0.7 log2 0.7 - 0.3 log2 0.3


def stats_of(members, entropy=True) -> dict:
    s = MemberStats(entropy=entropy)
    for m in members:
        s.add(m)
    return {"mean": s.mean(), **s.maps(STATISTICS)}


@pytest.mark.parametrize("values, mean, std, entropy, mi", [
    ([0.7] * 8, 0.7, 0.0, H07, 0.0),                          # all members agree: no spread
    ([0.0, 1.0] * 4, 0.5, 0.5, 1.0, 1.0),                     # total disagreement
    ([0.2, 0.4, 0.6, 0.8], 0.5, np.sqrt(0.05), 1.0, None),    # deviations² .09 .01 .01 .09
    ([0.3, 0.7], 0.5, 0.2, 1.0, 1.0 - H07),                   # the fewest members: two
])
def test_member_statistics_by_hand(values, mean, std, entropy, mi):
    got = stats_of([np.full((2, 3, 4), v, np.float32) for v in values])
    np.testing.assert_allclose(got["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(got["std"], std, atol=1e-6)
    np.testing.assert_allclose(got["entropy"], entropy, atol=1e-4)
    if mi is not None:
        np.testing.assert_allclose(got["mutual_information"], mi, atol=1e-4)


def test_streaming_equals_batch_statistics_numpy_and_torch():
    rng = np.random.default_rng(0)
    members = rng.beta(0.5, 0.5, size=(24, 3, 5, 6, 7)).astype(np.float32)
    got = stats_of(members)
    np.testing.assert_allclose(got["mean"], members.mean(0), atol=1e-6)
    np.testing.assert_allclose(got["std"], members.std(0), atol=1e-5)
    h = binary_entropy(members.mean(0))
    np.testing.assert_allclose(got["entropy"], h, atol=1e-5)
    np.testing.assert_allclose(got["mutual_information"], h - binary_entropy(members).mean(0), atol=1e-4)
    for name, lo, hi in (("std", 0, 0.5), ("entropy", 0, 1), ("mutual_information", 0, 1)):
        assert got[name].min() >= lo and got[name].max() <= hi + 1e-6, name
    tgot = stats_of([torch.from_numpy(m) for m in members])
    for k in got:
        np.testing.assert_allclose(tgot[k].numpy(), got[k], atol=1e-5, err_msg=k)


def test_case_and_lesion_scores_by_hand():
    mask = np.zeros((10, 10, 10), bool)
    mask[3:5, 3:5, 3:5] = True                     # 8 voxels; with its shell 4³ = 64
    mask[8, 8, 8] = True                           # a 1-voxel lesion; shell 3³ = 27 (inside the grid)
    u = np.zeros(mask.shape, np.float32)
    u[3:5, 3:5, 3:5] = 1.0
    prob = mask * 0.9
    # support = both shells (64 + 27 voxels), u sums to 8
    assert region_score(u, mask, prob, "mean_near") == pytest.approx(8 / 91)
    assert region_score(u, mask, prob, "sum_ratio") == pytest.approx(8 / (9 + 8))
    nothing = np.zeros_like(mask)
    assert region_score(u * 0, nothing, nothing * 0.0, "mean_near") == 0.0
    doubt = np.zeros(mask.shape)
    doubt[1, 1, 1] = DOUBT + 0.05                 # no predicted voxel, one doubtful one
    u2 = np.zeros(mask.shape, np.float32)
    u2[1, 1, 1] = 0.9
    assert region_score(u2, nothing, doubt, "mean_near") == pytest.approx(0.9)
    les = lesion_scores(u, mask, voxel_ml=0.008)
    assert [le["volume_ml"] for le in les] == pytest.approx([0.064, 0.008])
    assert les[0]["centre_voxel"] == [4, 4, 4] and les[1]["centre_voxel"] == [8, 8, 8]
    assert les[0]["score"] == pytest.approx(8 / (8 + 8)) and les[1]["score"] == 0.0


def test_review_threshold_by_youden_and_the_flag_follows_it():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    dice = [0.95, 0.90, 0.92, 0.70, 0.60, 0.85]      # poor (< 0.8): the 0.4 and 0.5 cases
    got = choose_threshold(scores, dice, members=8)
    # ≥ 0.4 flags both poor cases and one of four good ones: J = 1 - 0.25, the best;
    # the threshold sits halfway to the next lower score.
    assert got["threshold"] == pytest.approx(0.35)
    assert got["youden_j"] == pytest.approx(0.75)
    assert got["sensitivity"] == 1.0 and got["specificity"] == 0.75 and got["members"] == 8
    with pytest.raises(MedsegError, match="both poor and good"):
        choose_threshold(scores, [0.5] * 6, members=8)
    regions = np.zeros((3, 6, 6, 6), bool)
    regions[:, 2:4, 2:4, 2:4] = True
    u = np.full(regions.shape, 0.3, np.float32)
    probs = regions * 0.8
    # each region: 8 voxels + shell = 4³ voxels of u = 0.3 → 19.2 / (8 + 19.2)
    score = 19.2 / 27.2
    base = uncertainty_record(u, regions, probs, 1e-3, None)
    assert base["case_score"] == pytest.approx(score) and base["review"] is False and base["threshold"] is None
    for thr, flagged in ((score - 1e-3, True), (base["case_score"], True), (score + 1e-3, False)):
        rec = uncertainty_record(u, regions, probs, 1e-3, thr)
        assert rec["review"] is flagged and rec["threshold"] == thr
    assert set(rec["score"]) == {"TC", "WT", "ET"} and set(rec["lesions"]) == {"TC", "WT", "ET"}


@pytest.fixture(scope="module")
def model(_pristine, tmp_path_factory):
    """One fold trained on tiny brats2023 data, a review calibration in its cv folder,
    and its ONNX export (which records that calibration) → (cv folder, data root, onnx)."""
    base = tmp_path_factory.mktemp("uncertainty")
    run, root = tiny_cv_run(_pristine, base, 2, ["train.epochs=20", "train.iters_per_epoch=4",
                                                 "train.val_every=20"], only=[0])
    (run / CALIBRATION).write_text(json.dumps({
        "statistic": STATISTIC, "case_score": CASE_SCORE, "threshold": 0.05,
        "members": 8, "chosen_on": "a test"}))
    assert main(["export", "--model", str(run), "--out", str(base / "m.onnx")]) == 0
    return run, root, base / "m.onnx"


def _record(out: Path, case_id: str) -> dict:
    return json.loads((out / "predictions.json").read_text())["cases"][case_id]["uncertainty"]


def _as_ras(img: nib.Nifti1Image) -> np.ndarray:
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(("R", "A", "S")))
    return np.asarray(img.as_reoriented(ornt).dataobj)


@pytest.mark.parametrize("codes, zoom_z", [
    (("L", "P", "S"), 1), (("P", "I", "R"), 1), (("L", "P", "S"), 2),
])
def test_uncertainty_map_lands_on_the_input_grid(model, tmp_path, codes, zoom_z):
    run, root, _ = model
    case = sorted(p for p in root.iterdir() if p.is_dir())[1]
    src = reoriented_case(case, tmp_path / "in" / case.name, codes, zoom_z)
    ras = reoriented_case(case, tmp_path / "ras" / case.name, ("R", "A", "S"), zoom_z)
    maps = {}
    for name, folder in (("x", src.parent), ("ras", ras.parent)):
        out = tmp_path / f"out_{name}"
        assert main(["predict", "--model", str(run), "--input", str(folder), "--out", str(out),
                     "--uncertainty", "--review-threshold", "0.02"]) == 0
        maps[name] = nib.load(out / f"{case.name}_uncertainty.nii.gz")
    ref = nib.load(next(src.glob("*-t1n.nii.gz")))
    got = maps["x"]
    assert got.shape == (*ref.shape, 3)
    np.testing.assert_array_equal(got.affine, ref.affine)
    assert nib.aff2axcodes(got.affine) == codes
    assert got.header.get_zooms()[:3] == ref.header.get_zooms()[:3]
    assert got.get_data_dtype() == np.float32
    u = np.asarray(got.dataobj)
    assert np.isfinite(u).all() and u.min() >= 0 and u.max() <= 0.5
    assert u.max() > 0.05, "the members should disagree somewhere (tumour boundaries)"
    # The right voxels: brought back to RAS, the map equals the RAS copy's map.
    np.testing.assert_allclose(_as_ras(got), np.asarray(maps["ras"].dataobj), atol=1e-5)
    rec = _record(tmp_path / "out_x", case.name)
    assert set(rec["score"]) == {"TC", "WT", "ET"} and all(isinstance(v, float) for v in rec["score"].values())
    assert isinstance(rec["case_score"], float) and isinstance(rec["review"], bool)
    assert rec["threshold"] == 0.02 and rec["review"] == (rec["case_score"] >= 0.02)
    assert rec["statistic"] == STATISTIC and rec["members"] == 8
    mask = nib.load(tmp_path / "out_x" / f"{case.name}.nii.gz")
    assert mask.shape == ref.shape                 # the mask is still there, beside the map


def test_uncertainty_probabilities_equal_plain_tta(model):
    # Streaming the members changes nothing about the prediction itself.
    run, root, _ = model
    case = discover(root).cases[2]
    pred = Predictor(resolve_checkpoints([run]), mirror=True)
    plain, _ = pred.probabilities(case.images)
    probs, maps, _ = pred.uncertainty(case.images, statistics=STATISTICS)
    np.testing.assert_allclose(probs, plain, atol=1e-6)
    assert set(maps) == set(STATISTICS) and all(m.shape == plain.shape for m in maps.values())


def test_one_member_is_an_error_on_both_engines(model):
    # One model without mirror TTA is one member: no spread, a map of zeros and a
    # score of 0 for every case. Both engines say so instead.
    run, root, onnx = model
    images = discover(root).cases[0].images
    for pred in (Predictor(resolve_checkpoints([run]), mirror=False), EdgePredictor(onnx, mirror=False)):
        assert pred.members() == 1
        with pytest.raises(MedsegError, match=r"at least 2 members.*got 1.*mirror TTA"):
            pred.uncertainty(images)


def test_review_threshold_comes_from_cross_validation(model, tmp_path, capsys):
    run, root, onnx = model
    assert review_calibration([run])[0]["threshold"] == 0.05
    assert review_calibration([run / "fold_0"])[0]["threshold"] == 0.05      # a fold: its cv folder's
    assert review_calibration([tmp_path]) is None
    out = tmp_path / "torch"
    assert main(["predict", "--model", str(run), "--input", str(root), "--out", str(out),
                 "--uncertainty"]) == 0
    said = capsys.readouterr().out
    assert f"review threshold 0.05 from {run / CALIBRATION}" in said
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert {c["uncertainty"]["threshold"] for c in cases.values()} == {0.05}
    assert all(c["uncertainty"]["review"] == (c["uncertainty"]["case_score"] >= 0.05) for c in cases.values())
    # evaluate takes the maps beside the masks for what they are: not masks
    assert main(["evaluate", "--pred", str(out), "--ref", str(root), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["unmatched_predictions"] == []
    # the ONNX file carries it too
    assert read_metadata(onnx)["uncertainty"]["threshold"] == 0.05
    assert main(["predict", "--engine", "onnx", "--model", str(onnx), "--input", str(root),
                 "--out", str(tmp_path / "onnx"), "--uncertainty"]) == 0
    assert "review threshold 0.05 from the model's metadata" in capsys.readouterr().out
    rec = json.loads((tmp_path / "onnx" / "predictions.json").read_text())["cases"]
    assert {c["uncertainty"]["threshold"] for c in rec.values()} == {0.05}


def test_bad_calibration_and_usage_are_clear_errors(model, tmp_path, capsys):
    run, root, _ = model
    other = tmp_path / "cv"
    (other / "fold_0" / "checkpoints").mkdir(parents=True)
    (other / "fold_0" / "checkpoints" / "final.pt").write_bytes((run / "fold_0" / "checkpoints" /
                                                                 "final.pt").read_bytes())
    (other / CALIBRATION).write_text(json.dumps({"statistic": "entropy", "case_score": CASE_SCORE,
                                                 "threshold": 0.1}))
    with pytest.raises(MedsegError, match="re-run benchmarks/uncertainty.py"):
        review_calibration([other])
    assert main(["predict", "--model", str(run), "--input", str(root), "--out", str(tmp_path / "o"),
                 "--review-threshold", "0.1"]) == 2
    assert "add --uncertainty" in capsys.readouterr().err


def test_both_engines_agree_on_the_uncertainty(model, tmp_path):
    # Same model, same members (8 flips), same grids: the ONNX runtime's maps and scores
    # match PyTorch's (fp32 both) on an LPS thick-slice input. Measured: 3e-7 apart;
    # 1e-4 leaves room for other onnxruntime kernels and is 10x inside the fp32
    # export check on probabilities (1e-3).
    run, root, onnx = model
    case = sorted(p for p in root.iterdir() if p.is_dir())[1]
    folder = reoriented_case(case, tmp_path / "lps" / case.name, ("L", "P", "S"), 2)
    images = discover(folder.parent).cases[0].images
    torch_pred = Predictor(resolve_checkpoints([run]), amp=False, mirror=True)
    edge = EdgePredictor(onnx, mirror=True)
    assert edge.members() == torch_pred.members() == 8
    p_t, m_t, ref = torch_pred.uncertainty(images, statistics=STATISTICS)
    p_e, m_e, _ = edge.uncertainty(images, statistics=STATISTICS)
    assert np.abs(p_t - p_e).max() < 1e-4
    for s in STATISTICS:
        assert m_e[s].shape == m_t[s].shape == (3, *ref.shape)
        assert np.abs(m_t[s] - m_e[s]).max() < 1e-4, (s, float(np.abs(m_t[s] - m_e[s]).max()))
    r_t, ml = torch_pred.regions(p_t, ref)
    r_e, _ = edge.regions(p_e, ref)
    np.testing.assert_array_equal(r_t, r_e)
    rec_t = uncertainty_record(m_t[STATISTIC], r_t, p_t, ml, 0.05)
    rec_e = uncertainty_record(m_e[STATISTIC], r_e, p_e, ml, 0.05)
    assert rec_t["case_score"] == pytest.approx(rec_e["case_score"], abs=1e-4)
    assert rec_t["review"] == rec_e["review"]
