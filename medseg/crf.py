"""Dense-CRF post-processing of region probabilities (`medseg predict --crf`).

A 3D fully connected CRF (Krähenbühl & Koltun, NIPS 2011; extended to multi-modal
3D MRI by Kamnitsas et al., ISLES 2015 / MedIA 2017) sharpens the network's
probabilities along image edges: voxels that look alike in all four modalities and
lie near each other are pushed towards the same class. It runs on the model grid,
on the mean probabilities of the members, before they are restored onto the input
grid.

The inference is Philipp Krähenbühl's C++ code (permutohedral-lattice mean field)
through the ``pydensecrf2`` package (import name ``pydensecrf``), an optional
dependency: ``pip install 'medseg[crf]'``. This module imports numpy only — never
torch — so the ONNX edge runtime can use it.

Label models (`CRFParams.label_model`). The three sigmoid regions are nested
(ET ⊂ TC ⊂ WT, `medseg.labels`); their chain, and so the number of labels, is read
from the label conventions (`region_chain`), not written here.

- ``regions`` (default): one binary CRF per region (out / in, unaries −log(1 − p)
  and −log p), all on the same kernels (their lattices are built once); the regions
  are then made nested upwards, TC := max(TC, ET), WT := max(WT, TC), the precedence
  of `medseg.labels.regions_to_labels` (a voxel in ET is ET even where the network
  left it out of TC or WT). Each region keeps the decision the pipeline makes
  (p > threshold), only moved to the image's edges.
- ``classes``: the nested regions (made nested upwards first) become exclusive
  classes — background = 1 − WT, WT − TC (edema), TC − ET (necrosis), ET — in one
  multi-class CRF, and come back as sums (WT = 1 − Q_bg, TC = Q_NCR + Q_ET,
  ET = Q_ET). Nested by construction, but the CRF then decides by the largest class,
  not by p > 0.5 per region: where the network is unsure of ET, TC's mass is split
  between NCR and ET and both can lose to edema (on the demo model TC Dice fell
  0.44 → 0.31, two cases to 0, while ``regions`` raised all three regions). Kept as
  an option.

Kernels (each a Potts term, weights in nats against the unary −log Q):
- appearance: exp(−|Δp|²/2θα² − Σ_c |ΔI_c|²/2θβ²), p in mm, I the z-scored
  channels (T1, T1ce, T2, FLAIR);
- smoothness: exp(−|Δp|²/2θγ²), p in mm.

Only the bounding box of the voxels where some region probability exceeds
`box_probability`, grown by `margin_mm`, is processed; outside it the input is
returned bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medseg.errors import MedsegError
from medseg.labels import CONVENTIONS, REGIONS

__all__ = ["CRFParams", "CRF_PACKAGE", "CRF_INSTALL", "crf_available", "require_crf", "region_chain",
           "crf_classes", "regions_to_classes", "classes_to_regions", "crf_box", "dense_crf", "describe_crf",
           "nest_upwards", "LABEL_MODELS"]

#: The PyPI package that provides the dense CRF (imported as ``pydensecrf``).
CRF_PACKAGE = "pydensecrf2"
#: How a person installs it.
CRF_INSTALL = "pip install 'medseg[crf]'"

#: The label models of `CRFParams.label_model`.
LABEL_MODELS = ("regions", "classes")

#: Smallest probability fed to −log: unaries of at most −log(1e-5) ≈ 11.5 nats (a
#: probability of exactly 0 or 1 stays finite, and still outweighs the default pull).
_EPS = 1e-5


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings (JSON-ready with `to_dict`; recorded in predictions.json).

    Defaults start from the 2D literature (Krähenbühl & Koltun 2011, DeepLab: appearance
    weight 4-10 over 60-120 px and 3-13 of 255 grey levels, smoothness weight 3 over
    3 px) and 3D MRI practice (Kamnitsas et al.: appearance 5 over 5 mm, smoothness 3
    over 3 mm, 5 iterations; SimpleCRF's 3D demos: weights 3 and 2), adapted to
    z-scored 3D MR on the model grid (2.5 mm for the cpu preset):

    - `bilateral_weight` 3 and `gaussian_weight` 2: their sum, 5 nats, is about the
      unary margin of a voxel the network is 99 % sure of (log 99 = 4.6), so such a
      voxel mostly keeps its class even where the image shows no edge at all: on a
      featureless image a 16 mm lesion at p = 0.99 survives (with the 2D weights
      10 + 3 it is erased, and so is a 30 mm one); sub-regions under ~1 cm at
      p = 0.99 with no contrast can still go. Boundary voxels (p 0.5-0.95, margin
      < 3 nats) move to the image edge.
    - `bilateral_sigma_mm` 20: the appearance kernel must reach past the network's
      boundary errors (a few 2.5 mm voxels); with Kamnitsas's 5 mm (2 voxels) a
      3-voxel shift stays uncorrected. The 2D θα (60-120 px, 10-20 % of the picture)
      is long-range too: the intensity term keeps the kernel to similar tissue. A
      wider kernel is also faster (fewer lattice points).
    - `bilateral_sigma_z` 0.5: intensities are z-scores (brain mean 0, sd 1), not
      0-255 colours: the literature's 3-13 grey levels are 0.07-0.3 z when ±3 z is
      mapped to 0-255 as Kamnitsas does, i.e. about the noise. A "3" read as z would
      span the whole brain range and blind the kernel to edges. Tumour/brain contrast
      is 1-3 z in FLAIR and T1ce, voxel noise 0.1-0.3 z: 0.5 per channel (4 channels
      add up) keeps noisy voxels of one tissue together and separates tissues.
    - `gaussian_sigma_mm` 3: the literature's value (about one model voxel): removes
      isolated voxels without rounding the tumour.
    - `iterations` 5: mean field has converged (Krähenbühl: 10 iterations differ from
      5 on < 0.1 % of pixels).
    """

    bilateral_weight: float = 3.0
    bilateral_sigma_mm: float = 20.0
    bilateral_sigma_z: float = 0.5
    gaussian_weight: float = 2.0
    gaussian_sigma_mm: float = 3.0
    iterations: int = 5
    #: "regions": one binary CRF per region (in / out, unary −log p, −log(1 − p)), the
    #: regions then made nested upwards; "classes": one CRF over the exclusive classes
    #: (background, WT − TC, TC − ET, ET) and back (see the module docstring).
    label_model: str = "regions"
    #: The processed box: voxels with any region probability above this …
    box_probability: float = 0.05
    #: … grown by this margin on every side (mm).
    margin_mm: float = 10.0

    #: Allowed range of each field: (low, high, low inclusive).
    _RANGES = {
        "bilateral_weight": (0.0, 50.0, True),
        "bilateral_sigma_mm": (0.0, 200.0, False),
        "bilateral_sigma_z": (0.0, 100.0, False),
        "gaussian_weight": (0.0, 50.0, True),
        "gaussian_sigma_mm": (0.0, 200.0, False),
        "iterations": (1, 100, True),
        "box_probability": (0.0, 1.0, False),
        "margin_mm": (0.0, 1000.0, True),
    }

    def __post_init__(self):
        if self.label_model not in LABEL_MODELS:
            raise MedsegError(f"CRF parameter label_model={self.label_model!r}: expected one of "
                              f"{', '.join(LABEL_MODELS)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "label_model":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise MedsegError(f"CRF parameter {f.name}={v!r}: expected a number")
            if f.name == "iterations":
                if not float(v).is_integer():
                    raise MedsegError(f"CRF parameter iterations={v!r}: expected a whole number")
                v = int(v)
            else:
                v = float(v)
            object.__setattr__(self, f.name, v)
            lo, hi, lo_in = self._RANGES[f.name]
            if not math.isfinite(v) or v > hi or v < lo or (v == lo and not lo_in):
                raise MedsegError(f"CRF parameter {f.name}={v!r} is out of range: expected "
                                  f"{lo:g} {'≤' if lo_in else '<'} {f.name} ≤ {hi:g}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "CRF parameters") -> "CRFParams":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise MedsegError(f"{source}: unknown CRF parameter(s) {unknown}; known: {', '.join(known)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str | None) -> "CRFParams":
        """``"key=value,key=value"`` (the CLI's ``--crf-params``) over the defaults;
        empty or None → the defaults."""
        d: dict = {}
        for item in (text or "").split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key or not value.strip():
                raise MedsegError(f"--crf-params {text!r}: expected key=value pairs separated by commas, "
                                  f"found {item!r}")
            if key == "label_model":
                d[key] = value.strip()
                continue
            try:
                num = float(value)
            except ValueError:
                raise MedsegError(f"--crf-params: {key}={value.strip()!r} is not a number") from None
            d[key] = int(num) if key == "iterations" and num.is_integer() else num
        return cls.from_dict(d, "--crf-params")


# ----------------------------------------------------------------------------- library
def _import():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise MedsegError(
            f"--crf needs the dense CRF package {CRF_PACKAGE} (Krähenbühl's fully connected CRF, "
            f"imported as 'pydensecrf'), which is not installed ({e}): {CRF_INSTALL} "
            f"(or pip install {CRF_PACKAGE}; it compiles C++ on install: needs a C++ compiler such as g++)"
        ) from None
    if not hasattr(dcrf, "DenseCRF"):
        raise MedsegError(f"the installed 'pydensecrf' module has no DenseCRF: reinstall {CRF_PACKAGE} "
                          f"({CRF_INSTALL})")
    return dcrf


def crf_available() -> bool:
    """Whether the dense CRF package imports here."""
    try:
        _import()
    except MedsegError:
        return False
    return True


def require_crf() -> None:
    """Raise `MedsegError` naming the package and the install command unless it imports
    (call it before a long run, so a missing package fails at once)."""
    _import()


# ----------------------------------------------------------------------------- label model
def region_chain() -> tuple[int, ...]:
    """Indices into `REGIONS`, outermost region first (WT, TC, ET → (1, 0, 2)): the
    regions ordered by the label values they hold, each strictly inside the one before
    in every label convention. Raises if the regions are not one nested chain."""
    chains = set()
    for conv in CONVENTIONS.values():
        groups = {r: set(v) for r, v in conv.region_labels().items()}
        order = tuple(sorted(range(len(REGIONS)), key=lambda i: -len(groups[REGIONS[i]])))
        for outer, inner in zip(order, order[1:]):
            if not groups[REGIONS[inner]] < groups[REGIONS[outer]]:
                raise MedsegError(f"internal error: regions {REGIONS} are not nested in convention "
                                  f"{conv.name} ({REGIONS[inner]} ⊄ {REGIONS[outer]}); the dense CRF "
                                  "needs nested regions")
        chains.add(order)
    if len(chains) != 1:
        raise MedsegError(f"internal error: the label conventions nest the regions {REGIONS} differently")
    return chains.pop()


def crf_classes() -> list[str]:
    """Names of the exclusive classes of the CRF, background first (e.g.
    ["background", "ED", "NCR", "ET"]), from the label conventions."""
    conv = next(iter(CONVENTIONS.values()))
    groups = {r: set(v) for r, v in conv.region_labels().items()}
    names = conv.classes()
    chain = [REGIONS[i] for i in region_chain()]
    out = ["background"]
    for k, r in enumerate(chain):
        own = groups[r] - (groups[chain[k + 1]] if k + 1 < len(chain) else set())
        out.append("+".join(names[v] for v in sorted(own)))
    return out


def regions_to_classes(probs: np.ndarray) -> np.ndarray:
    """`(R, …)` region probabilities in REGIONS order → `(R + 1, …)` exclusive class
    probabilities (background, then each region minus the next one inside it), summing
    to 1. The regions are first made nested upwards (outer := max(outer, inner))."""
    chain = region_chain()
    p = np.clip(np.asarray(probs, np.float32)[list(chain)], 0.0, 1.0)
    for k in range(len(chain) - 2, -1, -1):          # innermost first: ET lifts TC, TC lifts WT
        np.maximum(p[k], p[k + 1], out=p[k])
    out = np.empty((len(chain) + 1, *p.shape[1:]), np.float32)
    out[0] = 1.0 - p[0]
    out[1:-1] = p[:-1] - p[1:]
    out[-1] = p[-1]
    return out


def nest_upwards(probs: np.ndarray) -> np.ndarray:
    """`(R, …)` region probabilities (REGIONS order) made nested: each region becomes
    the maximum of itself and the regions inside it (TC := max(TC, ET), WT := max(WT,
    TC)), the precedence of `medseg.labels.regions_to_labels`: thresholds then give the
    same label map. A new float32 array."""
    chain = region_chain()
    out = np.array(probs, np.float32, copy=True)
    for outer, inner in zip(chain[-2::-1], chain[:0:-1]):   # innermost pair first
        np.maximum(out[outer], out[inner], out=out[outer])
    return out


def classes_to_regions(q: np.ndarray) -> np.ndarray:
    """Inverse of `regions_to_classes`: `(R + 1, …)` class probabilities → `(R, …)`
    region probabilities in REGIONS order, each the sum of the classes inside it
    (nested by construction)."""
    chain = region_chain()
    q = np.asarray(q, np.float32)
    inner = np.cumsum(q[:0:-1], axis=0)[::-1]        # [Σ q1.., Σ q2.., …, q_last]
    out = np.empty((len(chain), *q.shape[1:]), np.float32)
    for k, i in enumerate(chain):
        out[i] = inner[k]
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------- CRF
def crf_box(probs: np.ndarray, params: CRFParams, spacing: Sequence[float]) -> tuple[slice, ...] | None:
    """The processed box: voxels with any region probability > `box_probability`,
    grown by `margin_mm` (at least one voxel per side while `margin_mm` > 0), clipped
    to the grid; None when no voxel qualifies."""
    hot = np.any(np.asarray(probs) > params.box_probability, axis=0)
    if not hot.any():
        return None
    box = []
    for ax, (n, sp) in enumerate(zip(hot.shape, spacing)):
        other = tuple(a for a in range(hot.ndim) if a != ax)
        idx = np.flatnonzero(hot.any(axis=other))
        m = int(math.ceil(params.margin_mm / float(sp) - 1e-9))
        box.append(slice(max(0, int(idx[0]) - m), min(n, int(idx[-1]) + 1 + m)))
    return tuple(box)


def _features(shape: Sequence[int], spacing: Sequence[float], sigma_mm: float,
              image: np.ndarray | None = None, sigma_z: float = 1.0) -> np.ndarray:
    """`(3 [+ C], N)` float32 lattice features: voxel centres in mm / σ (and channels / σ_z)."""
    axes = [np.arange(n, dtype=np.float32) * np.float32(sp / sigma_mm) for n, sp in zip(shape, spacing)]
    mesh = np.meshgrid(*axes, indexing="ij")
    feats = [m.reshape(-1) for m in mesh]
    if image is not None:
        feats += [(c / np.float32(sigma_z)).reshape(-1) for c in image.astype(np.float32, copy=False)]
    return np.ascontiguousarray(np.stack(feats), np.float32)


def dense_crf(probs: np.ndarray, image: np.ndarray, params: CRFParams | None = None, *,
              spacing: Sequence[float]) -> np.ndarray:
    """`(3, X, Y, Z)` region probabilities (REGIONS order, sigmoid outputs) and the
    `(C, X, Y, Z)` z-scored model input on the same grid, of voxel `spacing` (mm) →
    `(3, X, Y, Z)` float32 probabilities after mean-field inference of the dense CRF
    (a new array). Outside `crf_box` the input values are kept bit for bit; inside
    the regions are nested (ET ≤ TC ≤ WT)."""
    params = params or CRFParams()
    probs = np.asarray(probs)
    image = np.asarray(image)
    if probs.ndim != 4 or probs.shape[0] != len(REGIONS):
        raise MedsegError(f"dense CRF: expected region probabilities of shape ({len(REGIONS)}, X, Y, Z) for "
                          f"{REGIONS}, found {probs.shape}")
    if image.ndim != 4 or image.shape[1:] != probs.shape[1:]:
        raise MedsegError(f"dense CRF: image {image.shape} does not match the probabilities {probs.shape}: "
                          "expected (C, X, Y, Z) on the same grid (the model input)")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MedsegError(f"dense CRF: spacing {list(spacing)}: expected 3 positive values in mm")
    if not (np.all(np.isfinite(probs)) and np.all(np.isfinite(image))):
        raise MedsegError("dense CRF: the probabilities or the image hold NaN or infinite values")
    dcrf = _import()
    out = np.array(probs, dtype=np.float32, copy=True)
    box = crf_box(out, params, spacing)
    if box is None:
        return out
    sub = (slice(None), *box)
    shape = out[sub].shape[1:]
    n = int(np.prod(shape))
    p = out[sub]
    if params.label_model == "classes":
        q0 = regions_to_classes(p)
    else:                                            # one (out, in) pair per region
        q0 = np.stack([1.0 - np.clip(p, 0.0, 1.0), np.clip(p, 0.0, 1.0)], axis=1)
    n_labels = q0.shape[-4]
    crf = dcrf.DenseCRF(n, n_labels)
    if params.gaussian_weight > 0:
        crf.addPairwiseEnergy(_features(shape, spacing, params.gaussian_sigma_mm), compat=params.gaussian_weight)
    if params.bilateral_weight > 0:
        crf.addPairwiseEnergy(_features(shape, spacing, params.bilateral_sigma_mm, image[sub],
                                        params.bilateral_sigma_z), compat=params.bilateral_weight)

    def infer(q: np.ndarray) -> np.ndarray:      # the kernels' lattices are built once, reused
        crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(q, _EPS, 1.0)).reshape(n_labels, n)))
        return np.asarray(crf.inference(params.iterations), np.float32).reshape(n_labels, *shape)

    if params.label_model == "classes":
        out[sub] = classes_to_regions(infer(q0))
    else:
        res = np.stack([infer(q)[1] for q in q0])
        out[sub] = nest_upwards(res)
    return out


def describe_crf(params: CRFParams) -> str:
    """One line for logs: what `dense_crf` does with these values."""
    labels = ("binary per region " + "/".join(REGIONS) if params.label_model == "regions"
              else f"{len(crf_classes())} classes {'/'.join(crf_classes())}")
    return (f"dense CRF ({CRF_PACKAGE}, {labels}): appearance "
            f"w {params.bilateral_weight:g}, {params.bilateral_sigma_mm:g} mm, {params.bilateral_sigma_z:g} z; "
            f"smoothness w {params.gaussian_weight:g}, {params.gaussian_sigma_mm:g} mm; "
            f"{params.iterations} iterations")
