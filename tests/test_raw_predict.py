"""Raw scanner studies end to end (`medseg predict --raw`, `medseg.raw.prepare`): on
generated studies whose truth is known (`medseg.data.synth_raw`, coarse "small"
scale), checked against the known patient poses, brain masks and labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.synth_raw import canonical_points_on_brain_surface, load_truth, surface_error_mm, synthesize_raw
from medseg.labels import labels_to_regions
from medseg.metrics import dice
from medseg.raw.study import identify, load_series, scan_study

from conftest import tiny_cv_run

SEED = 7


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Three small raw studies (DICOM, vendors and layouts as the seed gives)."""
    out = tmp_path_factory.mktemp("raw") / "gen"
    synthesize_raw(out, 3, seed=SEED, scale="small")
    return out


@pytest.fixture(scope="module")
def prepared(studies, tmp_path_factory):
    """Study 0 identified and prepared (atlas space at 2 mm) → (truth, PreparedCase)."""
    from medseg.raw.prepare import prepare
    sid = sorted(p.name for p in (studies / "studies").iterdir())[0]
    ident = identify(scan_study(studies / "studies" / sid))
    series = {r: load_series(c.series) for r, c in ident.choices.items()}
    return load_truth(studies, sid), prepare(sid, series, tmp_path_factory.mktemp("atlas"), atlas_mm=2.0)


@pytest.fixture(scope="module")
def model(_pristine, tmp_path_factory):
    """A tiny checkpoint (one fold, few epochs: geometry, not accuracy, is tested)."""
    run, _ = tiny_cv_run(_pristine, tmp_path_factory.mktemp("rawmodel"), 2,
                         ["train.epochs=2", "train.iters_per_epoch=2"], only=[0])
    return run / "fold_0"


def test_identification_finds_the_true_series(studies):
    for sid in sorted(p.name for p in (studies / "studies").iterdir()):
        truth = load_truth(studies, sid)
        ident = identify(scan_study(studies / "studies" / sid))
        assert {r: c.series.series_uid for r, c in ident.choices.items()} == \
            {r: truth["roles"][r]["series_uid"] for r in truth["roles"]}, sid


def test_coregistration_error_at_the_brain_surface(prepared):
    """Estimated T1ce → series transforms against the known poses, at the true brain
    surface: median within 0.75 and maximum within 1.5 of each series' voxel size
    (cube root of its volume: these coarse grids are 2.25–2.5 mm in-plane with slices
    up to 16 mm thick; the uncorrected motion is 5–25 mm), and the atlas transform a
    plausible scaling. The 1 mm figures are the benchmark's."""
    truth, p = prepared
    pts = canonical_points_on_brain_surface(Path(truth["truth_dir"]).parents[1], truth["study_id"])
    w_ce = truth["roles"]["t1ce"]["world_from_canonical"]
    for role, m in p.t1ce_to_role.items():
        err = surface_error_mm(pts, w_ce, truth["roles"][role]["world_from_canonical"], m)
        voxel = float(np.prod(truth["roles"][role]["spacing"])) ** (1 / 3)
        assert np.median(err) < 0.75 * voxel and err.max() < 1.5 * voxel, (role, voxel, np.median(err), err.max())
    assert not p.review_reasons, p.review_reasons
    assert 0.75 < min(p.qc["atlas_scale"]) and max(p.qc["atlas_scale"]) < 1.35


def test_builtin_brain_extraction_against_the_true_brain(prepared):
    truth, p = prepared
    est = np.asarray(nib.load(str(p.folder / "native" / "brain_mask_t1ce_grid.nii.gz")).dataobj) > 0
    ref = np.asarray(nib.load(truth["roles"]["t1ce"]["brain_path"]).dataobj) > 0
    assert est.shape == ref.shape
    assert dice(est, ref) >= 0.85        # 2.5 mm voxels; the 1 mm figure is the benchmark's


def test_atlas_case_is_a_brats_case(prepared):
    """The atlas-space case: four modalities on one grid in the BraTS 2023 layout, zero
    outside the brain, that medseg's own loader discovers."""
    from medseg.data.discover import discover
    _, p = prepared
    ds = discover(p.folder.parent)
    assert ds.layout.name == "brats2023" and [c.case_id for c in ds.cases] == [p.case_id]
    brain = np.asarray(nib.load(str(p.brain)).dataobj) > 0
    for role, f in p.images.items():
        img = nib.load(str(f))
        assert np.allclose(img.affine, p.atlas_affine) and img.shape == p.atlas_shape
        assert not np.asarray(img.dataobj)[~brain].any(), role
    record = json.loads((p.folder / "transforms.json").read_text())
    assert set(record["t1ce_to_role"]) == set(p.t1ce_to_role) and record["brain_extractor"] == "builtin"


