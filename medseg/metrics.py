"""Per-region segmentation metrics, and the engine that scores a region under a
named rule set (`medseg.scoring`).

For each region (TC, WT, ET) of one case, from boolean masks on the same grid:

- **Dice** = 2|P∩R| / (|P|+|R|).
- **IoU** (Jaccard) = |P∩R| / |P∪R| = |P∩R| / (|P|+|R|−|P∩R|), from the same voxel
  counts (for one mask pair IoU = Dice/(2−Dice)). No BraTS rule set defines IoU: it
  takes each rule set's whole-image Dice conventions for empty masks (both empty →
  1, or NaN under brats-eval; one empty, or no overlap → 0). Under the lesion-wise
  rule sets it stays this whole-image (voxel-wise) IoU: there is no lesion-wise
  IoU. `mean_iou` is a case's mean over its regions (TC, WT, ET).
- **HD95** (mm): surfaces are the mask voxels removed by one binary erosion
  (6-connectivity, MONAI `get_mask_edges`); distances are Euclidean in mm from
  the voxel spacing (MONAI `get_surface_distance`). The distances of both
  directions (pred→ref and ref→pred) are **pooled** and their 95th percentile
  taken, as MedPy's `hd95` and panoptica (the official BraTS-evaluation package)
  do. MONAI's `HausdorffDistanceMetric` instead takes the larger of the two
  directed 95th percentiles; `directed_max=True` gives that variant (always ≥
  pooled). The BraTS 2023 code takes the larger directed percentile too, but over
  DeepMind's surfels (2×2×2 corner elements weighted by area): `surfel_distances`.
- **Hausdorff**: the maximum of all those distances.
- Empty masks (`score_region` under the brats21 rules): both empty → Dice 1, IoU 1,
  HD95 0, Hausdorff 0 (the tumour region is absent and the model says so). Exactly one
  empty → Dice 0, IoU 0, HD95 = Hausdorff = 373.13 mm, the BraTS penalty (the diagonal of
  the 240×240×155 mm BraTS field of view). Other rule sets say otherwise:
  `score_region` reads them from a `medseg.scoring.RuleSet`.
- Sensitivity = |P∩R|/|R| (1 when R is empty), specificity =
  |¬P∩¬R|/|¬R| over the whole grid; volumes in mL.

Lesion-wise scores (`lesion_scores`) split a region into connected components and
match them as the rule set says (BraTS 2023 dilation merge, or panoptica's
one-to-one Dice matching); see `medseg.scoring.LesionRules`. Connected components,
dilation and the assignment come from scipy; surfaces and distances from MONAI.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from monai.metrics.utils import get_code_to_measure_table, get_mask_edges, get_surface_distance
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from medseg.labels import REGIONS

__all__ = ["BRATS_HD_PENALTY", "METRICS", "dice", "iou", "mean_iou", "surface_distances",
           "surfel_distances", "lesion_scores", "score_region", "score_case"]

#: mm; sqrt(240² + 240² + 155²) = 373.13, the BraTS penalty for a missed or spurious region.
BRATS_HD_PENALTY = 373.13

METRICS = ("dice", "iou", "hd95", "hausdorff", "sensitivity", "specificity", "vol_pred_ml", "vol_ref_ml")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    p, r = int(pred.sum()), int(ref.sum())
    if p + r == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (p + r)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """IoU (Jaccard) of two boolean masks, |P∩R| / |P∪R|; 1.0 when both are empty
    (the convention of `dice`)."""
    p, r = int(pred.sum()), int(ref.sum())
    if p + r == 0:
        return 1.0
    tp = int(np.logical_and(pred, ref).sum())
    return tp / (p + r - tp)


def mean_iou(case: dict[str, dict[str, float]]) -> float:
    """A case's mean IoU: the mean of its regions' ``iou`` ({region: {metric: value}},
    as `score_case` returns). Regions whose IoU is NaN (both masks empty under a rule
    set that excludes them, brats-eval) are left out, as the summaries leave them
    out; NaN when every region is NaN."""
    v = np.asarray([case[r]["iou"] for r in case], dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (pred surface → ref, ref surface → pred).
    Both masks must be non-empty."""
    ep, er = get_mask_edges(np.asarray(pred, bool), np.asarray(ref, bool), crop=True)
    sp = np.asarray(spacing, dtype=np.float64)
    return (np.asarray(get_surface_distance(ep, er, "euclidean", sp)),
            np.asarray(get_surface_distance(er, ep, "euclidean", sp)))


