"""ONNX export: parity per registry model, metadata, failing verification, the
torch-free edge runtime, and edge masks equal to the PyTorch masks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.discover import discover
from medseg.edge import EdgePredictor, read_metadata, resample_linear, window_starts
from medseg.errors import MedsegError
from medseg.export import export_onnx
from medseg.infer import Predictor
from medseg.labels import labels_to_regions
from medseg.metrics import dice
from medseg.models import build_model
from medseg.predict import resolve_checkpoints

from conftest import tiny_cv_run

REPO = Path(__file__).resolve().parents[1]


def checkpoint(tmp_path, name, args, roi, spacing=(6.0, 6.0, 6.0)) -> Path:
    torch.manual_seed(0)
    extra = {"deep_supervision": False} if name == "unet3d" else {}
    model = build_model(name, **args, **extra)
    meta = {"network": {"name": name, "args": args}, "channels": ["t1", "t1ce", "t2", "flair"],
            "regions": ["TC", "WT", "ET"], "label_convention": "brats2023", "spacing": list(spacing),
            "roi": list(roi), "normalization": "z-score", "medseg_version": "test",
            "infer": {"overlap": 0.5, "sw_batch_size": 1, "threshold": 0.5, "blend": "gaussian",
                      "amp": False}}
    path = tmp_path / f"{name}.pt"
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return path


# swinunetr exports, but only for the window size it was traced at: its
# shifted-window attention mask is baked into the graph, so dynamic spatial axes
# do not hold (the edge runtime always feeds ROI-sized windows, so it still runs).
# Slow (a 64³ trace), so it is in the slow suite.
@pytest.mark.parametrize("name, args, roi, dynamic", [
    ("unet3d", {"filters": [8, 16, 32]}, (16, 16, 16), True),
    ("segresnet", {"init_filters": 8}, (16, 16, 16), True),
    ("attention_unet", {"channels": [8, 16, 32]}, (16, 16, 16), True),
    pytest.param("swinunetr", {"feature_size": 12}, (64, 64, 64), False, marks=pytest.mark.slow),
])
def test_every_registry_model_exports_with_parity(tmp_path, name, args, roi, dynamic):
    ck = checkpoint(tmp_path, name, args, roi)
    report = export_onnx([ck], tmp_path / "m.onnx", print_fn=lambda s: None)
    assert report["max_abs_diff"] < 1e-3
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["network"]["name"] == name and meta["roi"] == list(roi)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sizes = [roi, tuple(r * 2 for r in roi)] if dynamic else [roi]
    for size in sizes:   # dynamic spatial axes: another multiple of the divisor runs too
        shape = (1, 4, *size)
        out = sess.run(None, {"image": rng.normal(size=shape).astype(np.float32)})[0]
        assert out.shape == (1, 3, *shape[2:]) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_exports_are_verified(exported, tmp_path, precision):
    # A trained model: a random one sits at p ≈ 0.5, where any rounding flips masks.
    ck = exported[0] / "run" / "fold_0" / "checkpoints" / "final.pt"
    lines: list[str] = []
    report = export_onnx([ck], tmp_path / "m.onnx", precision=precision, print_fn=lines.append,
                         calibration=exported[1] if precision == "int8" else None)
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["precision"] == precision
    if precision == "int8":
        assert meta["int8_calibration"] == str(exported[1])   # the training data
    assert precision in lines[0] and report["max_abs_diff"] is not None
    import onnx
    graph = onnx.load(tmp_path / "m.onnx").graph
    ops = {n.op_type for n in graph.node}
    if precision == "int8":
        assert "QuantizeLinear" in ops
    else:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    import medseg.export as ex
    ck = checkpoint(tmp_path, "unet3d", {"filters": [8, 16, 32]}, (16, 16, 16))
    monkeypatch.setitem(ex.TOLERANCE, "fp32", (0.0, 1.01))
    with pytest.raises(MedsegError, match="verification failed"):
        export_onnx([ck], tmp_path / "m.onnx", print_fn=lambda s: None)
    assert not (tmp_path / "m.onnx").exists()


def test_numpy_helpers():
    up = resample_linear(np.broadcast_to(np.arange(4.0), (2, 2, 4)).copy(), (1, 1, 0.5), (2, 2, 7))
    np.testing.assert_allclose(up[0, 0], [0, 0.5, 1, 1.5, 2, 2.5, 3])
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(11, 4, 0.5) == [0, 2, 4, 6, 7]
    assert window_starts(3, 4, 0.5) == [0]


@pytest.fixture(scope="module")
def exported(_pristine, tmp_path_factory):
    base = tmp_path_factory.mktemp("exported")
    # Long enough that the model is confident (probabilities near 0.5 would make
    # mask agreement a coin toss rather than a test of the runtime).
    run, root = tiny_cv_run(_pristine, base, 2, ["train.epochs=30", "train.iters_per_epoch=4",
                                                 "train.val_every=30"], only=[0])
    assert main(["export", "--model", str(run), "--out", str(base / "m.onnx")]) == 0
    return base, root


def test_metadata_describes_the_model(exported):
    base, _ = exported
    meta = read_metadata(base / "m.onnx")
    assert meta["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert meta["spacing"] == [6, 6, 6] and meta["roi"] == [16, 16, 16] and meta["folds"] == 1
    assert meta["label_convention"] == "brats2023" and meta["label_values"]["et"] == 3
    assert set(meta["cv_scores"]) == {"TC", "WT", "ET"}
    assert "z-score" in meta["normalization"]


def test_edge_masks_equal_pytorch_masks(exported, tmp_path):
    # On the tiny 6 mm grid a region is 50-700 voxels, so one voxel moves a case's
    # Dice by up to 2 %: the ≥ 0.99 criterion is applied to each region pooled over
    # the cases (every voxel counted once), and each case must reach 0.95.
    base, root = exported
    edge = EdgePredictor(base / "m.onnx")
    torch_pred = Predictor(resolve_checkpoints([base / "run"]), amp=False)
    inter, total = np.zeros(3), np.zeros(3)
    for case in discover(root).cases:
        a, ref = edge.labels(case.images)
        b, _ = torch_pred.labels(case.images, "brats2023")
        assert a.shape == ref.shape[:3]
        ra, rb = labels_to_regions(a, "brats2023"), labels_to_regions(b, "brats2023")
        for i in range(3):
            assert dice(ra[i], rb[i]) >= 0.95, (case.case_id, i, dice(ra[i], rb[i]))
            inter[i] += np.logical_and(ra[i], rb[i]).sum()
            total[i] += ra[i].sum() + rb[i].sum()
    assert (total[:2] > 1000).all(), "the tiny model should predict tumour"
    pooled = 2 * inter / np.maximum(total, 1)
    assert (pooled[total > 0] >= 0.99).all(), pooled


_BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'monai', 'torchvision'):
            raise ImportError('blocked for the edge test: ' + name)
sys.meta_path.insert(0, Block())
from medseg.cli import main
rc = main(sys.argv[1:])
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'monai')]
print('IMPORTED', bad)
sys.exit(rc)
"""


def test_edge_runtime_never_imports_torch_or_monai(exported, tmp_path):
    base, root = exported
    out = tmp_path / "masks"
    res = subprocess.run([sys.executable, "-c", _BLOCK, "predict", "--engine", "onnx", "--model",
                          str(base / "m.onnx"), "--input", str(root), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORTED []" in res.stdout
    cases = discover(root).cases
    for c in cases:
        mask = nib.load(out / f"{c.case_id}.nii.gz")
        ref = nib.load(c.images[0])
        assert mask.shape == ref.shape
        np.testing.assert_array_equal(mask.affine, ref.affine)
