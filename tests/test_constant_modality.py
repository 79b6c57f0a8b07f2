"""A blank modality file (every voxel one value: all zero, or any constant) is a
missing modality everywhere: `medseg data check` reports it, and prediction
leaves it out for a model trained with modality dropout or refuses it, naming
the file, before anything is written, for a model trained on all four."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.discover import discover
from medseg.data.cases import InputCase
from medseg.data.inputs import check_inputs, check_modalities, run_batch
from medseg.errors import DataError
from medseg.labels import CHANNELS

from conftest import tiny_cv_run

#: A blank value and how messages describe it.
BLANKS = [(0.0, "all zero"), (7.0, "constant (every voxel is 7)")]
DROPOUT = {"modality_dropout": 0.5}
PLAIN = {"modality_dropout": 0.0}


def _case(root, blank: dict[str, float], case_id: str = "c1") -> InputCase:
    """A case of four tiny files (varying voxels), the modalities in `blank` all that value."""
    rng = np.random.default_rng(len(case_id))
    folder = root / case_id
    folder.mkdir(parents=True)
    files = []
    for ch in CHANNELS:
        data = np.full((5, 5, 5), blank[ch], np.float32) if ch in blank else rng.random((5, 5, 5), np.float32)
        files.append(folder / f"{case_id}_{ch}.nii.gz")
        nib.save(nib.Nifti1Image(data, np.eye(4)), files[-1])
    return InputCase(case_id, files, list(CHANNELS), "brats2021")


def test_one_rule_decides_blank():
    from medseg.data.validate import constant_value, describe_blank
    assert constant_value(np.zeros((3, 3, 3))) == 0.0
    assert constant_value(np.full((3, 3, 3), 7, np.int16)) == 7.0
    assert constant_value(np.arange(27.0).reshape(3, 3, 3)) is None
    with_nan = np.full((3, 3, 3), 2.0)
    with_nan[0, 0, 0] = np.nan
    assert constant_value(with_nan) == 2.0                    # NaN is reported on its own
    assert np.isnan(constant_value(np.full((2, 2, 2), np.nan)))
    assert describe_blank(0.0) == "all zero" and describe_blank(7.0) == "constant (every voxel is 7)"


@pytest.mark.parametrize("value, found", BLANKS)
def test_a_dropout_model_predicts_without_the_blank_modality(tmp_path, capsys, value, found):
    case = _case(tmp_path, {"t2": value})
    t2 = case.images[2]
    check_modalities([case], DROPOUT, "m.pt")
    assert check_inputs([case]) == {"c1": ["t2"]}
    assert case.channels == ["t1", "t1ce", "flair"] and t2 not in case.images and case.missing == ["t2"]
    said = capsys.readouterr().out
    assert f"note: {t2}" in said and found in said and "missing modality" in said, said


@pytest.mark.parametrize("value, found", BLANKS)
def test_a_model_without_dropout_refuses_the_blank_modality(tmp_path, value, found):
    case = _case(tmp_path, {"t1ce": value})
    check_modalities([case], PLAIN, "m.pt")
    with pytest.raises(DataError) as err:
        check_inputs([case])
    msg = str(err.value)
    assert str(case.images[1]) in msg and found in msg                     # the file, what was found
    assert "modality_dropout" in msg and "re-export" in msg                 # why, and the fix
    assert case.channels == list(CHANNELS)


def test_every_modality_blank_is_refused_even_with_dropout(tmp_path):
    case = _case(tmp_path, {ch: 0.0 for ch in CHANNELS})
    check_modalities([case], DROPOUT, "m.pt")
    with pytest.raises(DataError, match="case c1: every modality is blank"):
        check_inputs([case])


def test_a_blank_channel_of_a_4d_file_is_refused_with_the_way_out(tmp_path):
    data = np.random.default_rng(0).random((5, 5, 5, 4), np.float32)
    data[..., 2] = 0.0                                            # MSD order: flair, t1, t1ce, t2
    path = tmp_path / "BRATS_001.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    case = InputCase("BRATS_001", [path], ["flair", "t1", "t1ce", "t2"], "msd")
    check_modalities([case], DROPOUT, "m.pt")
    with pytest.raises(DataError, match="channel t1ce of this 4D image of case BRATS_001 is all zero"):
        check_inputs([case])


def _batch(cases, out, meta):
    """`check_modalities` then `run_batch`, as the predict driver calls them, with a
    predict step that records the channels it was given."""
    check_modalities(cases, meta, "m.pt")

    def one(case, outs):
        outs[0].write_bytes(b"mask")
        return {"channels": list(case.channels)}
    return run_batch(cases, out, None, [[out / f"{c.case_id}.nii.gz"] for c in cases], False,
                     {"label_convention": "brats2021", "model": ["m.pt"]}, one,
                     print_fn=lambda s: None)


def test_batch_records_a_blank_modality_as_missing_and_keeps_it_when_continued(tmp_path):
    out = tmp_path / "out"
    cases = [_case(tmp_path / "in", {"flair": 3.0}, "c1"), _case(tmp_path / "in", {}, "c2")]
    fresh = [InputCase(c.case_id, list(c.images), list(CHANNELS), "brats2021") for c in cases]
    _batch(cases, out, DROPOUT)
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["missing_modalities"] == {"c1": ["flair"]}
    assert manifest["cases"]["c1"]["channels"] == ["t1", "t1ce", "t2"]
    # Continued (c2's mask lost): c1 is not read again, and still recorded as predicted without flair.
    (out / "c2.nii.gz").unlink()
    assert _batch(fresh, out, DROPOUT)["predicted"] == 1
    assert json.loads((out / "predictions.json").read_text())["missing_modalities"] == {"c1": ["flair"]}


def test_batch_refuses_before_writing_anything(tmp_path):
    out = tmp_path / "out"
    cases = [_case(tmp_path / "in", {}, "c1"), _case(tmp_path / "in", {"t1": 0.0}, "c2")]
    with pytest.raises(DataError, match="c2_t1.nii.gz: the t1 image of case c2 is all zero"):
        _batch(cases, out, PLAIN)
    assert not out.exists() or not list(out.iterdir())


def _rewrite_constant(path, value: float) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.full(img.shape, value, np.float32), img.affine, img.header), path)


def test_data_check_reports_a_constant_modality(dataset, capsys):
    root = dataset("brats2023", cases=3)
    t2w = discover(root).cases[0].images[2]
    _rewrite_constant(t2w, 5.0)
    assert main(["data", "check", "--root", str(root)]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]
    assert any(t2w.name in line and "constant (every voxel is 5)" in line and "re-export" in line
               for line in errors), errors


@pytest.fixture(scope="module")
def models(_pristine, tmp_path_factory):
    """A tiny trained fold (no modality dropout) and a copy that says it was trained
    with dropout (the input rule reads only the metadata), each also as ONNX."""
    base = tmp_path_factory.mktemp("constant")
    run, root = tiny_cv_run(_pristine, base, 2, [], only=[0])
    plain = run / "fold_0" / "checkpoints" / "final.pt"
    ck = torch.load(plain, weights_only=True)
    ck["meta"]["modality_dropout"] = 0.5
    dropout = base / "dropout.pt"
    torch.save(ck, dropout)
    for pt in (plain, dropout):
        assert main(["export", "--model", str(pt), "--out", str(base / f"{pt.stem}.onnx")]) == 0
    return {"torch": (plain, dropout), "onnx": (base / "final.onnx", base / "dropout.onnx")}, root


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_cli_blank_modality_on_each_engine(models, tmp_path, capsys, engine):
    (plain, dropout), root = models[0][engine], models[1]
    data = tmp_path / "data"
    case = sorted(p for p in root.iterdir() if p.is_dir())[0]
    shutil.copytree(case, data / case.name)
    t2w = next((data / case.name).glob("*-t2w.nii.gz"))
    _rewrite_constant(t2w, 0.0)
    args = ["predict", "--engine", engine, "--input", str(data)]
    capsys.readouterr()
    assert main([*args, "--model", str(plain), "--out", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert str(t2w) in err and "all zero" in err and "modality_dropout" in err and "Traceback" not in err
    assert not (tmp_path / "plain").exists() or not list((tmp_path / "plain").iterdir())
    assert main([*args, "--model", str(dropout), "--out", str(tmp_path / "dropout")]) == 0
    said = capsys.readouterr().out
    assert f"note: {t2w}" in said and "without t2" in said
    manifest = json.loads((tmp_path / "dropout" / "predictions.json").read_text())
    assert manifest["missing_modalities"] == {case.name: ["t2"]}
    assert (tmp_path / "dropout" / f"{case.name}.nii.gz").is_file()