# ---------------------------------------------------------------------------
# Scoring under a named rule set (medseg.scoring). `rules` is a RuleSet: its fields
# are read here, never its name, so a new rule set is a new record, not new code.

#: Structuring-element connectivity (scipy's rank-3 `generate_binary_structure`) per
#: neighbourhood size.
_CONNECTIVITY = {6: 1, 18: 2, 26: 3}
#: BraTS 2023 dilates with the 18-neighbourhood (`generate_binary_structure(3, 2)`).
_DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)
#: panoptica matches a pair when its Dice reaches this (any real overlap does).
_MATCH_MIN_DICE = 1e-6


def _surfels(masks: tuple[np.ndarray, ...], spacing: tuple[float, ...]):
    """Per mask: (surfel positions on the voxel-corner grid, their areas), with MONAI's
    DeepMind neighbour-code table. The codes are the 2×2×2 correlation MONAI computes
    with a torch conv3d, done here as 8 shifted numpy adds (several times faster on
    a CPU), on the union's box padded by one empty voxel."""
    table, kernel = get_code_to_measure_table(spacing)
    table, kernel = table.cpu().numpy().astype(np.float64), kernel.cpu().numpy()[0, 0].astype(np.uint8)
    box = _bbox(np.logical_or.reduce(masks))
    out = []
    for m in masks:
        m = np.pad(m[box], 1).astype(np.uint8)
        n = tuple(s - 1 for s in m.shape)
        code = np.zeros(n, np.uint8)
        for a, b, c in np.ndindex(2, 2, 2):
            code += kernel[a, b, c] * m[a:a + n[0], b:b + n[1], c:c + n[2]]
        edges = (code != 0) & (code != 255)
        out.append((edges, table[code[edges]]))
    return out


def surfel_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DeepMind surface-distance surfels (MONAI's sub-voxel edges): surface elements
    sit on the corners of the voxel grid, each with its area in mm² from its 2×2×2
    neighbourhood code. Returns (pred→ref distances, pred surfel areas, ref→pred
    distances, ref surfel areas), distances in the units of `spacing`. Both masks
    must be non-empty."""
    sp = tuple(float(s) for s in spacing)
    (ep, ap), (er, ar) = _surfels((np.asarray(pred, bool), np.asarray(ref, bool)), sp)
    spa = np.asarray(sp, dtype=np.float64)
    # get_surface_distance returns one distance per edge element in C order, the order
    # of boolean indexing, so distances and areas pair up.
    return (np.asarray(get_surface_distance(ep, er, "euclidean", spa), np.float64), ap,
            np.asarray(get_surface_distance(er, ep, "euclidean", spa), np.float64), ar)


def _area_percentile(dist: np.ndarray, area: np.ndarray, q: float) -> float:
    """The smallest distance below which `q` % of the surface area lies (DeepMind's
    `compute_robust_hausdorff`: no interpolation). E.g. areas 1, 1, 2 at distances
    0, 1, 5: cumulative 0.25, 0.5, 1.0 → the 95th percentile is 5."""
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(area[order]) / area.sum()
    return float(dist[order][min(int(np.searchsorted(cum, q / 100.0)), dist.size - 1)])


def _distance_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                     rules: Any, whole_image: bool = False) -> tuple[float, float, float]:
    """(HD95, Hausdorff, NSD) of two non-empty masks under `rules` (NSD NaN when the
    rules name no tolerance; of a whole image at `image_nsd_tolerance` when set)."""
    if rules.hd95 == "pooled":
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        hd95 = float(np.percentile(np.concatenate([d_pr, d_rp]), 95))
        a_p = a_r = None
    elif rules.hd95 == "directed-max":
        d_pr, a_p, d_rp, a_r = surfel_distances(pred, ref, spacing)
        hd95 = max(_area_percentile(d_pr, a_p, 95), _area_percentile(d_rp, a_r, 95))
    else:
        raise ValueError(f"rules {rules.name}: hd95 {rules.hd95!r}; expected 'pooled' or "
                         "'directed-max'")
    hausdorff = float(max(d_pr.max(), d_rp.max()))
    tol = rules.nsd_tolerance
    if whole_image and tol is not None and rules.image_nsd_tolerance is not None:
        tol = rules.image_nsd_tolerance
    if tol is None:
        nsd = float("nan")
    elif a_p is None:
        # panoptica's NSD: the mean of the two directions' fractions of surface voxels
        # within the tolerance (each surface voxel counts 1).
        nsd = float(((d_pr <= tol).mean() + (d_rp <= tol).mean()) / 2.0)
    else:
        # DeepMind's surface Dice: surface area within the tolerance over all area.
        nsd = float((a_p[d_pr <= tol].sum() + a_r[d_rp <= tol].sum()) / (a_p.sum() + a_r.sum()))
    return hd95, hausdorff, nsd


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of `mask`, grown by `margin` voxels and clipped to the array (so
    the array border stays a border: erosion and dilation see what they saw)."""
    box = []
    for ax in range(mask.ndim):
        idx = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if idx.size == 0:
            return None
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(box)


def _union_box(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes))
                 for i in range(len(boxes[0])))


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in _CONNECTIVITY:
        raise ValueError(f"lesion connectivity {connectivity}; expected 6, 18 or 26")
    return ndimage.generate_binary_structure(3, _CONNECTIVITY[connectivity])


