"""`medseg export`: checkpoints → one ONNX file that describes itself, verified.

Precision: fp32 (default), fp16 (weights and compute; fp32 inputs and
outputs) or static INT8 (QDQ, per-channel weights, calibrated on patches of the
training data given with `calibration`, else on synthetic brain patches at the
model's spacing), each verified against fp32 PyTorch with
its own tolerance (`TOLERANCE`).

The graph maps `(B, 4, D, H, W)` z-scored images (CHANNELS order) to
`(B, K, 3, D, H, W)` TC/WT/ET **logits** of the K fold checkpoints (one file,
one run). The consumer blends each model's window logits, applies the sigmoid
and averages the K probability maps, as `medseg.infer.predict_probs` does. Spatial
axes are dynamic (multiples of the network's size divisor). The medseg
metadata (JSON under the key ``medseg``) holds what a torch-free consumer
needs: channels, normalisation, spacing, window size and overlap, threshold,
label convention and region → label mapping, post-processing, medseg version
and, when exported from a cv folder, its cross-validation scores and the review
threshold of `predict --uncertainty` (``uncertainty.json``).

Verification at export: onnxruntime and PyTorch run the same synthetic brain
patch; the maximum absolute probability difference and the mask Dice per region
(voxel agreement for regions under 100 voxels) are reported, and the export fails (no file written) when out of tolerance.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from medseg import __version__
from medseg.data.io import atomic_path
from medseg.data.synth import FOV_MM, render_case
from medseg.errors import MedsegError
from medseg.engine import ensemble_problem, with_spec
from medseg.infer import load_model
from medseg.labels import CHANNELS, get_convention, get_task
from medseg.metrics import dice
from medseg.models import size_divisor
from medseg.pipeline import PipelineSpec, preprocess, read_case, zscore
from medseg.uncertainty import CALIBRATION

__all__ = ["LogitStack", "export_onnx", "verification_patch", "calibration_patches",
           "TOLERANCE"]

#: Per precision: largest accepted |ORT - torch| probability difference, and the
#: smallest mask Dice per region (INT8 rounds activations: judged on the masks).
TOLERANCE = {"fp32": (1e-3, 0.99), "fp16": (2e-2, 0.98), "int8": (1.0, 0.90)}

#: Metadata format. 3: the checkpoint's pipeline spec under ``pipeline`` (every
#: preprocessing and inference value); 2: logits per model with the values as
#: separate keys (still read); 1 was averaged probabilities.
FORMAT = "medseg-onnx-3"


class _Calibration:
    """onnxruntime CalibrationDataReader over z-scored synthetic brain patches."""

    def __init__(self, patches: list[np.ndarray]):
        self.it = iter([{"image": p} for p in patches])

    def get_next(self):
        return next(self.it, None)


def calibration_patches(data_root: str | Path, meta: dict, n_cases: int = 8) -> list[np.ndarray]:
    """`(1, 4, *roi)` patches from the first `n_cases` cases of a data folder (e.g. the
    training data), through medseg's own preprocessing, centred on the brain box."""
    from medseg.data.discover import discover
    ds = discover(data_root)
    spec = PipelineSpec.from_meta(meta)
    roi = np.asarray(spec.roi)
    out = []
    for case in ds.cases[:n_cases]:
        present = [ch for ch in ds.layout.channels if ch not in case.missing]
        vol, ref = read_case(case.images, present, spec.missing_fill)
        img, _, _ = preprocess(vol, ref.affine, spec, source=str(case.images[0]))
        patch = np.zeros((4, *roi), np.float32)
        lo = np.maximum((np.array(img.shape[1:]) - roi) // 2, 0)
        crop = img[(slice(None), *(slice(a, a + r) for a, r in zip(lo, roi)))]
        patch[(slice(None), *(slice(0, s) for s in crop.shape[1:]))] = crop
        out.append(patch[None])
    if not out:
        raise MedsegError(f"--calibration {data_root}: no cases found")
    return out


def _convert(data: bytes, precision: str, meta: dict, calibration: list[np.ndarray] | None = None,
             n_calib: int = 8) -> bytes:
    """fp32 ONNX bytes → fp16 (weights and compute, fp32 inputs/outputs kept) or
    static INT8 (QDQ, per-channel weights, calibrated on `calibration` patches, else
    on synthetic brain patches)."""
    import onnx
    if precision == "fp32":
        return data
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        return convert_float_to_float16(onnx.load_from_string(data), keep_io_types=True).SerializeToString()
    if precision == "int8":
        import tempfile
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(data)
            patches = calibration or [verification_patch(meta, 100 + i) for i in range(n_calib)]
            quantize_static(str(src), str(dst), _Calibration(patches),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
            return dst.read_bytes()
    raise MedsegError(f"precision {precision!r}; expected fp32, fp16 or int8")


class LogitStack(nn.Module):
    """The fold models side by side: `(B, 4, …)` → `(B, K, 3, …)` logits of each of the
    K `models`. Logits, not probabilities: the PyTorch path blends each model's
    window logits and applies the sigmoid after, so a consumer that gets logits
    can do exactly the same (blended probabilities differ near the threshold)."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models], 1)


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """`(B, K, 3, …)` logits → `(B, 3, …)` mean sigmoid over the K models."""
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).mean(1)


def verification_patch(meta: dict, seed: int = 0) -> np.ndarray:
    """A `(1, 4, *roi)` z-scored patch through a synthetic brain and tumour at the
    model's spacing (a real input for the network, not noise)."""
    spec = PipelineSpec.from_meta(meta)
    spacing = np.asarray(spec.spacing, np.float64)
    shape = tuple(int(round(f / s)) for f, s in zip(FOV_MM, spacing))
    case = render_case(seed, 0, shape=shape, geometry_variation=False)
    img = case.images.astype(np.float32)
    wt = case.classes >= 5   # edema and tumour classes
    c = np.argwhere(wt).mean(0).astype(int) if wt.any() else np.array(shape) // 2
    roi = np.asarray(spec.roi)
    lo = np.clip(c - roi // 2, 0, np.maximum(np.array(shape) - roi, 0))
    patch = np.zeros((4, *roi), np.float32)
    sl = tuple(slice(a, a + r) for a, r in zip(lo, roi))
    crop = img[(slice(None), *sl)]
    patch[(slice(None), *tuple(slice(0, s) for s in crop.shape[1:]))] = crop
    return zscore(patch)[None]


def _agreement(a: np.ndarray, b: np.ndarray, min_voxels: int = 100) -> float:
    """Mask Dice, or for regions of fewer than `min_voxels` in both masks (where one
    voxel moves Dice by several %) the fraction of voxels on which they agree."""
    if (a | b).sum() >= min_voxels:
        return dice(a, b)
    return 1.0 - float((a ^ b).sum()) / a.size


def _cv_scores(model_dir: Path | None) -> dict | None:
    """The out-of-fold scores of a cv folder (``cv_summary.json``) or of the recipe that
    trained a final distilled student (``oof_summary.json``, `medseg.distill`)."""
    found = [model_dir / n for n in ("cv_summary.json", "oof_summary.json")] if model_dir is not None else []
    found = [f for f in found if f.is_file()]
    if not found:
        return None
    s = json.loads(found[0].read_text())
    # Scores mean nothing without their rule set: each region names it (a summary
    # without "rules" predates rule sets and was scored under brats21).
    rules = s.get("rules", "brats21")
    return {r: {"rules": rules, **{m: s["overall"][r][m]["mean"] for m in
                                   ("dice", "hd95", "lesion_dice", "lesion_hd95")
                                   if m in s["overall"][r]}} for r in s["overall"]}


#: Written by benchmarks/student_inference.py: the cheapest overlap / TTA that keeps the accuracy.
INFERENCE_CHOICE = "inference_choice.json"


def _inference_choice(model_dir: Path | None) -> dict | None:
    if model_dir is None or not (model_dir / INFERENCE_CHOICE).is_file():
        return None
    choice = json.loads((model_dir / INFERENCE_CHOICE).read_text())
    if not isinstance(choice, dict) or not 0 <= float(choice.get("overlap", -1)) < 1:
        raise MedsegError(f"{model_dir / INFERENCE_CHOICE}: expected {{'overlap': 0..1, ...}} as "
                          "benchmarks/student_inference.py writes it; remove the file or run it again")
    return choice


def _review_calibration(model_dir: Path | None) -> dict | None:
    """The cv folder's review threshold (``uncertainty.json``), for `predict --uncertainty`."""
    if model_dir is None or not (model_dir / CALIBRATION).is_file():
        return None
    cal = json.loads((model_dir / CALIBRATION).read_text())
    return {k: cal.get(k) for k in ("threshold", "statistic", "case_score", "level", "members", "chosen_on")}


def export_onnx(checkpoints: Sequence[Path], out: str | Path, opset: int = 17,
                model_dir: Path | None = None, et_min_ml: float = 0.0, min_component_ml: float = 0.0,
                verify: bool = True, precision: str = "fp32",
                calibration: str | Path | None = None, overlap: float | None = None,
                print_fn=print) -> dict:
    """Export the fold ensemble of `checkpoints` to `out`; returns the verification report.
    `overlap`: the sliding-window overlap of the exported spec (default: the one chosen in
    `model_dir`'s ``inference_choice.json``, `benchmarks/student_inference.py`, else the
    checkpoint's)."""
    out = Path(out)
    loaded = [load_model(p, "cpu") for p in checkpoints]
    models = [m.float().eval() for m, _ in loaded]
    metas = [with_spec(m, str(p)) for (_, m), p in zip(loaded, checkpoints)]
    problem = ensemble_problem(metas, [str(p) for p in checkpoints])
    if problem:
        raise MedsegError(problem)
    meta = metas[0]
    choice = _inference_choice(model_dir)
    if overlap is None and choice is not None:
        overlap = float(choice["overlap"])
        print_fn(f"window overlap {overlap} ({INFERENCE_CHOICE} in {model_dir}: {choice['chosen_on']})")
    spec = PipelineSpec.from_dict(meta["pipeline"]).replace(min_component_ml=min_component_ml, et_min_ml=et_min_ml,
                                                            overlap=overlap)
    net = LogitStack(models).eval()
    x = torch.from_numpy(verification_patch(meta))
    if float(meta.get("modality_dropout", 0.0)) > 0:
        # a model that accepts missing modalities is also verified on a case without
        # two of them (a missing-aware network reads that from its input in the graph)
        blank = x.clone()
        blank[:, [CHANNELS.index("t1ce"), CHANNELS.index("t2")]] = spec.missing_fill
        x = torch.cat([x, blank])
    conv = get_convention(meta["label_convention"])
    task = get_task(spec.task)
    info = {
        "format": FORMAT,
        "medseg_version": __version__,
        "input": "(B, 4, D, H, W) float32: the window of a case brought into the model's space as "
                 "'pipeline' says (medseg.pipeline.preprocess)",
        "output": f"(B, K, {len(task.outputs)}, D, H, W) float32 logits for 'regions' of each of the "
                  "K = 'folds' models",
        "pipeline": spec.to_dict(),
        "channels": list(CHANNELS), "regions": list(task.outputs), "task": task.to_dict(),
        "size_divisor": size_divisor(meta["network"]["name"], **meta["network"]["args"]),
        "label_convention": conv.name, "region_labels": conv.region_labels(task),
        "labels_from_regions": "painted in this order, later wins: " + ", ".join(
            f"{r} → {c} ({conv.value(c)})" for r, c in task.paint),
        "label_values": {c.lower(): v for c, v in
                         (("ED", conv.ed), ("NCR", conv.ncr), ("ET", conv.et), ("RC", conv.value("RC")),
                          ("CC", conv.value("CC"))) if v is not None},
        "network": meta["network"], "folds": len(checkpoints),
        "modality_dropout": float(meta.get("modality_dropout", 0.0)),
        "input_subsets": meta.get("input_subsets", "all four: " + ", ".join(CHANNELS)),
        "missing_modality_fill": "a missing modality is a channel of 0 after z-scoring (its mean); "
                                 "accepted only when modality_dropout > 0",
        "opset": opset, "precision": precision, "cv_scores": _cv_scores(model_dir),
        "uncertainty": _review_calibration(model_dir),
        # a distilled student says so: its teacher (run, folds, checkpoint checksums, network,
        # out-of-fold scores) and the target blend it learnt (`medseg distill`); None otherwise
        # how the overlap (and whether mirror TTA pays) was chosen, with its measurements
        "inference_choice": choice,
        "student": ({k: v for k, v in meta["distill"].items() if k != "outputs"}
                    if meta.get("distill") else None),
    }
    if precision not in TOLERANCE:
        raise MedsegError(f"precision {precision!r}; expected one of {', '.join(TOLERANCE)}")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (x,), buf, input_names=["image"], output_names=["logits"],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={"image": {0: "batch", 2: "d", 3: "h", 4: "w"},
                                            "logits": {0: "batch", 3: "d", 4: "h", 5: "w"}})
        except Exception as exc:  # noqa: BLE001 - exporter errors are many and internal
            raise MedsegError(f"{meta['network']['name']}: ONNX export failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    import onnx
    calib = calibration_patches(calibration, meta) if calibration and precision == "int8" else None
    info["int8_calibration"] = (str(calibration) if calib else "synthetic brain patches") \
        if precision == "int8" else None
    model = onnx.load_from_string(_convert(buf.getvalue(), precision, meta, calib))
    onnx.helper.set_model_props(model, {"medseg": json.dumps(info)})
    data = model.SerializeToString()
    report = {"max_abs_diff": None, "dice": None}
    if verify:
        import onnxruntime as ort
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = _probabilities(sess.run(None, {"image": x.numpy()})[0])
        with torch.no_grad():
            want = _probabilities(net(x).numpy())
        diff = float(np.abs(got - want).max())
        thr = spec.threshold
        d = {r: _agreement(got[:, i] > thr, want[:, i] > thr) for i, r in enumerate(task.outputs)}
        report = {"max_abs_diff": diff, "dice": d}
        max_diff, min_dice = TOLERANCE[precision]
        what = f"{tuple(x.shape[1:])} synthetic patch" + (", with all modalities and without t1ce, t2"
                                                          if len(x) > 1 else "")
        print_fn(f"verification ({precision} onnxruntime vs fp32 torch, {what}): max |Δp| "
                 f"{diff:.2e}; mask Dice " + ", ".join(f"{r} {v:.4f}" for r, v in d.items()))
        if diff > max_diff or min(d.values()) < min_dice:
            raise MedsegError(f"ONNX verification failed: max |Δp| {diff:.2e} (limit {max_diff}) or "
                              f"mask Dice {min(d.values()):.4f} (limit {min_dice}); {out} not written")
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return report