@pytest.mark.parametrize("role", ["t1ce", "flair"])
def test_round_trip_native_atlas_native(prepared, role):
    """A label map on a native grid → the atlas grid (the forward transforms) → back
    (`to_native`, the path of the masks): Dice ≥ 0.99 per region."""
    import SimpleITK as sitk
    from medseg.raw import register as rg
    truth, p = prepared
    lab = np.asarray(nib.load(truth["roles"][role]["labels_path"]).dataobj)
    affine = truth["roles"][role]["affine"]
    regions = labels_to_regions(lab, "brats2023").astype(np.float32)
    atlas_ref = rg.to_sitk(np.zeros(p.atlas_shape, np.float32), p.atlas_affine)
    fwd = rg.affine_transform(np.linalg.inv(p.native_to_atlas(role)))   # atlas point → native point
    on_atlas = np.stack([rg.from_sitk(rg.resample(rg.to_sitk(r, affine), atlas_ref, fwd))[0] for r in regions])
    back, back_affine = p.to_native(on_atlas, role)
    assert np.allclose(back_affine, affine) and back.shape[1:] == lab.shape
    for k in range(3):
        if regions[k].sum() > 50:
            assert dice(back[k] > 0.5, regions[k] > 0.5) >= 0.99 if role == "t1ce" else 0.97, k
    del sitk


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_predict_raw_writes_masks_on_the_native_grid(studies, model, tmp_path):
    """`medseg predict --raw`: one mask per study on the T1ce's native grid, the
    identification, QC and transforms in predictions.json, a DICOM Segmentation
    that highdicom reads back onto the reference series' grid, the atlas-space case
    beside it; a re-run continues (nothing redone)."""
    import highdicom as hd
    import pydicom
    from medseg.cli import main
    out = tmp_path / "out"
    args = ["predict", "--raw", "--input", str(studies / "studies"), "--model", str(model), "--out", str(out),
            "--atlas-spacing", "2", "--probabilities"]
    assert main(args) == 0
    man = json.loads((out / "predictions.json").read_text())
    for sid in sorted(p.name for p in (studies / "studies").iterdir()):
        truth = load_truth(studies, sid)
        img = nib.load(str(out / f"{sid}.nii.gz"))
        assert img.shape == tuple(truth["roles"]["t1ce"]["shape"])
        assert np.allclose(img.affine, truth["roles"]["t1ce"]["affine"], atol=1e-3)
        probs = nib.load(str(out / "probabilities" / f"{sid}.nii.gz"))
        assert probs.shape == (*img.shape, 3) and np.allclose(probs.affine, img.affine)
        rec = man["cases"][sid]["raw"]
        assert rec["identification"]["roles"]["t1ce"]["series_uid"] == truth["roles"]["t1ce"]["series_uid"]
        assert rec["review"] is False and "t1ce_to_atlas" in rec["qc"]["registration"]
        assert (out / "atlas_space" / sid / f"{sid}-t1c.nii.gz").exists()
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out / f"{sid}_seg.dcm"))
        refs = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        t1ce_files = truth["roles"]["t1ce"]["dicom_files"]
        assert refs == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in t1ce_files}
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == truth["roles"]["t1ce"]["series_uid"]
    assert man["run"]["raw"]["reference"] == "t1ce"
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert main(args) == 0          # continued: every mask already there
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == before


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_a_failed_study_gets_nothing_and_the_batch_goes_on(studies, model, tmp_path):
    """A study without a post-contrast series (the T1ce and its reformats removed): no
    mask, its reason in raw_failed.json and the exit status; the other studies are
    predicted."""
    root = tmp_path / "in"
    shutil.copytree(studies / "studies", root)
    ids = sorted(p.name for p in root.iterdir())
    truth = load_truth(studies, ids[0])
    post = [truth["roles"]["t1ce"]] + [d for d in truth["distractors"] if d["kind"] in ("mpr", "subtraction")]
    for f in (f for s in post for f in s["files"]):
        (root / ids[0] / f).unlink()
    for d in ids[2:]:
        shutil.rmtree(root / d)
    from medseg.cli import main
    out = tmp_path / "out"
    assert main(["predict", "--raw", "--input", str(root), "--model", str(model), "--out", str(out),
                 "--atlas-spacing", "2"]) == 1
    failed = json.loads((out / "raw_failed.json").read_text())["failed"]
    assert list(failed) == [ids[0]] and "post-contrast" in failed[ids[0]]
    assert not (out / f"{ids[0]}.nii.gz").exists() and not (out / "atlas_space" / ids[0]).exists()
    assert (out / f"{ids[1]}.nii.gz").exists()