def _lesion_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 rules: Any) -> tuple[float, float, float]:
    """(Dice, HD95, NSD) of one reference lesion and what it was matched with; a
    lesion matched with nothing scores Dice 0, HD95 = the penalty, NSD 0."""
    if not pred.any():
        return 0.0, float(rules.penalty), 0.0
    hd95, _, nsd = _distance_scores(pred, ref, spacing, rules)
    return dice(pred, ref), hd95, nsd


def _dilated_overlap(pred: np.ndarray, ref: np.ndarray, spacing, rules):
    """BraTS 2023 matching → (per kept GT lesion (Dice, HD95, NSD, matched), FP count).

    GT components whose dilations touch form one lesion: the lesions are the
    26-connected components of the dilated GT, restricted to the GT. That dilated
    component is also the lesion's match zone (dilating the merged lesion gives it
    back), so every predicted component touching it belongs to the lesion, whole.
    """
    les = rules.lesions
    st = _structure(les.connectivity)
    zone = (ndimage.binary_dilation(ref, _DILATION_STRUCTURE, iterations=les.dilation)
            if les.dilation > 0 else ref)
    zone_lab, n_zone = ndimage.label(zone, st)
    pred_lab, n_pred = ndimage.label(pred, st)
    gt_lab = np.where(ref, zone_lab, 0)
    size = np.bincount(gt_lab.ravel(), minlength=n_zone + 1) * float(np.prod(spacing))
    hit = (pred_lab > 0) & (zone_lab > 0)
    codes = np.unique(zone_lab[hit].astype(np.int64) * (n_pred + 1) + pred_lab[hit])
    zk, pj = np.divmod(codes, n_pred + 1)
    n_fp = n_pred - np.unique(pj).size
    zone_box, pred_box = ndimage.find_objects(zone_lab), ndimage.find_objects(pred_lab)
    lesions = []
    for k in range(1, n_zone + 1):
        if size[k] <= les.min_size:       # dropped: neither scored nor counted
            continue
        comps = pj[zk == k]
        box = _union_box([zone_box[k - 1]] + [pred_box[j - 1] for j in comps])
        p = np.isin(pred_lab[box], comps) if comps.size else np.zeros_like(gt_lab[box], bool)
        lesions.append((*_lesion_pair(p, gt_lab[box] == k, spacing, rules), comps.size > 0))
    return lesions, n_fp


