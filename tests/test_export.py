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
from medseg.edge import EdgePredictor, read_metadata
from medseg.errors import MedsegError
from medseg.export import export_onnx
from medseg.infer import Predictor
from medseg.metrics import dice
from medseg.models import build_model
from medseg.pipeline import resample_linear, resampled_shape, window_starts
from medseg.predict import resolve_checkpoints

from conftest import oblique_case, reoriented_case, tiny_cv_run

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
    assert meta["network"]["name"] == name and meta["pipeline"]["roi"] == list(roi)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sizes = [roi, tuple(r * 2 for r in roi)] if dynamic else [roi]
    for size in sizes:   # dynamic spatial axes: another multiple of the divisor runs too
        shape = (1, 4, *size)
        out = sess.run(None, {"image": rng.normal(size=shape).astype(np.float32)})[0]
        assert out.shape == (1, 1, 3, *shape[2:])      # (B, K folds, regions, …) logits


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
    spec = meta["pipeline"]
    assert spec["spacing"] == [6, 6, 6] and spec["roi"] == [16, 16, 16] and meta["folds"] == 1
    assert meta["label_convention"] == spec["label_convention"] == "brats2023" and meta["label_values"]["et"] == 3
    assert set(meta["cv_scores"]) == {"TC", "WT", "ET"}
    assert "z-score" in spec["normalization"]
    # export copies the checkpoint's spec unchanged (post-processing: export's own options)
    ckpt = torch.load(resolve_checkpoints([base / "run"])[0], weights_only=True)
    assert {k: v for k, v in spec.items() if k not in ("min_component_ml", "et_min_ml")} == \
        {k: v for k, v in ckpt["meta"]["pipeline"].items() if k not in ("min_component_ml", "et_min_ml")}
    # no value is stored twice: the spec is the only place of the pipeline's values
    assert not {"spacing", "roi", "overlap", "threshold", "normalization", "postprocessing"} & set(meta)


@pytest.fixture(scope="module")
def geometries(exported, tmp_path_factory):
    """Cases the model never saw, on grids unlike its training data's: a synthetic
    case at 2 mm (120×120×78), and tiny cases re-oriented to LPS, PIR, and with
    every other slice dropped (12 mm thick slices, stored LPS), and oblique poses (the
    same voxels under an affine rotated 15°/10°, 30°, and thick oblique slices)."""
    from medseg.data.synth import synthesize
    base = tmp_path_factory.mktemp("geometries")
    synthesize(base / "two_mm", 1, "brats2023", seed=7, shape=(120, 120, 78), geometry_variation=False)
    out = {"2mm": discover(base / "two_mm").cases[0].images}
    case = sorted(p for p in exported[1].iterdir() if p.is_dir())[1]
    for name, codes, zoom in (("lps", ("L", "P", "S"), 1), ("pir", ("P", "I", "R"), 1),
                              ("thick_lps", ("L", "P", "S"), 2)):
        folder = reoriented_case(case, base / name / case.name, codes, zoom)
        out[name] = discover(folder.parent).cases[0].images
    for name, angles, zoom in (("oblique_15_10", (15, 10, 0), 1), ("oblique_30", (0, 0, 30), 1),
                               ("thick_oblique", (20, 0, 10), 2)):
        folder = oblique_case(case, base / name / case.name, angles, zoom)
        out[name] = discover(folder.parent).cases[0].images
    return out


@pytest.mark.parametrize("post", [{}, {"min_component_ml": 2.0, "et_min_ml": 1e6}],
                         ids=["no-postprocessing", "components-and-et-relabelling"])
