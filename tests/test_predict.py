"""Prediction and evaluation: masks on the exact input grid for any orientation
and spacing, fold ensembles, TTA, the single-case path, evaluation, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.discover import discover
from medseg.infer import Predictor
from medseg.predict import resolve_checkpoints

from conftest import reoriented_case, tiny_cv_run, tree_fingerprint


@pytest.fixture(scope="module")
def trained(_pristine, tmp_path_factory):
    """A 5-fold cross-validation run on tiny brats2023 data → (run folder, data root)."""
    # Enough epochs that the model predicts some tumour, so geometry errors would show.
    return tiny_cv_run(_pristine, tmp_path_factory.mktemp("trained"), 5,
                       ["train.epochs=6", "train.iters_per_epoch=4"])


@pytest.mark.parametrize("codes, zoom_z", [
    (("R", "A", "S"), 1), (("L", "P", "S"), 1), (("P", "I", "R"), 1), (("A", "S", "L"), 1),
    (("L", "P", "S"), 2),
])
def test_mask_lands_on_the_input_grid(trained, tmp_path, codes, zoom_z):
    run, root = trained
    case = sorted(p for p in root.iterdir() if p.is_dir())[0]
    src = reoriented_case(case, tmp_path / "in" / case.name, codes, zoom_z)
    ras = reoriented_case(case, tmp_path / "ras" / case.name, ("R", "A", "S"), zoom_z)
    out = {}
    for name, folder in (("x", src.parent), ("ras", ras.parent)):
        assert main(["predict", "--model", str(run), "--input", str(folder),
                     "--out", str(tmp_path / f"out_{name}")]) == 0
        out[name] = nib.load(tmp_path / f"out_{name}" / f"{case.name}.nii.gz")
    ref = nib.load(next(src.glob("*-t1n.nii.gz")))
    got = out["x"]
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.affine, ref.affine)
    assert nib.aff2axcodes(got.affine) == codes
    assert int(got.header["qform_code"]) == int(ref.header["qform_code"])
    assert int(got.header["sform_code"]) == int(ref.header["sform_code"])
    assert got.get_data_dtype() == np.uint8
    # Labels on the right voxels: brought back to RAS, the mask equals the mask
    # predicted from the RAS copy of the same case.
    back = got.as_reoriented(nib.orientations.ornt_transform(
        nib.io_orientation(got.affine), nib.orientations.axcodes2ornt(("R", "A", "S"))))
    mask = np.asarray(back.dataobj)
    assert mask.any(), "the tiny model predicts no tumour at all: the test would prove nothing"
    np.testing.assert_array_equal(mask, np.asarray(out["ras"].dataobj))


def test_ensemble_tta_and_single_case(trained, tmp_path):
    run, root = trained
    ckpts = resolve_checkpoints([run])
    assert len(ckpts) == 5
    case = discover(root).cases[0]
    singles = [Predictor([c]).probabilities(case.images)[0] for c in ckpts]
    five = Predictor(ckpts).probabilities(case.images)[0]
    np.testing.assert_allclose(five, np.mean(singles, axis=0), atol=1e-5)
    assert not np.allclose(singles[0], singles[1])
    tta = Predictor(ckpts[:1], mirror=True).probabilities(case.images)[0]
    assert not np.allclose(singles[0], tta)
    t1n, t1c, t2w, t2f = case.images
    assert main(["predict", "--model", str(ckpts[0]), "--t1", str(t1n), "--t1ce", str(t1c),
                 "--t2", str(t2w), "--flair", str(t2f), "--out", str(tmp_path / "one")]) == 0
    mask = nib.load(tmp_path / "one" / f"{case.case_id}.nii.gz")
    assert mask.shape == nib.load(t1n).shape
    # Probability maps on the same grid, consistent with the mask (threshold 0.5).
    assert main(["predict", "--model", str(ckpts[0]), "--t1", str(t1n), "--t1ce", str(t1c),
                 "--t2", str(t2w), "--flair", str(t2f), "--out", str(tmp_path / "one"),
                 "--overwrite", "--probabilities"]) == 0
    pm = nib.load(tmp_path / "one" / "probabilities" / f"{case.case_id}.nii.gz")
    assert pm.shape == (*mask.shape, 3)
    np.testing.assert_allclose(pm.affine, mask.affine)
    p = np.asarray(pm.dataobj)
    assert p.min() >= 0 and p.max() <= 1
    lab = np.asarray(mask.dataobj)
    # Any region above 0.5 is labelled (precedence ET > TC > WT fills WT's gaps).
    np.testing.assert_array_equal((p > 0.5).any(-1), lab > 0)
    # The 2023 option names work too.
    assert main(["predict", "--model", str(ckpts[0]), "--t1n", str(t1n), "--t1c", str(t1c),
                 "--t2w", str(t2w), "--t2f", str(t2f), "--out", str(tmp_path / "two"),
                 "--case-id", "x"]) == 0
    assert (tmp_path / "two" / "x.nii.gz").is_file()


def test_predict_refuses_unsafe_or_bad_input(trained, tmp_path, capsys):
    run, root = trained
    data = tmp_path / "data"
    shutil.copytree(root, data)
    before = tree_fingerprint(data)
    args = ["predict", "--model", str(run), "--input", str(data)]
    assert main([*args, "--out", str(data / "masks")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "post-processing: none" in capsys.readouterr().out
    # The same run again has nothing left to do; other settings need --overwrite.
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "continuing" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "o"), "--min-component-ml", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "min_component_ml was 0.0" in err
    assert main([*args, "--out", str(tmp_path / "o"), "--overwrite", "--min-component-ml", "0.5"]) == 0
    assert "components < 0.5 mL removed" in capsys.readouterr().out
    assert tree_fingerprint(data) == before
    case = discover(data).cases[0]
    t1n, t1c, t2w, t2f = case.images
    assert main(["predict", "--model", str(run), "--t1", str(t1n), "--t1ce", str(t1c),
                 "--t2", str(t2w), "--out", str(tmp_path / "p")]) == 2
    assert "--flair" in capsys.readouterr().err
    # A modality on another grid is named.
    img = nib.load(t2f)
    bad = tmp_path / "bad_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-2], img.affine), bad)
    assert main(["predict", "--model", str(run), "--t1", str(t1n), "--t1ce", str(t1c),
                 "--t2", str(t2w), "--flair", str(bad), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "bad_flair.nii.gz" in err and "grid" in err
    assert main(["predict", "--model", str(tmp_path / "nothing"), "--input", str(data),
                 "--out", str(tmp_path / "r")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_evaluate_perfect_and_missing_predictions(trained, tmp_path, capsys):
    _, root = trained
    ds = discover(root)
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for c in ds.training:
        shutil.copy(c.label, perfect / f"{c.case_id}.nii.gz")
    assert main(["evaluate", "--pred", str(perfect), "--ref", str(root), "--out", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["cases"] == len(ds.training)
    for r in ("TC", "WT", "ET"):
        assert summary["overall"][r]["dice"]["mean"] == 1.0
        assert summary["overall"][r]["hd95"]["mean"] == 0.0
    (perfect / f"{ds.training[0].case_id}.nii.gz").unlink()
    assert main(["evaluate", "--pred", str(perfect), "--ref", str(root), "--out", str(tmp_path / "f")]) == 2
    assert ds.training[0].case_id in capsys.readouterr().err


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_report_pages(trained, tmp_path):
    run, root = trained
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "--input", str(root), "--out", str(out)]) == 0
    assert main(["report", "--pred", str(out), "--images", str(root), "--ref", str(root),
                 "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    ids = [c.case_id for c in discover(root).cases]
    for cid in ids:
        assert cid in page
        png = tmp_path / "rep" / f"{cid}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Dice" in page and "HD95" in page


def _with_convention(ckpt: Path, convention: str, dst: Path) -> Path:
    """A copy of a checkpoint that says it was trained on `convention` labels (the
    network's outputs are regions, so the weights do not change)."""
    import torch
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["meta"]["label_convention"] = convention
    ck["meta"]["pipeline"]["label_convention"] = convention      # the spec says so too
    torch.save(ck, dst)
    return dst


def _mask_values(folder: Path) -> set[int]:
    return set().union(*(np.unique(np.asarray(nib.load(p).dataobj)).tolist()
                         for p in folder.glob("*.nii.gz")))


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_masks_use_the_inputs_label_convention(trained, dataset, tmp_path, capsys, engine):
    run, root = trained
    model = _with_convention(resolve_checkpoints([run])[0], "brats2021", tmp_path / "bt21.pt")
    if engine == "onnx":
        assert main(["export", "--model", str(model), "--out", str(tmp_path / "bt21.onnx")]) == 0
        model = tmp_path / "bt21.onnx"
    capsys.readouterr()
    base = ["predict", "--model", str(model), "--engine", engine]
    # A BraTS 2021-trained model on a BraTS 2023 folder writes 2023 labels (ET = 3),
    # on a BraTS 2021 folder 2021 labels (ET = 4), on an MSD folder MSD labels.
    for layout, want, et in (("brats2023", {0, 1, 2, 3}, 3), ("brats2021", {0, 1, 2, 4}, 4),
                             ("msd", {0, 1, 2, 3}, 3)):
        data = root if layout == "brats2023" else dataset(layout)
        out = tmp_path / f"out_{layout}"
        assert main([*base, "--input", str(data), "--out", str(out)]) == 0
        got = _mask_values(out)
        assert got <= want and et in got, (layout, got)
        manifest = json.loads((out / "predictions.json").read_text())
        assert manifest["label_convention"] == layout and manifest["run"]["engine"] == engine
        assert layout in manifest["run"]["convention_source"] and manifest["status"] == "complete"
        assert manifest["run"]["model_label_convention"] == "brats2021"
        assert f"labels: {layout}" in capsys.readouterr().out
        mask = nib.load(next(out.glob("*.nii.gz")))
        assert mask.header["descrip"].item().endswith(f"labels={layout}".encode())
        assert mask.header.get_intent()[0] == "label" and float(mask.header["cal_max"]) == max(want)
    # The masks evaluate against their own dataset; read with a convention that
    # swaps labels (msd: 1 = edema), where every value is still allowed, the header's
    # record refuses them instead of scoring swapped regions.
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "out_brats2021"), "--ref", str(dataset("brats2021")),
                 "--out", str(tmp_path / f"ev_{engine}")]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "out_brats2023"), "--ref", str(root),
                 "--convention", "msd", "--out", str(tmp_path / f"bad_{engine}")]) == 2
    err = capsys.readouterr().err
    assert "brats2023 labels" in err and "--convention brats2023" in err
    # MSD swaps NCR and edema: the MSD mask is the 2023 mask with labels 1 and 2 exchanged.
    msd = dataset("msd")
    case = discover(msd).cases[0]
    a = np.asarray(nib.load(tmp_path / "out_msd" / f"{case.case_id}.nii.gz").dataobj)
    if engine == "torch":
        b, _ = Predictor([model]).labels(case.images, "brats2023", discover(msd).layout.channels)
        swap = np.array([0, 2, 1, 3], np.uint8)
        np.testing.assert_array_equal(a, swap[b])
    # Loose files: named like BraTS 2023 → 2023 labels; neutral names → the model's,
    # said so; --convention overrides.
    t1n, t1c, t2w, t2f = discover(root).cases[0].images
    files = ["--t1", str(t1n), "--t1ce", str(t1c), "--t2", str(t2w), "--flair", str(t2f)]
    assert main([*base, *files, "--out", str(tmp_path / "loose")]) == 0
    assert _mask_values(tmp_path / "loose") <= {0, 1, 2, 3}
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    for name, src in zip(("a", "b", "c", "d"), (t1n, t1c, t2w, t2f)):
        shutil.copy(src, neutral / f"{name}.nii.gz")
    plain = ["--t1", str(neutral / "a.nii.gz"), "--t1ce", str(neutral / "b.nii.gz"),
             "--t2", str(neutral / "c.nii.gz"), "--flair", str(neutral / "d.nii.gz")]
    capsys.readouterr()
    assert main([*base, *plain, "--out", str(tmp_path / "n1")]) == 0
    said = capsys.readouterr().out
    assert "labels: brats2021" in said and "--convention" in said
    assert main([*base, *plain, "--out", str(tmp_path / "n2"), "--convention", "brats2023"]) == 0
    assert json.loads((tmp_path / "n2" / "predictions.json").read_text())["label_convention"] == "brats2023"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_truncated_input_named_before_any_mask_is_written(trained, tmp_path, capsys, engine):
    run, root = trained
    model = run
    if engine == "onnx":
        assert main(["export", "--model", str(run / "fold_0"), "--out", str(tmp_path / "m.onnx")]) == 0
        model = tmp_path / "m.onnx"
    data = tmp_path / "data"
    shutil.copytree(root, data)
    bad = discover(data).cases[-1].images[2]       # the last case's T2: found only at the end
    _truncate(bad)
    out = tmp_path / "masks"
    capsys.readouterr()
    assert main(["predict", "--engine", engine, "--model", str(model), "--input", str(data),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated or corrupt" in err and "Traceback" not in err
    assert "Compose" not in err and "Transform" not in err
    assert not list(out.glob("*.nii.gz")) and not (out / "predictions.json").exists()


def test_torch_engine_names_the_truncated_file_when_called_directly(trained, tmp_path):
    # cv and the bundle call the Predictor without the batch pre-check.
    from medseg.errors import DataError
    run, root = trained
    case = discover(root).cases[0]
    images = []
    for p in case.images:
        shutil.copy(p, tmp_path / p.name)
        images.append(tmp_path / p.name)
    _truncate(images[3])
    with pytest.raises(DataError, match="truncated or corrupt") as exc:
        Predictor(resolve_checkpoints([run])[:1]).labels(images, "brats2023")
    assert str(images[3]) in str(exc.value)


def test_interrupted_batch_is_continued(trained, tmp_path, capsys, monkeypatch):
    from medseg.engine import Engine
    run, root = trained
    out = tmp_path / "masks"
    real, calls = Engine.predict_case, []

    def flaky(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(Engine, "predict_case", flaky)
    args = ["predict", "--model", str(run / "fold_0"), "--input", str(root), "--out", str(out)]
    assert main(args) == 130                       # Ctrl-C during the third case
    first = sorted(out.glob("*.nii.gz"))
    assert len(first) == 2
    assert json.loads((out / "predictions.json").read_text())["status"] == "running"
    stamps = {p: p.stat().st_mtime_ns for p in first}
    monkeypatch.setattr(Engine, "predict_case", real)
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    n = len(discover(root).cases)
    assert f"2 of {n} cases already predicted" in said and f"{n - 2} masks in" in said
    assert len(list(out.glob("*.nii.gz"))) == n
    assert {p: p.stat().st_mtime_ns for p in first} == stamps      # finished masks untouched
    assert json.loads((out / "predictions.json").read_text())["status"] == "complete"
