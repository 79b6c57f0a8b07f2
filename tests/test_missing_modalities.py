"""Missing modalities: modality dropout in training, the fill of a missing channel,
prediction from a subset on both engines, and the refusal of a model that never
saw a blank channel."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.discover import discover
from medseg.data.inputs import cases_from_input
from medseg.edge import EdgePredictor
from medseg.infer import Predictor
from medseg.labels import CHANNELS
from medseg.metrics import dice
from medseg.transforms import IMAGE, LABEL, MISSING_FILL, RandModalityDropoutd, preprocessing

from conftest import tiny_cv_run


def _sample(seed: int, prob: float = 0.5) -> np.ndarray:
    t = RandModalityDropoutd(IMAGE, prob)
    t.set_random_state(seed)
    img = torch.rand(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) + 1.0   # never 0
    out = t({IMAGE: img, LABEL: torch.ones(3, 3, 3, 3)})
    assert torch.equal(out[LABEL], torch.ones(3, 3, 3, 3))
    return np.asarray(out[IMAGE])


def test_modality_dropout_keeps_one_is_seeded_and_fills_exactly():
    dropped = []
    for seed in range(700):
        x = _sample(seed)
        gone = tuple(i for i in range(4) if (x[i] == MISSING_FILL).all())
        kept = [i for i in range(4) if i not in gone]
        assert kept, "at least one modality always stays"
        for i in kept:
            assert (x[i] >= 1.0).all()                  # untouched
        dropped.append(gone)
        np.testing.assert_array_equal(x, _sample(seed))  # same seed, same draw
    counts = Counter(dropped)
    # prob 0.5: about half the samples keep everything; the 14 droppable subsets
    # (non-empty, complement non-empty) all occur, each about 1/28 of the samples.
    assert 0.4 < counts[()] / len(dropped) < 0.6
    assert set(counts) - {()} == set(RandModalityDropoutd.SUBSETS) and len(RandModalityDropoutd.SUBSETS) == 14
    assert all(n > 5 for k, n in counts.items() if k)
    assert all(not (_sample(s, prob=0.0) == MISSING_FILL).any() for s in range(20))


def test_missing_channel_is_filled_after_the_same_preprocessing(dataset):
    root = dataset("brats2023", 1)
    case = discover(root).cases[0]
    full = preprocessing(CHANNELS, "brats2023", (6, 6, 6), with_label=False)(
        {IMAGE: [str(p) for p in case.images]})[IMAGE]
    present = ["t1", "t2", "flair"]
    files = [str(p) for p, c in zip(case.images, CHANNELS) if c in present]
    part = preprocessing(present, "brats2023", (6, 6, 6), with_label=False)({IMAGE: files})[IMAGE]
    assert part.shape == full.shape
    assert (np.asarray(part[1]) == MISSING_FILL).all()
    for i in (0, 2, 3):                                  # the others exactly as with all four
        np.testing.assert_allclose(np.asarray(part[i]), np.asarray(full[i]), atol=1e-5)


@pytest.fixture(scope="module")
def dropout_model(_pristine, tmp_path_factory):
    """A tiny cv fold trained with modality dropout (the missing-aware network, whose
    FiLM flags must also work in the ONNX graph), exported to ONNX too."""
    base = tmp_path_factory.mktemp("dropout")
    run, root = tiny_cv_run(_pristine, base, 2, ["train.epochs=30", "train.iters_per_epoch=4",
                                                 "train.val_every=30", "train.modality_dropout=0.5",
                                                 "model.args.missing_aware=true"],
                            only=[0])
    ckpt = run / "fold_0" / "checkpoints" / "final.pt"
    assert main(["export", "--model", str(ckpt), "--out", str(base / "m.onnx")]) == 0
    return ckpt, base / "m.onnx", root


def _without(root, tmp_path, modalities: tuple[str, ...]):
    """A copy of the data folder whose first two cases lack `modalities`."""
    keys = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    data = tmp_path / "data"
    shutil.copytree(root, data)
    for case in discover(data).cases[:2]:
        for m in modalities:
            (case.folder / f"{case.case_id}-{keys[m]}.nii.gz").unlink()
    return data


def test_dropout_model_predicts_from_a_subset_on_both_engines(dropout_model, tmp_path, capsys):
    ckpt, onnx, root = dropout_model
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["modality_dropout"] == 0.5 and "any non-empty subset" in meta["input_subsets"]
    assert meta["network"]["args"]["missing_aware"] is True
    assert any(k.endswith(".film.weight") and v.any() for k, v in torch.load(ckpt, weights_only=True)["model"].items())
    assert json.loads(json.dumps(EdgePredictor(onnx).meta))["modality_dropout"] == 0.5
    data = _without(root, tmp_path, ("t1ce", "t2"))
    case = cases_from_input(data)[0][0]
    assert case.channels == ["t1", "flair"]
    for engine, model in (("torch", ckpt), ("onnx", onnx)):
        out = tmp_path / engine
        capsys.readouterr()
        assert main(["predict", "--engine", engine, "--model", str(model), "--input", str(data),
                     "--out", str(out)]) == 0
        said = capsys.readouterr().out
        assert "without t1ce, t2" in said
        manifest = json.loads((out / "predictions.json").read_text())
        assert manifest["missing_modalities"] == {c.case_id: ["t1ce", "t2"] for c in discover(data).cases[:2]}
        assert len(list(out.glob("*.nii.gz"))) == len(discover(data).cases)
    # The report shows the modalities the case has and says which were missing.
    assert main(["report", "--pred", str(tmp_path / "torch"), "--images", str(data),
                 "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "predicted without" in page and "t1ce, t2" in page
    assert (tmp_path / "rep" / f"{case.case_id}.png").is_file()
    a = np.asarray(nib.load(tmp_path / "torch" / f"{case.case_id}.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "onnx" / f"{case.case_id}.nii.gz").dataobj)
    # The default torch engine runs bf16; parity is judged at fp32 on both.
    c, _ = Predictor([ckpt], amp=False).labels(case.images, "brats2023", case.channels)
    d, _ = EdgePredictor(onnx).labels(case.images, "brats2023", case.channels)
    assert (c > 0).sum() > 50, "the tiny model should predict tumour from two modalities"
    for label in (1, 2, 3):
        if (c == label).any() or (d == label).any():
            assert dice(c == label, d == label) >= 0.999, label
    assert a.shape == b.shape == c.shape
    # A single modality, given as loose files, works too.
    t2f = case.images[case.channels.index("flair")]
    assert main(["predict", "--model", str(ckpt), "--flair", str(t2f), "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "predictions.json").read_text())["missing_modalities"] == \
        {case.case_id: ["t1", "t1ce", "t2"]}


def test_model_without_dropout_refuses_a_missing_modality(dropout_model, tmp_path, capsys):
    ckpt, _, root = dropout_model
    ck = torch.load(ckpt, weights_only=True)
    ck["meta"]["modality_dropout"] = 0.0
    plain = tmp_path / "plain.pt"
    torch.save(ck, plain)
    assert main(["export", "--model", str(plain), "--out", str(tmp_path / "plain.onnx")]) == 0
    data = _without(root, tmp_path, ("flair",))
    for engine, model in (("torch", plain), ("onnx", tmp_path / "plain.onnx")):
        out = tmp_path / f"out_{engine}"
        assert main(["predict", "--engine", engine, "--model", str(model), "--input", str(data),
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        case = discover(data).cases[0].case_id
        assert f"case {case} has no flair" in err and "modality_dropout" in err and "Traceback" not in err
        assert not out.exists() or not list(out.iterdir())
