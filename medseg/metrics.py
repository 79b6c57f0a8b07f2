"""Per-region segmentation metrics with the BraTS conventions, written down.

For each region (TC, WT, ET) of one case, from boolean masks on the same grid:

- **Dice** = 2|P∩R| / (|P|+|R|).
- **HD95** (mm): surfaces are the mask voxels removed by one binary erosion
  (6-connectivity, MONAI `get_mask_edges`); distances are Euclidean in mm from
  the voxel spacing (MONAI `get_surface_distance`). The distances of both
  directions (pred→ref and ref→pred) are **pooled** and their 95th percentile
  taken, as the official BraTS evaluation does (MedPy's `hd95`). MONAI's
  `HausdorffDistanceMetric` instead takes the larger of the two directed 95th
  percentiles; `directed_max=True` gives that variant (always ≥ pooled).
- **Hausdorff**: the maximum of all those distances.
- Empty masks: both empty → Dice 1, HD95 0, Hausdorff 0 (the tumour region is
  absent and the model says so; BraTS scores this as perfect). Exactly one
  empty → Dice 0, HD95 = Hausdorff = 373.13 mm, the BraTS penalty (the
  diagonal of the 240×240×155 mm BraTS field of view).
- Sensitivity = |P∩R|/|R| (1 when R is empty), specificity =
  |¬P∩¬R|/|¬R| over the whole grid; volumes in mL.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from monai.metrics.utils import get_mask_edges, get_surface_distance

from medseg.labels import REGIONS

__all__ = ["BRATS_HD_PENALTY", "METRICS", "dice", "surface_distances", "region_metrics",
           "case_metrics"]

#: mm; sqrt(240² + 240² + 155²) = 373.13, the BraTS penalty for a missed or spurious region.
BRATS_HD_PENALTY = 373.13

METRICS = ("dice", "hd95", "hausdorff", "sensitivity", "specificity", "vol_pred_ml", "vol_ref_ml")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    p, r = int(pred.sum()), int(ref.sum())
    if p + r == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (p + r)


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface → ref, ref surface → pred).
    Both masks must be non-empty."""
    ep, er = get_mask_edges(np.asarray(pred, bool), np.asarray(ref, bool), crop=True)
    sp = np.asarray(spacing, dtype=np.float64)
    return (np.asarray(get_surface_distance(ep, er, "euclidean", sp)),
            np.asarray(get_surface_distance(er, ep, "euclidean", sp)))


def region_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   directed_max: bool = False) -> dict[str, float]:
    """All METRICS for one region: `pred`, `ref` boolean `(X, Y, Z)`, `spacing` in mm."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_p, n_r = int(pred.sum()), int(ref.sum())
    tp = int(np.logical_and(pred, ref).sum())
    neg = pred.size - n_r
    out = {
        "dice": dice(pred, ref),
        "sensitivity": tp / n_r if n_r else 1.0,
        "specificity": (pred.size - n_p - n_r + tp) / neg if neg else 1.0,
        "vol_pred_ml": n_p * voxel_ml,
        "vol_ref_ml": n_r * voxel_ml,
    }
    if n_p == 0 and n_r == 0:
        out["hd95"] = out["hausdorff"] = 0.0
    elif n_p == 0 or n_r == 0:
        out["hd95"] = out["hausdorff"] = BRATS_HD_PENALTY
    else:
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        if directed_max:
            out["hd95"] = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
        else:
            out["hd95"] = float(np.percentile(np.concatenate([d_pr, d_rp]), 95))
        out["hausdorff"] = float(max(d_pr.max(), d_rp.max()))
    return {k: out[k] for k in METRICS}


def case_metrics(pred_regions: np.ndarray, ref_regions: np.ndarray,
                 spacing: Sequence[float]) -> dict[str, dict[str, float]]:
    """`(3, X, Y, Z)` boolean TC/WT/ET stacks → {region: {metric: value}}."""
    return {r: region_metrics(pred_regions[i], ref_regions[i], spacing)
            for i, r in enumerate(REGIONS)}