def _bipartite_dice(pred: np.ndarray, ref: np.ndarray, spacing, rules):
    """panoptica matching → (per kept GT lesion (Dice, HD95, NSD, matched), FP count).

    Components on both sides; each reference lesion is paired with at most one
    predicted lesion, the pairing that maximises the summed Dice (Hungarian
    assignment on 1 − Dice) among pairs that overlap.
    """
    les = rules.lesions
    st = _structure(les.connectivity)
    ref_lab, n_ref = ndimage.label(ref, st)
    pred_lab, n_pred = ndimage.label(pred, st)
    ref_n = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
    pred_n = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    hit = (ref_lab > 0) & (pred_lab > 0)
    codes, inter = np.unique(ref_lab[hit].astype(np.int64) * (n_pred + 1) + pred_lab[hit],
                             return_counts=True)
    ri, pj = np.divmod(codes, n_pred + 1)
    pair_dice = 2.0 * inter / (ref_n[ri] + pred_n[pj])
    match: dict[int, int] = {}
    if n_ref and n_pred:
        cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
        ok = pair_dice >= _MATCH_MIN_DICE
        cost[ri[ok] - 1, pj[ok] - 1] = 1.0 - pair_dice[ok]
        rows, cols = linear_sum_assignment(cost)
        match = {int(r) + 1: int(c) + 1 for r, c in zip(rows, cols) if cost[r, c] < 1.0}
    ref_box, pred_box = ndimage.find_objects(ref_lab), ndimage.find_objects(pred_lab)
    size = ref_n * float(np.prod(spacing))
    lesions = []
    for k in range(1, n_ref + 1):
        if size[k] <= les.min_size:
            continue
        j = match.get(k)
        box = _union_box([ref_box[k - 1]] + ([pred_box[j - 1]] if j else []))
        p = pred_lab[box] == j if j else np.zeros_like(ref_lab[box], bool)
        lesions.append((*_lesion_pair(p, ref_lab[box] == k, spacing, rules), j is not None))
    return lesions, n_pred - len(match)


_MATCHERS = {"dilated-overlap": _dilated_overlap, "bipartite-dice": _bipartite_dice}


def lesion_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                  rules: Any) -> dict[str, float]:
    """Lesion-wise scores of one region under `rules` (a `medseg.scoring.RuleSet` with
    `lesions` set): lesion_dice, lesion_hd95, lesion_nsd (when the rules name an NSD
    tolerance), lesions_tp / _fp / _fn (GT lesions matched, predicted lesions matched
    to none, GT lesions missed; dropped small lesions count nowhere). `spacing` is the
    one distances use (already 1 for voxel units)."""
    les = rules.lesions
    if les.matching not in _MATCHERS:
        raise ValueError(f"rules {rules.name}: lesion matching {les.matching!r}; expected one "
                         f"of {', '.join(_MATCHERS)}")
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    box = _bbox(pred | ref, margin=les.dilation + 1)
    if box is not None:
        pred, ref = pred[box], ref[box]
    lesions, n_fp = _MATCHERS[les.matching](pred, ref, spacing, rules)
    tp = sum(1 for *_, matched in lesions if matched)
    nan = float("nan")
    if les.aggregate == "penalised-mean":
        # BraTS 2023: (Σ lesion scores + FP × penalty) / (lesions + FP); 0/0 → perfect.
        n = len(lesions) + n_fp
        scores = ((1.0, 0.0, 1.0) if n == 0 else
                  (sum(x[0] for x in lesions) / n,
                   (sum(x[1] for x in lesions) + n_fp * rules.penalty) / n,
                   (sum(x[2] for x in lesions)) / n))
    elif les.aggregate == "matched-mean":
        # panoptica "sq": mean over matched pairs; none matched → 0 / penalty / 0, or
        # NaN when neither side has a lesion (panoptica's "no instances").
        hits = [x for x in lesions if x[3]]
        if hits:
            scores = tuple(float(np.mean([x[i] for x in hits])) for i in range(3))
        elif not lesions and n_fp == 0:
            scores = (nan, nan, nan)
        else:
            scores = (0.0, float(rules.penalty), 0.0)
    else:
        raise ValueError(f"rules {rules.name}: lesion aggregate {les.aggregate!r}; expected "
                         "'penalised-mean' or 'matched-mean'")
    out = {"lesion_dice": float(scores[0]), "lesion_hd95": float(scores[1])}
    if rules.nsd_tolerance is not None:
        out["lesion_nsd"] = float(scores[2])
    out.update(lesions_tp=float(tp), lesions_fp=float(n_fp), lesions_fn=float(len(lesions) - tp))
    return out


