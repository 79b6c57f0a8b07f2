"""`medseg report` on raw scanner studies (`medseg predict --raw`): each raw study's
row links its QC picture (copied into the report folder), shows its review state
with the reasons and the brain extractor and atlas that ran; other cases' rows
and a report without raw studies are as before. Built by hand: a BraTS 2023
images folder, masks, a ``predictions.json`` with ``raw`` records, ``qc/*.png``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from medseg.errors import MedsegError  # noqa: E402
from medseg.report import make_report  # noqa: E402

GRID = (12, 12, 8)          # the images' (atlas-space) grid
NATIVE = (10, 9, 8)         # a raw study's reference series' native grid
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
REASON = "brain mask of 3 mL (plausible 800–2000 mL): brain extraction probably failed"
ATLAS = "mni152 (MNI ICBM 2009c nonlinear symmetric)"


def _nii(arr: np.ndarray, path: Path, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(dtype), AFFINE), str(path))


def _mask(shape: tuple[int, int, int]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[3:7, 3:7, 2:6] = 2           # edema (SNFH)
    m[4:6, 4:6, 3:5] = 3           # enhancing
    m[4, 4, 3] = 1                 # necrosis (NETC)
    return m


def _png(path: Path, value: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.full((6, 8), value), vmin=0, vmax=1, cmap="gray")


def _raw(pred: Path, cid: str, review: bool, extractor: str) -> dict:
    """A ``raw`` record as `medseg.raw.run.prepare_studies` writes it (the parts the
    report reads, and some it does not)."""
    reasons = [REASON] if review else []
    return {"identification": {"method": "named by hand", "choice": {"t1ce": f"/scans/{cid}/t1ce"}},
            "reference": "t1ce", "case_id": cid, "atlas": ATLAS, "brain_extractor": extractor,
            "atlas_case": str(pred / "atlas_space" / cid), "t1ce_to_role": {}, "atlas_to_t1ce": np.eye(4).tolist(),
            "native_grids": {}, "qc": {"registration": {}, "motion": {}, "review_reasons": reasons,
                                       "brain_ml": 3.0 if review else 1250.0},
            "seconds": {}, "review": review, "review_reasons": reasons}


@pytest.fixture
def folders(tmp_path):
    """(pred, images): three cases — ``rawA`` a raw study that failed QC (accepted
    with --accept-review; its mask on its native grid, its atlas-space images on the
    atlas grid), ``rawB`` a raw study that passed, ``plain`` a case from a folder."""
    images, pred = tmp_path / "images", tmp_path / "pred"
    rng = np.random.default_rng(0)
    for cid in ("plain", "rawA", "rawB"):
        for key in ("t1n", "t1c", "t2w", "t2f"):
            _nii(rng.uniform(10, 100, GRID), images / cid / f"{cid}-{key}.nii.gz")
    _nii(_mask(NATIVE), pred / "rawA.nii.gz", np.uint8)
    _nii(rng.uniform(10, 100, NATIVE), pred / "atlas_space" / "rawA" / "native" / "series_t1ce_grid.nii.gz")
    _nii(_mask(GRID), pred / "rawB.nii.gz", np.uint8)
    _nii(_mask(GRID), pred / "plain.nii.gz", np.uint8)
    _png(pred / "qc" / "rawA.png", 0.2)
    _png(pred / "qc" / "rawB.png", 0.8)
    manifest = {"status": "complete", "label_convention": "brats2023", "run": {"label_convention": "brats2023"},
                "masks": ["plain.nii.gz", "rawA.nii.gz", "rawB.nii.gz"], "missing_modalities": {},
                "cases": {"rawA": {"raw": _raw(pred, "rawA", True, "hd-bet")},
                          "rawB": {"raw": _raw(pred, "rawB", False, "builtin")},
                          "plain": {}}}
    (pred / "predictions.json").write_text(json.dumps(manifest))
    return pred, images


def _rows(page: str) -> dict[str, str]:
    return {cid: re.search(rf"<tr[^>]*><td><a href='#{cid}'>.*?</tr>", page).group(0)
            for cid in ("plain", "rawA", "rawB")}


def test_report_links_raw_qc_pictures_and_shows_review(folders, tmp_path):
    pred, images = folders
    out = tmp_path / "report"
    page = make_report(pred, images, out).read_text()
    rows = _rows(page)

    # The QC pictures are copied into the report folder and linked relatively.
    for cid in ("rawA", "rawB"):
        copy = out / "qc" / f"{cid}.png"
        assert copy.read_bytes() == (pred / "qc" / f"{cid}.png").read_bytes()
        assert f"href='qc/{cid}.png'" in rows[cid]
        assert (out / re.search(r"href='(qc/[^']+)'", rows[cid]).group(1)).is_file()
        assert page.count(f"href='qc/{cid}.png'") == 2          # the row and the case's section
    # The row of the study that failed QC: REVIEW with its reason, flagged; extractor, atlas.
    assert "REVIEW" in rows["rawA"] and "class=flagged" in rows["rawA"]
    assert "brain mask of 3 mL (plausible 800–2000 mL)" in rows["rawA"]
    assert "brain extractor hd-bet" in rows["rawA"] and ATLAS in rows["rawA"]
    assert re.search(r"<h3 id='rawA'>rawA <span class=flag>REVIEW</span></h3>", page)
    # The study that passed.
    assert "QC passed" in rows["rawB"] and "REVIEW" not in rows["rawB"] and "flagged" not in rows["rawB"]
    assert "brain extractor builtin" in rows["rawB"] and ATLAS in rows["rawB"]
    # The case from a folder: no QC link, its raw-study cell empty.
    assert "qc/" not in rows["plain"] and rows["plain"].endswith("<td>–</td></tr>")
    assert "raw study" in page and "2 raw scanner studies" in page and "<b>1</b> failed QC" in page
    # Every case still gets its picture; rawA's shows its native series (the mask's grid).
    for cid in ("plain", "rawA", "rawB"):
        assert (out / f"{cid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "qc" / "plain.png").exists()


def test_raw_study_without_qc_picture_says_so(folders, tmp_path):
    pred, images = folders
    (pred / "qc" / "rawB.png").unlink()
    rows = _rows(make_report(pred, images, tmp_path / "report").read_text())
    assert "no QC picture" in rows["rawB"] and "href='qc/" not in rows["rawB"]
    assert "href='qc/rawA.png'" in rows["rawA"]


def test_report_into_the_prediction_folder_keeps_the_qc_pictures(folders):
    pred, images = folders
    before = (pred / "qc" / "rawA.png").read_bytes()
    rows = _rows(make_report(pred, images, pred).read_text())
    assert "href='qc/rawA.png'" in rows["rawA"] and (pred / "qc" / "rawA.png").read_bytes() == before


def test_raw_mask_off_the_images_grid_without_its_native_series_is_an_error(folders, tmp_path):
    pred, images = folders
    (pred / "atlas_space" / "rawA" / "native" / "series_t1ce_grid.nii.gz").unlink()
    with pytest.raises(MedsegError, match="does not match the image"):
        make_report(pred, images, tmp_path / "report")


def test_report_without_raw_studies_has_no_raw_column(folders, tmp_path):
    pred, images = folders
    manifest = json.loads((pred / "predictions.json").read_text())
    manifest["cases"] = {}
    (pred / "predictions.json").write_text(json.dumps(manifest))
    (pred / "rawA.nii.gz").unlink()            # its mask is off the images' grid
    out = tmp_path / "report"
    page = make_report(pred, images, out).read_text()
    assert "raw study" not in page and "QC picture" not in page and "qc/" not in page
    assert not (out / "qc").exists()
    row = re.search(r"<tr[^>]*><td><a href='#plain'>.*?</tr>", page).group(0)
    assert row.count("<td") == 1 + 3 + 3 + 3 + 1 + 2 + 1     # case, labels, regions, lesions, size, unc., without