@pytest.mark.slow
def test_implausible_qc_refuses_the_mask_unless_accepted(studies, model, tmp_path, monkeypatch):
    """A brain mask outside the plausible volume: no mask, the reason said; with
    --accept-review the mask is written and recorded as review: true."""
    import medseg.raw.prepare as prep
    from medseg.cli import main
    monkeypatch.setattr(prep, "BRAIN_ML", (5000.0, 6000.0))
    root = tmp_path / "in"
    sid = sorted(p.name for p in (studies / "studies").iterdir())[1]
    shutil.copytree(studies / "studies" / sid, root / sid)
    out = tmp_path / "out"
    base = ["predict", "--raw", "--input", str(root), "--model", str(model), "--atlas-spacing", "2"]
    assert main([*base, "--out", str(out)]) == 1
    failed = json.loads((out / "raw_failed.json").read_text())["failed"]
    assert "brain mask of" in failed[sid] and "--accept-review" in failed[sid]
    assert not (out / f"{sid}.nii.gz").exists()
    assert main([*base, "--out", str(tmp_path / "out2"), "--accept-review"]) == 0
    rec = json.loads((tmp_path / "out2" / "predictions.json").read_text())["cases"][sid]["raw"]
    assert rec["review"] is True and "brain mask of" in rec["review_reasons"][0]


@pytest.mark.slow
def test_series_named_by_hand(studies, model, tmp_path):
    """--raw --t1ce/--flair/... with NIfTI files on their own grids (here converted
    from the DICOM series), the mask on the FLAIR's grid with --reference flair."""
    from medseg.cli import main
    from medseg.data.io import write_nifti
    sid = sorted(p.name for p in (studies / "studies").iterdir())[2]
    truth = load_truth(studies, sid)
    ident = identify(scan_study(studies / "studies" / sid))
    files = []
    for role in ("t1", "t1ce", "t2", "flair"):
        vol, aff = load_series(ident.choices[role].series)
        write_nifti(vol, aff, tmp_path / "nii" / f"{role}.nii.gz")
        files += [f"--{role}", str(tmp_path / "nii" / f"{role}.nii.gz")]
    out = tmp_path / "out"
    assert main(["predict", "--raw", *files, "--case-id", "c1", "--reference", "flair", "--model", str(model),
                 "--out", str(out), "--atlas-spacing", "2"]) == 0
    img = nib.load(str(out / "c1.nii.gz"))
    assert img.shape == tuple(truth["roles"]["flair"]["shape"])
    assert np.allclose(img.affine, truth["roles"]["flair"]["affine"], atol=1e-3)


def test_unknown_atlas_and_sri24_say_how(tmp_path):
    from medseg.errors import MedsegError
    from medseg.raw.register import atlas_files
    path, desc = atlas_files("mni152")
    assert path.is_file() and "MNI152" in desc
    with pytest.raises(MedsegError, match="--atlas /path/to/sri24"):
        atlas_files("sri24")
    with pytest.raises(MedsegError, match="expected one of mni152"):
        atlas_files(str(tmp_path / "nope.txt"))


def test_both_engines_map_the_same_mask_onto_the_native_grid(prepared, model, tmp_path):
    """The ONNX engine takes the raw path's native-space hook like the torch engine:
    the same prepared study gives the same mask on the native T1ce grid."""
    from medseg.export import export_onnx
    from medseg.predict import open_engine
    from medseg.raw.run import _space
    truth, p = prepared
    ck = sorted((model / "checkpoints").glob("*.pt"))[-1]
    export_onnx([ck], tmp_path / "m.onnx", print_fn=lambda s: None)
    channels = [c for c in ("t1", "t1ce", "t2", "flair") if c in p.images]
    masks = {}
    for name, src in (("torch", [ck]), ("onnx", [tmp_path / "m.onnx"])):
        engine = open_engine(src, name)
        masks[name], _ = engine.predict_case(p.channel_files(), tmp_path / f"{name}.nii.gz", channels=channels,
                                             space=_space(p, "t1ce"))
        img = nib.load(str(tmp_path / f"{name}.nii.gz"))
        assert img.shape == tuple(truth["roles"]["t1ce"]["shape"])
        assert np.allclose(img.affine, truth["roles"]["t1ce"]["affine"], atol=1e-3)
    agree = (masks["torch"] == masks["onnx"]).mean()
    assert agree > 0.9999, agree


def test_a_reformat_standing_in_for_a_missing_original_is_flagged(studies, tmp_path):
    """The post-contrast original removed, its MPR reformat is the best T1ce left: it is
    chosen only with a warning that says so (never silently)."""
    root = tmp_path / "in"
    sid = sorted(p.name for p in (studies / "studies").iterdir())[0]
    shutil.copytree(studies / "studies" / sid, root / sid)
    truth = load_truth(studies, sid)
    mpr = [d for d in truth["distractors"] if d["kind"] == "mpr"]
    assert mpr, "the generator's study 0 of this seed is expected to hold an MPR reformat of the T1ce"
    for f in truth["roles"]["t1ce"]["files"]:
        (root / sid / f).unlink()
    ident = identify(scan_study(root / sid))
    assert ident.choices["t1ce"].series.series_uid == mpr[0]["series_uid"]
    assert any("reformat or derived" in w for w in ident.warnings)