def test_edge_masks_equal_pytorch_masks(exported, geometries, tmp_path, post):
    # The two engines must give the same masks (Dice ≥ 0.9999 per label) wherever
    # the input's grid differs from the model's, oblique included: reading,
    # preprocessing, blending and post-processing are one implementation
    # (medseg.pipeline, medseg.engine); only the window logits differ (~1e-6).
    base, _ = exported
    onnx = base / "m.onnx"
    if post:
        onnx = tmp_path / "post.onnx"
        assert main(["export", "--model", str(base / "run"), "--out", str(onnx),
                     "--min-component-ml", str(post["min_component_ml"]),
                     "--et-min-ml", str(post["et_min_ml"])]) == 0
    edge = EdgePredictor(onnx)
    meta = read_metadata(onnx)["pipeline"]
    torch_pred = Predictor(resolve_checkpoints([base / "run"]), amp=False,
                           min_component_ml=meta["min_component_ml"], et_min_ml=meta["et_min_ml"])
    predicted = 0
    for name, images in geometries.items():
        a, ref = edge.labels(images, "brats2021")
        b, _ = torch_pred.labels(images, "brats2021")
        assert a.shape == ref.shape[:3] == b.shape, name
        for label in (1, 2, 4):
            x, y = a == label, b == label
            if x.any() or y.any():
                assert dice(x, y) >= 0.9999, (name, label, dice(x, y), int(x.sum()), int(y.sum()))
        predicted += int((b > 0).sum())
        if post:
            assert not (a == 4).any()           # every ET relabelled as necrosis
    assert predicted > 1000, "the tiny model should predict tumour"


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow` (masks agree on every grid in the default suite)
def test_engines_agree_on_uncertainty_on_any_grid(exported, geometries):
    """Mirror TTA members through both engines: probabilities, the uncertainty map and
    the case score within 1e-4 on every grid, oblique and thick-slice included."""
    from medseg.uncertainty import STATISTIC, uncertainty_record
    base, _ = exported
    edge = EdgePredictor(base / "m.onnx", mirror=True)
    torch_pred = Predictor(resolve_checkpoints([base / "run"]), amp=False, mirror=True)
    assert edge.members() == torch_pred.members() == 8
    for name, images in geometries.items():
        p_e, m_e, ref = edge.uncertainty(images)
        p_t, m_t, _ = torch_pred.uncertainty(images)
        assert np.abs(p_e - p_t).max() < 1e-4, name
        assert np.abs(m_e[STATISTIC] - m_t[STATISTIC]).max() < 1e-4, name
        assert m_t[STATISTIC].max() > 0.01, name            # the members do disagree somewhere
        scores = []
        for eng, p, m in ((edge, p_e, m_e), (torch_pred, p_t, m_t)):
            regions, ml = eng.regions(p, ref)
            scores.append(uncertainty_record(m[STATISTIC], regions, p, ml, None)["case_score"])
        assert abs(scores[0] - scores[1]) < 1e-4, (name, scores)


def test_resampled_grid_is_monais(tmp_path):
    # Grid sizes from the examples, checked against MONAI's Spacingd itself.
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Spacingd
    assert resampled_shape([155], [1.0], [2.5]) == [63]
    assert resampled_shape([28], [5.54], [1.0]) == [151]
    for shape, zooms, target in (((20, 24, 155), (1, 1, 1), (2.5, 2.5, 2.5)),
                                 ((30, 30, 28), (1, 1, 5.54), (1, 1, 1)),
                                 ((33, 17, 9), (2, 2, 2), (2.5, 2.5, 2.5)),
                                 ((41, 40, 13), (0.9, 0.9, 6.0), (6, 6, 6))):
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.diag([*zooms, 1.0])), tmp_path / "a.nii")
        t = Compose([LoadImaged("i", image_only=True), EnsureChannelFirstd("i"),
                     Spacingd("i", pixdim=target, mode="bilinear")])
        want = list(t({"i": str(tmp_path / "a.nii")})["i"].shape[1:])
        assert resampled_shape(shape, zooms, target) == want, (shape, zooms, target)


def test_old_onnx_format_is_refused(exported, tmp_path):
    import json as _json
    import onnx
    model = onnx.load(exported[0] / "m.onnx")
    info = _json.loads(next(p.value for p in model.metadata_props if p.key == "medseg"))
    info["format"] = "medseg-onnx-1"
    onnx.helper.set_model_props(model, {"medseg": _json.dumps(info)})
    onnx.save(model, tmp_path / "old.onnx")
    with pytest.raises(MedsegError, match="re-export"):
        EdgePredictor(tmp_path / "old.onnx")


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


def test_execution_providers_and_tensorrt_options(exported, tmp_path):
    import onnxruntime as ort

    from medseg.edge import session_providers, trt_cache_dir
    base, root = exported
    onnx = base / "m.onnx"
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert session_providers("auto", [cpu]) == [cpu]
    # auto never starts TensorRT (its first run builds an engine for minutes)
    assert session_providers("auto", [trt, cuda, cpu]) == [cuda, cpu]
    chain = session_providers("tensorrt", [trt, cuda, cpu], onnx, "x", (16, 16, 16), 2, tmp_path / "c")
    name, opts = chain[0]
    assert name == trt and chain[1:] == [cuda, cpu]
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"] and opts["trt_timing_cache_enable"]
    folder = Path(opts["trt_engine_cache_path"])
    assert folder == trt_cache_dir(onnx, tmp_path / "c") and folder.is_dir()
    assert opts["trt_profile_min_shapes"] == "x:1x4x16x16x16"
    assert opts["trt_profile_max_shapes"] == opts["trt_profile_opt_shapes"] == "x:2x4x16x16x16"
    other = tmp_path / "other.onnx"
    other.write_bytes(onnx.read_bytes() + b"\0")
    assert trt_cache_dir(other, tmp_path / "c").name != folder.name      # one folder per model content
    with pytest.raises(MedsegError, match="onnxruntime-gpu"):
        session_providers("tensorrt", [cpu], onnx)
    if trt not in ort.get_available_providers():
        # this machine: a clear reason, not onnxruntime's silent fall-back to the CPU
        with pytest.raises(MedsegError, match="TensorRT"):
            EdgePredictor(onnx, provider="tensorrt")
    assert EdgePredictor(onnx, provider="cpu").provider == cpu
    case = next(p for p in sorted(root.rglob("*")) if p.is_dir() and list(p.glob("*.nii.gz")))
    code = main(["predict", "--model", str(base / "run"), "--input", str(case.parent),
                 "--out", str(tmp_path / "o"), "--provider", "tensorrt"])
    assert code != 0 and not (tmp_path / "o").exists()