def score_region(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 rules: Any) -> dict[str, float]:
    """Every metric `rules` defines for one region (`medseg.scoring.rule_metrics(rules)`
    columns, in that order): `pred`, `ref` boolean `(X, Y, Z)`, `spacing` in mm.

    Whole-image Dice/HD95/Hausdorff/NSD follow the rules' empty-mask handling,
    penalty, HD95 variant and units; sensitivity, specificity and volumes (mL) are
    the same under every rule set. IoU, which no rule set defines, is the whole-image
    (voxel-wise) IoU with the rules' Dice conventions: both empty → 1 (NaN when the
    rules say ``both_empty="nan"``), one empty or no overlap → 0; lesion-wise rule
    sets add no lesion-wise IoU.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if rules.units not in ("mm", "voxel"):
        raise ValueError(f"rules {rules.name}: units {rules.units!r}; expected 'mm' or 'voxel'")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_p, n_r = int(pred.sum()), int(ref.sum())
    tp = int(np.logical_and(pred, ref).sum())
    neg = pred.size - n_r
    sp = tuple(float(s) for s in spacing) if rules.units == "mm" else (1.0,) * pred.ndim
    # Crop once to where anything is: every score below is unchanged by it (the margin
    # covers the lesion dilation) and a 240×240×155 case shrinks to the tumour's box.
    box = _bbox(pred | ref, margin=(rules.lesions.dilation if rules.lesions else 0) + 1)
    if box is not None:
        pred, ref = pred[box], ref[box]
    nan = float("nan")
    if n_p == 0 and n_r == 0:
        d, j, hd95, hd, nsd = ((nan,) * 5 if rules.both_empty == "nan"
                               else (1.0, 1.0, 0.0, 0.0, 1.0))
    elif n_p == 0 or n_r == 0 or (tp == 0 and rules.disjoint_is_penalty):
        d, j, hd95, hd, nsd = 0.0, 0.0, float(rules.penalty), float(rules.penalty), 0.0
    else:
        hd95, hd, nsd = _distance_scores(pred, ref, sp, rules, whole_image=True)
        d = 2.0 * tp / (n_p + n_r)
        j = tp / (n_p + n_r - tp)
    out = {"dice": d, "iou": j, "hd95": hd95, "hausdorff": hd,
           "sensitivity": tp / n_r if n_r else 1.0,
           "specificity": (neg - n_p + tp) / neg if neg else 1.0,
           "vol_pred_ml": n_p * voxel_ml, "vol_ref_ml": n_r * voxel_ml}
    if rules.nsd_tolerance is not None:
        out["nsd"] = nsd
    if rules.lesions is not None:
        out.update(lesion_scores(pred, ref, sp, rules))
    return out


def score_case(pred_regions: np.ndarray, ref_regions: np.ndarray, spacing: Sequence[float],
               rules: Any, regions: Sequence[str] = REGIONS) -> dict[str, dict[str, float]]:
    """`(R, X, Y, Z)` boolean stacks of the named `regions` (default TC/WT/ET) →
    {region: {metric: value}} under `rules`."""
    if len(pred_regions) != len(regions) or len(ref_regions) != len(regions):
        raise ValueError(f"score_case: {len(pred_regions)} predicted and {len(ref_regions)} reference "
                         f"masks for the regions {list(regions)}")
    return {r: score_region(pred_regions[i], ref_regions[i], spacing, rules)
            for i, r in enumerate(regions)}
