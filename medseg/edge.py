"""Torch-free edge runtime: NIfTI → mask with onnxruntime, numpy and nibabel only.

This module must never import torch or MONAI (a test runs it where importing
them fails). It reads everything it needs from the ONNX file's metadata, written
by `medseg export`: channel order, spacing, window size and overlap, threshold,
label convention, post-processing.

The path reproduces `medseg.infer.Predictor` step for step (a test holds the
masks of both engines to Dice ≥ 0.999 per label on thick-slice, LPS and 2 mm
inputs):
read → RAS (voxel reorder) → resample to the model spacing (separable linear,
MONAI's grid: `round((n - 1)·a/b + 1)` voxels sharing the first voxel centre)
→ crop to the non-zero box → z-score per channel over non-zero voxels →
Gaussian-weighted sliding window over each model's *logits* → sigmoid → mean
over models → un-crop → resample back → original orientation → threshold →
post-processing from the metadata → ET > TC > WT labels → mask on the input grid
in the input's label convention.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from medseg.data.inputs import (InputCase, case_headers, check_modalities, dicom_seg_path,
                                output_convention, run_batch, with_dicom)
from medseg.data.io import load_array, load_header, write_label_map, write_region_maps
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS, regions_to_labels
from medseg.postprocess import describe_postprocessing, postprocess
from medseg.uncertainty import CASE_SCORE, RANGE, STATISTIC, MemberStats, uncertainty_record
from medseg.viewer import viewer_paths, write_viewer_files
from medseg.volumetry import VOLUMES_CSV, case_volumetry, write_batch_volumes

__all__ = ["EdgePredictor", "edge_predict_all", "read_metadata", "resample_linear", "resampled_shape",
           "gaussian_importance", "window_starts"]

#: The metadata format this runtime reads (see medseg.export.FORMAT).
FORMAT = "medseg-onnx-2"

#: A missing modality's value after z-scoring (medseg.transforms.MISSING_FILL,
#: repeated here: this module must not import torch).
MISSING_FILL = 0.0

_RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


def read_metadata(path: str | Path) -> dict:
    """The medseg metadata of an ONNX file (values are JSON)."""
    import onnxruntime as ort
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise MedsegError(f"{path}: not a readable ONNX model ({exc})") from None
    meta = sess.get_modelmeta().custom_metadata_map
    if "medseg" not in meta:
        raise MedsegError(f"{path}: no medseg metadata; export the model with `medseg export`")
    info = json.loads(meta["medseg"])
    if info.get("format") != FORMAT:
        raise MedsegError(f"{path}: ONNX format {info.get('format')!r}, expected {FORMAT!r} (per-model "
                          "logits); re-export it with this medseg: `medseg export --model RUN --out FILE`")
    return info


def resampled_shape(shape: Sequence[int], spacing_in: Sequence[float],
                    spacing_out: Sequence[float]) -> list[int]:
    """Grid size after resampling, as MONAI's `Spacing` computes it: the first and
    last voxel centres span (n - 1)·a mm, so round((n - 1)·a/b + 1) voxels. E.g.
    155 slices at 1 mm → 2.5 mm: 63 (not round(155/2.5) = 62); 28 slices of
    5.54 mm → 1 mm: 151 (not 155, which would repeat the last slice)."""
    return [max(1, int(np.round((n - 1) * a / b + 1.0))) for n, a, b in zip(shape, spacing_in, spacing_out)]


def resample_linear(arr: np.ndarray, factors: Sequence[float], out_shape: Sequence[int]) -> np.ndarray:
    """Separable linear resampling of the last 3 axes: output voxel i samples input
    position i * factor (voxel centres aligned at index 0, edges clamped)."""
    out = arr.astype(np.float32, copy=False)
    for ax, (f, n_out) in enumerate(zip(factors, out_shape)):
        axis = out.ndim - 3 + ax
        n_in = out.shape[axis]
        pos = np.clip(np.arange(n_out, dtype=np.float64) * f, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (pos - lo).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = n_out
        w = w.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


def gaussian_importance(roi: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian window weights as MONAI's `compute_importance_map` (MONAI 1.6) builds
    them: a product of exp(-x² / 2σ²) over x centred at (n - 1) / 2, σ = 0.125 ×
    size per axis, not renormalised, floored at max(minimum, 1e-3)."""
    g = np.ones((), np.float32)
    for n in roi:
        x = np.arange(n, dtype=np.float32) - (n - 1) / 2.0
        k = np.exp(x**2 / (-2 * (sigma_scale * n) ** 2)).astype(np.float32)
        g = g[..., None] * k
    return np.maximum(g, max(float(g.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window start indices along one axis: stride roi × (1 - overlap), last flush."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


class EdgePredictor:
    """An exported medseg ONNX model → masks on each input's grid."""

    def __init__(self, model: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None, min_component_ml: float | None = None,
                 et_min_ml: float | None = None, mirror: bool = False):
        import onnxruntime as ort
        self.meta = read_metadata(model)
        self.mirror = mirror
        post = self.meta["postprocessing"]
        self.min_component_ml = float(post["min_component_ml"] if min_component_ml is None else min_component_ml)
        self.et_min_ml = float(post["et_min_ml"] if et_min_ml is None else et_min_ml)
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider") if p in available]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), opts, providers=list(wanted))
        self.input_name = self.session.get_inputs()[0].name
        self.roi = tuple(self.meta["roi"])
        self.weights = gaussian_importance(self.roi)

    # -------------------------------------------------------------- steps
    def _read(self, images: Sequence[Path], channels: Sequence[str]):
        """→ `(4, X, Y, Z)` in CHANNELS order (a missing modality all MISSING_FILL, as
        `medseg.transforms.FillMissingChannelsd` does) and the first file's header."""
        heads = case_headers(images)
        if len(heads[0].shape) == 4:      # one 4D file, channels last
            vol = np.moveaxis(load_array(images[0], heads[0]), -1, 0)
        else:
            vol = np.stack([load_array(p, h) for p, h in zip(images, heads)])
        out = np.full((len(CHANNELS), *vol.shape[1:]), MISSING_FILL, np.float32)
        for i, c in enumerate(channels):
            out[CHANNELS.index(c)] = vol[i]
        return out, heads[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        """`(4, X, Y, Z)` preprocessed → `(3, X, Y, Z)` probabilities: each model's
        window logits Gaussian-blended, then the sigmoid, then the mean over models."""
        return self._model_probs(x).mean(0)

    def _model_probs(self, x: np.ndarray) -> np.ndarray:
        """`(4, X, Y, Z)` preprocessed → `(K, 3, X, Y, Z)` probabilities of each model."""
        roi, ov = self.roi, float(self.meta["overlap"])
        pad = [(0, 0)] + [((max(r - s, 0)) // 2, max(r - s, 0) - (max(r - s, 0)) // 2)
                          for s, r in zip(x.shape[1:], roi)]
        xp = np.pad(x, pad)
        k = int(self.meta["folds"])
        acc = np.zeros((k, 3, *xp.shape[1:]), np.float32)
        norm = np.zeros(xp.shape[1:], np.float32)
        starts = [window_starts(s, r, ov) for s, r in zip(xp.shape[1:], roi)]
        bs = max(1, int(self.meta.get("sw_batch_size", 1)))
        corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
        for i in range(0, len(corners), bs):
            batch = corners[i:i + bs]
            inp = np.stack([xp[:, a:a + roi[0], b:b + roi[1], c:c + roi[2]] for a, b, c in batch])
            out = self.session.run(None, {self.input_name: inp.astype(np.float32)})[0]
            for (a, b, c), p in zip(batch, out):   # p: (K, 3, *roi) logits
                acc[..., a:a + roi[0], b:b + roi[1], c:c + roi[2]] += p * self.weights
                norm[a:a + roi[0], b:b + roi[1], c:c + roi[2]] += self.weights
        acc /= np.maximum(norm, 1e-8)
        sl = tuple(slice(lo, lo + s) for (lo, _), s in zip(pad[1:], x.shape[1:]))
        logits = acc[(slice(None), slice(None), *sl)]
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def members(self) -> int:
        """Members of one prediction: models × (8 mirror flips, or 1)."""
        return int(self.meta["folds"]) * (8 if self.mirror else 1)

    def _members(self, x: np.ndarray, stats: MemberStats | None) -> np.ndarray:
        """Mirror TTA as `medseg.infer.predict_probs`: the input flipped along each
        subset of its 3 spatial axes (8 with `mirror`, else none), each model's
        probabilities flipped back; → `(3, X, Y, Z)` mean over members, each added
        to `stats` when given."""
        flips = [c for n in range(4) for c in itertools.combinations((1, 2, 3), n)] if self.mirror else [()]
        acc, n = None, 0
        for axes in flips:
            xi = np.ascontiguousarray(np.flip(x, axes)) if axes else x
            probs = self._model_probs(xi)
            if axes:
                probs = np.flip(probs, tuple(a + 1 for a in axes))
            for p in probs:
                if stats is not None:
                    stats.add(p)
                else:
                    acc = p.copy() if acc is None else acc + p
                n += 1
        return (acc / n if stats is None else stats.mean()).astype(np.float32)

    def _prepare(self, images: Sequence[Path], channels: Sequence[str]) -> tuple[np.ndarray, tuple]:
        """→ (`(4, …)` preprocessed crop: RAS, model spacing, brain box, z-score; the
        grid facts `_restore` needs to bring maps back onto the input grid)."""
        vol, ref = self._read(images, channels)
        ornt = nib.orientations.ornt_transform(nib.io_orientation(ref.affine), _RAS)
        ras = np.stack([nib.orientations.apply_orientation(v, ornt) for v in vol])
        # Spacing of the RAS-ordered axes: permute the header zooms like the voxels.
        zooms = np.asarray(ref.header.get_zooms()[:3], np.float64)
        src_axes = np.argsort(ornt[:, 0])          # RAS axis j comes from input axis src_axes[j]
        sp_in = zooms[src_axes]
        sp_out = np.asarray(self.meta["spacing"], np.float64)
        shape_out = resampled_shape(ras.shape[1:], sp_in, sp_out)
        res = resample_linear(ras, sp_out / sp_in, shape_out)
        # As medseg.transforms.ClearResamplingNoised (NEGLIGIBLE = 1e-4 of the channel peak).
        peak = np.abs(res).reshape(res.shape[0], -1).max(1).reshape(-1, 1, 1, 1)
        res = res * (np.abs(res) >= 1e-4 * peak)
        fg = (res > 0).any(0)
        if not fg.any():
            raise DataError(f"{images[0]}: every voxel is zero; expected a skull-stripped brain")
        idx = np.argwhere(fg)
        lo, hi = idx.min(0), idx.max(0) + 1
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        x = res[(slice(None), *box)].copy()
        for c in range(x.shape[0]):
            m = x[c] != 0
            if m.any():
                mu, sd = x[c][m].mean(), x[c][m].std()
                x[c][m] = (x[c][m] - mu) / (sd if sd > 0 else 1.0)
        return x, (ref, box, res.shape[1:], sp_in, sp_out, ras.shape[1:])

    @staticmethod
    def _restore(maps: np.ndarray, grid: tuple) -> np.ndarray:
        """`(C, …)` maps on the brain box → `(C, X, Y, Z)` on the input grid: un-crop,
        linear resampling back, original orientation."""
        ref, box, shape, sp_in, sp_out, ras_shape = grid
        full = np.zeros((maps.shape[0], *shape), np.float32)
        full[(slice(None), *box)] = maps
        back = resample_linear(full, sp_in / sp_out, ras_shape)
        inv = nib.orientations.ornt_transform(_RAS, nib.io_orientation(ref.affine))
        return np.stack([nib.orientations.apply_orientation(b, inv) for b in back]).astype(np.float32)

    def probabilities(self, images: Sequence[str | Path],
                      channels: Sequence[str] = CHANNELS) -> tuple[np.ndarray, nib.Nifti1Image]:
        """→ `(3, X, Y, Z)` probabilities on the first file's grid, and its header image."""
        x, grid = self._prepare([Path(p) for p in images], channels)
        p = self._members(x, None) if self.mirror else self._run(x)
        return self._restore(p, grid), grid[0]

    def uncertainty(self, images: Sequence[str | Path], channels: Sequence[str] = CHANNELS,
                    statistics: Sequence[str] = (STATISTIC,)) -> tuple[np.ndarray, dict, nib.Nifti1Image]:
        """As `probabilities`, streaming the members (`members()`) through `MemberStats`
        → (`(3, X, Y, Z)` mean probabilities, {statistic: `(3, X, Y, Z)` map}, header
        image), all on the input grid, as `medseg.infer.Predictor.uncertainty`."""
        x, grid = self._prepare([Path(p) for p in images], channels)
        stats = MemberStats(entropy="mutual_information" in statistics)
        p = self._members(x, stats)
        maps = stats.maps(statistics)
        out = self._restore(np.concatenate([p] + [maps[s] for s in statistics]), grid)
        return out[:3], {s: out[3 * i + 3: 3 * i + 6] for i, s in enumerate(statistics)}, grid[0]

    def regions(self, probs: np.ndarray, ref: nib.Nifti1Image) -> tuple[np.ndarray, float]:
        """`(3, X, Y, Z)` probabilities → (post-processed bool TC/WT/ET, voxel volume in mL)."""
        voxel_ml = float(np.prod(ref.header.get_zooms()[:3])) / 1000.0
        return postprocess(probs > float(self.meta["threshold"]), voxel_ml,
                           self.min_component_ml, self.et_min_ml), voxel_ml

    def labels(self, images: Sequence[str | Path], convention: str | None = None,
               channels: Sequence[str] = CHANNELS) -> tuple[np.ndarray, nib.Nifti1Image]:
        """→ uint8 label map in `convention` (default: the model's) on the input grid,
        post-processed as the metadata says, and the input's header image."""
        probs, ref = self.probabilities(images, channels)
        regions, _ = self.regions(probs, ref)
        return regions_to_labels(regions, convention or self.meta["label_convention"]), ref

    def predict(self, images: Sequence[str | Path], target: str | Path, convention: str | None = None,
                channels: Sequence[str] = CHANNELS) -> np.ndarray:
        conv = convention or self.meta["label_convention"]
        labels, ref = self.labels(images, conv, channels)
        write_label_map(labels, ref, Path(target), conv,
                        source=f"medseg {self.meta.get('medseg_version', '')} onnx")
        return labels

    def predict_uncertainty(self, images: Sequence[str | Path], target: str | Path,
                            uncertainty_target: str | Path, convention: str | None = None,
                            channels: Sequence[str] = CHANNELS,
                            review_threshold: float | None = None) -> tuple[np.ndarray, dict]:
        """`predict` plus the `STATISTIC` map (4D float32, X, Y, Z, 3) at
        `uncertainty_target` → (labels, the case's ``uncertainty`` record)."""
        conv = convention or self.meta["label_convention"]
        probs, maps, ref = self.uncertainty(images, channels)
        regions, voxel_ml = self.regions(probs, ref)
        labels = regions_to_labels(regions, conv)
        source = f"medseg {self.meta.get('medseg_version', '')} onnx"
        write_label_map(labels, ref, Path(target), conv, source=source)
        write_region_maps(maps[STATISTIC], ref, Path(uncertainty_target), f"{source} uncertainty {STATISTIC}",
                          cal=RANGE[STATISTIC])
        return labels, uncertainty_record(maps[STATISTIC], regions, probs, voxel_ml, review_threshold,
                                          STATISTIC, self.members())

    def review_calibration(self) -> dict | None:
        """The review calibration recorded at export (the cv folder's ``uncertainty.json``),
        or None; an error when it was chosen for another map or score than this runtime's."""
        cal = self.meta.get("uncertainty")
        if cal and (cal.get("statistic") != STATISTIC or cal.get("case_score") != CASE_SCORE):
            raise MedsegError(f"the model's review threshold was chosen for the {cal.get('statistic')!r} map "
                              f"and the {cal.get('case_score')!r} score, this runtime scores {STATISTIC!r} and "
                              f"{CASE_SCORE!r}: pass --review-threshold, or re-export from a re-calibrated cv folder")
        return cal


def edge_predict_all(model: str | Path, cases: Sequence[InputCase], out_dir: str | Path,
                     input_root: Path | None, convention: str | None = None, overwrite: bool = False,
                     print_fn=print, min_component_ml: float | None = None,
                     et_min_ml: float | None = None, viewer_files: bool = False, mirror: bool = False,
                     uncertainty: bool = False, review_threshold: float | None = None,
                     shard: tuple[int, int] | None = None) -> list[Path]:
    """`medseg predict --engine onnx`: every case → ``out_dir/<case_id>.nii.gz`` in the
    input's label convention (or `convention`); post-processing from the metadata
    unless given. The batch rules are `medseg.data.inputs.run_batch`'s; the
    volumetry, `viewer_files` and `uncertainty` outputs are `medseg.predict.predict_all`'s
    (`uncertainty` implies `mirror`; the review threshold, unless given, is the one
    recorded at export)."""
    out_dir = Path(out_dir)
    targets = [[out_dir / f"{c.case_id}.nii.gz"]
               + ([out_dir / f"{c.case_id}_uncertainty.nii.gz"] if uncertainty else [])
               + dicom_seg_path(out_dir, c)
               + (viewer_paths(out_dir, c.case_id) if viewer_files else [])
               for c in cases]
    pred = EdgePredictor(model, min_component_ml=min_component_ml, et_min_ml=et_min_ml,
                         mirror=mirror or uncertainty)
    if uncertainty and review_threshold is None:
        cal = pred.review_calibration()
        review_threshold = None if cal is None else float(cal["threshold"])
        print_fn(f"review threshold {review_threshold:.4g} from the model's metadata ({cal.get('chosen_on', '')})"
                 if cal else "no review threshold in the model's metadata: cases are scored but none is "
                 "flagged (pass --review-threshold)")
        if cal and cal.get("members") and int(cal["members"]) != pred.members():
            print_fn(f"note: chosen with {cal['members']} members per case, predicting with {pred.members()}: "
                     "an ensemble's scores are not on the same scale (README: Uncertainty)")
    check_modalities(cases, pred.meta, str(model))
    conv, why = output_convention(cases, convention, pred.meta["label_convention"])
    print_fn(f"labels: {conv} (from {why})")
    post = describe_postprocessing(pred.min_component_ml, pred.et_min_ml)
    run = {"label_convention": conv, "convention_source": why, "engine": "onnx",
           "model": [str(model)], "model_label_convention": pred.meta["label_convention"],
           "postprocessing": post, "min_component_ml": pred.min_component_ml,
           "et_min_ml": pred.et_min_ml, "mirror_tta": pred.mirror,
           "uncertainty": STATISTIC if uncertainty else None, "review_threshold": review_threshold}

    def one(case: InputCase, outs: list[Path]) -> dict:
        extra = {}
        if uncertainty:
            labels, extra["uncertainty"] = pred.predict_uncertainty(
                case.images, outs[0], out_dir / f"{case.case_id}_uncertainty.nii.gz", conv, case.channels,
                review_threshold)
            if extra["uncertainty"]["review"]:
                print_fn(f"{case.case_id}: review (uncertainty {extra['uncertainty']['case_score']:.4g} "
                         f">= {review_threshold:.4g})")
        else:
            labels = pred.predict(case.images, outs[0], conv, case.channels)
        affine = load_header(outs[0]).affine        # the grid as viewers read the mask
        if viewer_files:
            write_viewer_files(labels, affine, conv, outs[-2:])
        return {"volumes": case_volumetry(labels, affine, conv, str(outs[0])), **extra}

    described = f"{pred.meta['network']['name']}, {Path(model).name}"
    res = run_batch(cases, out_dir, input_root, targets, overwrite, run,
                    with_dicom(one, out_dir, conv, described, "onnx"), print_fn, shard=shard)
    if shard is None:       # a shard's volumes: in its manifest; the gathering run writes the CSV
        write_batch_volumes(out_dir, [(c.case_id, t[0]) for c, t in zip(cases, targets)], conv)
    skipped = f" ({res['skipped']} already there)" if res["skipped"] else ""
    tta = f", mirror TTA ({pred.members()} members)" if pred.mirror else ""
    print_fn(f"{res['predicted']} masks in {res['seconds']:.1f} s{skipped} with onnxruntime "
             f"({', '.join(pred.session.get_providers())}){tta}; labels {conv}; post-processing: {post}")
    if uncertainty:
        print_fn(f"uncertainty ({STATISTIC}): <case>_uncertainty.nii.gz; scores and review flags in "
                 "predictions.json")
    print_fn(f"volumes: {out_dir / VOLUMES_CSV}" + ("; viewer files: <case>.seg.nrrd (3D Slicer), "
                                                    "<case>.itksnap.txt (ITK-SNAP)" if viewer_files else ""))
    return [t[0] for t in targets]
