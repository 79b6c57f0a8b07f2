"""What `medseg predict` writes beside the masks, from both engines: the volumetry
record per case in predictions.json, volumes.csv (also after a resumed batch),
the --viewer-files; and the report page showing volumes, uncertainty and the
review flag."""

from __future__ import annotations

import csv
import json
import re

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.discover import discover
from medseg.data.io import write_json
from medseg.export import export_onnx
from medseg.labels import CLASS_COLOURS, REGIONS, labels_to_regions
from medseg.models import build_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained 3-level U-Net (the masks only need to be non-trivial: this tests
    what is written beside them, not their quality), as a checkpoint and as ONNX."""
    base = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    args = {"filters": [8, 16, 32]}
    model = build_model("unet3d", **args, deep_supervision=False)
    meta = {"network": {"name": "unet3d", "args": args}, "channels": ["t1", "t1ce", "t2", "flair"],
            "regions": ["TC", "WT", "ET"], "label_convention": "brats2023", "spacing": [6.0, 6.0, 6.0],
            "roi": [16, 16, 16], "normalization": "z-score", "medseg_version": "test",
            "infer": {"overlap": 0.25, "sw_batch_size": 4, "threshold": 0.5, "blend": "gaussian",
                      "amp": False}}
    torch.save({"model": model.state_dict(), "meta": meta}, base / "m.pt")
    export_onnx([base / "m.pt"], base / "m.onnx", print_fn=lambda s: None)
    return {"torch": base / "m.pt", "onnx": base / "m.onnx"}


def _csv(path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_volumes_and_viewer_files_from_both_engines(models, dataset, tmp_path, capsys, engine):
    root = dataset("brats2023")
    out = tmp_path / "masks"
    args = ["predict", "--engine", engine, "--model", str(models[engine]), "--input", str(root),
            "--out", str(out), "--viewer-files"]
    assert main(args) == 0
    ids = [c.case_id for c in discover(root).cases]
    records = json.loads((out / "predictions.json").read_text())["cases"]
    table = _csv(out / "volumes.csv")
    assert sorted(records) == sorted(table) == sorted(ids)
    nonempty = 0
    for cid in ids:
        mask = nib.load(out / f"{cid}.nii.gz")
        lab = np.asarray(mask.dataobj)
        nonempty += bool(lab.any())
        # Record and table agree with the mask on disk (counted here, independently).
        ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
        regions = labels_to_regions(lab, "brats2023")
        vol = records[cid]["volumes"]
        for i, r in enumerate(REGIONS):
            assert vol["regions"][r] == pytest.approx(regions[i].sum() * ml)
            assert float(table[cid][f"{r}_ml"]) == pytest.approx(regions[i].sum() * ml, abs=1e-4)
        for v, name in ((1, "NETC"), (2, "SNFH"), (3, "ET")):
            assert float(table[cid][f"label_{name}_ml"]) == pytest.approx((lab == v).sum() * ml, abs=1e-4)
        # The viewer files: the mask's voxels, on its grid, with the report's colours.
        data, head = nrrd.read(str(out / f"{cid}.seg.nrrd"))
        np.testing.assert_array_equal(data, lab)
        np.testing.assert_allclose(head["space directions"].T, np.diag([-1, -1, 1]) @ mask.affine[:3, :3],
                                   atol=1e-6)
        assert head["Segment2_Name"] == "ET" and head["Segment2_LabelValue"] == "3"
        text = (out / f"{cid}.itksnap.txt").read_text()
        assert re.search(r'^\s*3\s+255\s+225\s+0\s+1\s+1\s+1\s+"ET"$', text, re.M)
    assert nonempty, "the model predicts no tumour at all: the checks above would prove little"
    # A resumed batch: one case lost its Slicer file, and an older run's record of another
    # has no volumes. Only the first is predicted again; the table still lists every case.
    (out / f"{ids[0]}.seg.nrrd").unlink()
    (out / "volumes.csv").unlink()
    manifest = json.loads((out / "predictions.json").read_text())
    del manifest["cases"][ids[1]]["volumes"]
    write_json(manifest, out / "predictions.json")
    stamp = (out / f"{ids[2]}.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert f"{len(ids) - 1} of {len(ids)} cases already predicted" in said and "volumes.csv" in said
    assert (out / f"{ids[0]}.seg.nrrd").is_file()
    assert (out / f"{ids[2]}.nii.gz").stat().st_mtime_ns == stamp
    again = _csv(out / "volumes.csv")
    assert again == table


def test_report_shows_volumes_uncertainty_and_review(models, dataset, tmp_path):
    root = dataset("brats2023")
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(models["torch"]), "--input", str(root), "--out", str(out)]) == 0
    ids = [c.case_id for c in discover(root).cases]
    # The uncertainty record another part of `medseg predict` writes, for two cases.
    manifest = json.loads((out / "predictions.json").read_text())
    manifest["cases"][ids[0]]["uncertainty"] = {"score": {"TC": 0.41, "WT": 0.12, "ET": 0.5},
                                                "case_score": 0.3433, "review": True, "threshold": 0.25}
    manifest["cases"][ids[1]]["uncertainty"] = {"score": {"TC": 0.01, "WT": 0.02, "ET": 0.03},
                                                "case_score": 0.02, "review": False, "threshold": 0.25}
    # Scored without a review threshold: nothing could be flagged, so no "no" either.
    manifest["cases"][ids[3]]["uncertainty"] = {"score": {"TC": 0.5, "WT": 0.5, "ET": 0.5},
                                                "case_score": 0.5, "review": False, "threshold": None}
    write_json(manifest, out / "predictions.json")
    assert main(["report", "--pred", str(out), "--images", str(root), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    rows = {cid: re.search(rf"<tr[^>]*><td><a href='#{cid}'>.*?</tr>", page).group(0) for cid in ids}
    table = _csv(out / "volumes.csv")
    for cid in ids:
        cells = re.findall(r"<td>(.*?)</td>", rows[cid])
        # Per label (NETC, SNFH, ET), per region, lesions: as in volumes.csv.
        want = [f"{float(table[cid][k]):.2f}" for k in ("label_NETC_ml", "label_SNFH_ml", "label_ET_ml",
                                                        "TC_ml", "WT_ml", "ET_ml")]
        want += [table[cid][f"{r}_lesions"] for r in REGIONS]
        assert cells[1:10] == want, cid
    assert "0.343" in rows[ids[0]] and "TC 0.410" in rows[ids[0]]
    assert "REVIEW" in rows[ids[0]] and "class=flagged" in rows[ids[0]]
    assert "REVIEW" not in rows[ids[1]] and ">no<" in rows[ids[1]]
    assert rows[ids[2]].count("<td>–</td>") >= 2            # no uncertainty recorded
    assert "0.500" in rows[ids[3]] and "no review threshold" in rows[ids[3]] and ">no<" not in rows[ids[3]]
    assert "1 of 3</b> scored case(s) flagged" in page and "0.250" in page
    for cls in ("NCR", "ED", "ET"):
        assert "rgb({},{},{})".format(*CLASS_COLOURS[cls]) in page
