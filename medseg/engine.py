"""The one predictor interface: what both engines share (torch-free).

An engine holds a `PipelineSpec` and K models that map `(B, 4, *roi)` windows to
`(B, K, 3, *roi)` logits. Everything else — reading, preprocessing, sliding
windows and blending, mirror TTA, member statistics, restoring onto the input
grid, threshold, post-processing, labels, writing — is this class's code, run
the same way by `medseg.infer.Predictor` (PyTorch) and `medseg.edge.EdgePredictor`
(onnxruntime). A subclass supplies `_window_logits` and, for arrays that are
not numpy's, five array primitives (`_to_backend`, `_to_numpy`, `_zeros`,
`_flip`, `_sigmoid`).

`ensemble_problem` is the one rule for which checkpoints may form an ensemble,
applied by both engines and by export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from medseg.crf import CRFParams, dense_crf, describe_crf
from medseg.data.io import write_label_map, write_region_maps
from medseg.errors import MedsegError
from medseg.labels import CHANNELS, regions_to_labels
from medseg.pipeline import (PipelineSpec, gaussian_importance, mirror_flips, preprocess, read_case, restore,
                             sliding_window, voxel_spacing)
from medseg.postprocess import describe_postprocessing, postprocess
from medseg.uncertainty import RANGE, STATISTIC, MemberStats, uncertainty_record

__all__ = ["Engine", "ENSEMBLE_KEYS", "ensemble_problem", "with_spec"]

#: Model facts that must be equal across the members of an ensemble (the pipeline
#: spec covers channels, spacing, grid, roi and normalisation).
ENSEMBLE_KEYS = ("network", "pipeline", "label_convention", "modality_dropout", "input_subsets")


def with_spec(meta: dict, source: str) -> dict:
    """`meta` (checkpoint or ONNX metadata) with its ``pipeline`` spec resolved (models
    written before the spec: built from their fields, `PipelineSpec.from_meta`)."""
    return {**meta, "pipeline": PipelineSpec.from_meta(meta, source).to_dict()}


def ensemble_problem(metas: Sequence[dict], sources: Sequence[str]) -> str | None:
    """Why the models of `metas` (checkpoint or ONNX metadata, each with its
    ``pipeline`` spec resolved) cannot be averaged, or None."""
    first = metas[0]
    for meta, src in zip(metas[1:], sources[1:]):
        for key in ENSEMBLE_KEYS:
            if meta.get(key) != first.get(key):
                return (f"{src}: {key} {meta.get(key)} differs from {sources[0]} ({first.get(key)}); an "
                        "ensemble needs identical models (same network, pipeline, labels and "
                        "modality dropout): pass the folds of one cross-validation run")
    return None


class Engine:
    """K models + a pipeline spec → masks on each input's grid (see module docstring)."""

    #: "torch" or "onnx" (recorded in every output).
    engine = ""
    #: Dense-CRF settings (`medseg predict --crf`, set by `medseg.predict.open_engine`):
    #: applied to the member mean on the model grid, before `restore`; None: off.
    crf: CRFParams | None = None

    def __init__(self, spec: PipelineSpec, meta: dict, n_models: int, mirror: bool, sources: Sequence[str]):
        self.spec, self.meta, self.n_models, self.mirror = spec, meta, n_models, mirror
        self.sources = [str(s) for s in sources]
        self.weights = self._to_backend(gaussian_importance(spec.roi, spec.sigma_scale, spec.weight_floor))

    # ------------------------------------------------------------ array primitives
    def _window_logits(self, windows: list):
        """`(4, *roi)` windows → `(B, K, 3, *roi)` float32 logits of the K models."""
        raise NotImplementedError

    def _to_backend(self, x: np.ndarray):
        return x

    def _to_numpy(self, a) -> np.ndarray:
        return np.asarray(a, np.float32)

    def _zeros(self, shape: tuple):
        return np.zeros(shape, np.float32)

    def _flip(self, a, axes: tuple[int, ...]):
        return np.ascontiguousarray(np.flip(a, axes))

    def _sigmoid(self, a):
        return (1.0 / (1.0 + np.exp(-np.clip(a, -88.0, 88.0)))).astype(np.float32)   # no overflow warning

    # ------------------------------------------------------------ shared steps
    def members(self) -> int:
        """Members of one prediction: models × (8 mirror flips, or 1)."""
        return self.n_models * len(mirror_flips(self.mirror))

    def describe(self) -> str:
        return f"{self.meta['network']['name']}, {self.n_models} model(s)"

    def postprocessing(self) -> str:
        post = describe_postprocessing(self.spec.min_component_ml, self.spec.et_min_ml)
        if self.crf is None:
            return post
        return describe_crf(self.crf) + ("" if post == "none" else f", then {post}")

    def refine(self, p: np.ndarray, x: np.ndarray, grid) -> np.ndarray:
        """The `(3, …)` member mean `p` on the model grid after the dense CRF over the
        model input `x` (`crf`; unchanged when None). `grid.spacing_out`: the model
        grid's voxel size in mm, in the axis order of `x`."""
        if self.crf is None:
            return p
        return dense_crf(p, x, self.crf, spacing=tuple(grid.spacing_out))

    def prepare(self, images: Sequence[str | Path], channels: Sequence[str] = CHANNELS):
        """Files → (`(4, …)` model input as a numpy array, its `Grid`, the first file's header image)."""
        vol, ref = read_case(images, channels, self.spec.missing_fill)
        x, _, grid = preprocess(vol, ref.affine, self.spec, source=str(Path(images[0]).parent))
        return x, grid, ref

    def model_probs(self, x):
        """`(4, X, Y, Z)` backend array → `(K, 3, X, Y, Z)` probabilities of each model."""
        s = self.spec
        logits = sliding_window(x, self._window_logits, s.roi, s.overlap, s.sw_batch_size, self.weights,
                                self._zeros)
        return self._sigmoid(logits)

    def member_mean(self, x, stats: MemberStats | None = None):
        """Every member (model × mirror flip; each flip's output flipped back) of the
        backend input `x` → `(3, X, Y, Z)` mean probabilities; each member is also
        added to `stats` when given."""
        acc, n = None, 0
        for axes in mirror_flips(self.mirror):
            probs = self.model_probs(self._flip(x, axes) if axes else x)
            if axes:
                probs = self._flip(probs, tuple(a + 1 for a in axes))
            for p in probs:
                if stats is not None:      # its running sum is the same sum: not kept twice
                    stats.add(p)
                elif acc is None:
                    acc = p + 0
                else:
                    acc += p
                n += 1
        return stats.mean() if stats is not None else acc / n

    def probabilities(self, images: Sequence[str | Path],
                      channels: Sequence[str] = CHANNELS) -> tuple[np.ndarray, nib.Nifti1Image]:
        """→ `(3, X, Y, Z)` TC/WT/ET probabilities on the first file's grid, and its header image."""
        x, grid, ref = self.prepare(images, channels)
        p = self._to_numpy(self.member_mean(self._to_backend(x)))
        return restore(self.refine(p, x, grid), grid), ref

    def uncertainty(self, images: Sequence[str | Path], channels: Sequence[str] = CHANNELS,
                    statistics: Sequence[str] = (STATISTIC,)) -> tuple[np.ndarray, dict, nib.Nifti1Image]:
        """As `probabilities`, streaming the members through `MemberStats` → (mean
        probabilities, {statistic: `(3, X, Y, Z)` map}, header image), all on the input grid."""
        x, grid, ref = self.prepare(images, channels)
        stats = MemberStats(entropy="mutual_information" in statistics)
        p = self.member_mean(self._to_backend(x), stats)
        maps = stats.maps(statistics)
        stack = np.concatenate([self.refine(self._to_numpy(p), x, grid)] +
                               [self._to_numpy(maps[s]) for s in statistics])
        out = restore(stack, grid)
        r = len(self.spec.regions)
        return out[:r], {s: out[r * i + r: r * i + 2 * r] for i, s in enumerate(statistics)}, ref

    def regions(self, probs: np.ndarray, ref: nib.Nifti1Image) -> tuple[np.ndarray, float]:
        """`(3, X, Y, Z)` probabilities on `ref`'s grid → (post-processed bool TC/WT/ET, voxel mL)."""
        if probs.shape[1:] != tuple(ref.shape[:3]):
            raise MedsegError(f"internal error: restored prediction {probs.shape[1:]} != input grid "
                              f"{tuple(ref.shape[:3])}")
        voxel_ml = float(np.prod(voxel_spacing(ref.affine))) / 1000.0
        s = self.spec
        return postprocess(probs > s.threshold, voxel_ml, s.min_component_ml, s.et_min_ml), voxel_ml

    def labels(self, images: Sequence[str | Path], convention: str | None = None,
               channels: Sequence[str] = CHANNELS) -> tuple[np.ndarray, nib.Nifti1Image]:
        """→ uint8 label map in `convention` (default: the model's) on the input grid, and
        the input's header image."""
        probs, ref = self.probabilities(images, channels)
        regions, _ = self.regions(probs, ref)
        return regions_to_labels(regions, convention or self.spec.label_convention, self.spec.task), ref

    def predict_case(self, images: Sequence[str | Path], target: str | Path, convention: str | None = None,
                     channels: Sequence[str] = CHANNELS, probs_target: str | Path | None = None,
                     uncertainty_target: str | Path | None = None,
                     review_threshold: float | None = None,
                     space: Callable | None = None) -> tuple[np.ndarray, dict]:
        """Predict one case and write `target` (uint8 mask on the input grid); with
        `probs_target` the TC/WT/ET probabilities, with `uncertainty_target` the
        `STATISTIC` map (4D float32, X, Y, Z, 3) → (labels, extra record: the case's
        ``uncertainty`` record when asked). `space` (a raw study's, `InputCase.space`)
        maps the probabilities and uncertainty from the input's grid onto another
        grid (the native series') → (maps, its header image); thresholds,
        post-processing and the outputs then happen there."""
        conv = convention or self.spec.label_convention
        source = f"medseg {self.meta.get('medseg_version', '')} {self.engine}"
        extra: dict = {}
        if uncertainty_target is not None:
            probs, maps, ref = self.uncertainty(images, channels)
        else:
            (probs, ref), maps = self.probabilities(images, channels), None
        if space is not None:
            r = len(self.spec.regions)
            stack, ref = space(np.concatenate([probs] + ([maps[STATISTIC]] if maps else [])))
            probs, maps = stack[:r], ({STATISTIC: stack[r:2 * r]} if maps else None)
        regions, voxel_ml = self.regions(probs, ref)
        labels = regions_to_labels(regions, conv, self.spec.task)
        write_label_map(labels, ref, Path(target), conv, source=source)
        if probs_target is not None:
            write_region_maps(probs, ref, Path(probs_target), f"{source} probabilities", regions=self.spec.regions)
        if maps is not None:
            u = maps[STATISTIC]
            write_region_maps(u, ref, Path(uncertainty_target), f"{source} uncertainty {STATISTIC}",
                              cal=RANGE[STATISTIC], regions=self.spec.regions)
            extra["uncertainty"] = uncertainty_record(u, regions, probs, voxel_ml, review_threshold,
                                                      STATISTIC, self.members(), names=self.spec.regions)
        return labels, extra
