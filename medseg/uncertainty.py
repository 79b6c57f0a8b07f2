"""Voxel-wise and per-case uncertainty from the members of one prediction
(torch-free: the ONNX edge runtime imports it without torch or MONAI).

**Members.** Each model of the fold ensemble, run on each of the 8 mirror flips
of the input (`medseg.infer` TTA), gives one `(3, X, Y, Z)` TC/WT/ET sigmoid
probability map: K folds → 8·K members. The prediction is their mean.
`MemberStats` streams them (running sum, sum of squared deviations and, for
mutual information, sum of member entropies), so no engine holds 8·K volumes:
two `(3, X, Y, Z)` accumulators (three) whatever K. It works on numpy arrays and on torch
tensors alike (the PyTorch engine accumulates on its device).

**Voxel maps** (per region channel), the candidates of `benchmarks/uncertainty.py`:

- ``std``: population standard deviation of the member probabilities, [0, 0.5];
- ``entropy``: binary entropy of the member mean, in bits, [0, 1];
- ``mutual_information`` (BALD): entropy of the mean minus the mean member
  entropy, [0, 1]: the part of the entropy the members disagree on.

The standard deviation is the map medseg writes (`STATISTIC`): on the demo's
40 out-of-fold cases it found wrong voxels as well as mutual information and
better than entropy (AUROC 0.957, 0.957, 0.949), and its case score ranked cases
by error best per region (README "Uncertainty"). It is 0 wherever the members
agree, so it needs members: `predict --uncertainty` turns the mirror TTA on, and
`MemberStats.maps` refuses fewer than `MIN_MEMBERS` (one member has no spread:
its maps would be 0 everywhere and no case ever flagged).

**Case score per region** (`region_score`, ``sum_ratio``): over the voxels that
can be wrong (the predicted region, its one-voxel shell and the voxels whose
mean probability is ≥ `DOUBT`), Σ u / (predicted voxels + Σ u): the share of
wrong voxels the spread suggests, in [0, 1); 0 when there is no such voxel (the
model is sure the region is absent). The **case score** is the largest of the
three (`CASE_SCORE`). A **lesion** is a connected component (26-connected) of
a predicted region, scored the same way over itself and its shell. A
case is flagged for review when its score is ≥ a threshold chosen on
cross-validation (`choose_threshold`: Youden's J for "mean Dice over TC/WT/ET
< 0.8" on out-of-fold cases; `fold_thresholds`: the same, leave-one-fold-out),
stored with the member count it was chosen with as ``uncertainty.json`` in the cv
folder (`CALIBRATION`) and in the ONNX metadata. `check_calibration` validates
such a record, whichever its source, before a threshold is used or written.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.labels import REGIONS

__all__ = ["STATISTICS", "STATISTIC", "RANGE", "SCORES", "SCORE", "CASE_SCORE", "DOUBT", "DICE_LEVEL",
           "CALIBRATION", "MIN_MEMBERS", "MemberStats", "require_members", "binary_entropy",
           "region_score", "case_score", "lesion_scores", "uncertainty_record", "choose_threshold",
           "fold_thresholds", "check_calibration"]

#: Voxel statistics that `MemberStats.maps` computes, and the one medseg writes.
STATISTICS = ("std", "entropy", "mutual_information")
STATISTIC = "std"

#: Value range of each statistic (the maps' NIfTI display range).
RANGE = {"std": (0.0, 0.5), "entropy": (0.0, 1.0), "mutual_information": (0.0, 1.0)}

#: Case-score definitions that `region_score` knows, and the one medseg uses.
SCORES = ("mean_near", "sum_ratio")
SCORE = "sum_ratio"

#: How a case's score is made of its region scores (recorded with every threshold).
CASE_SCORE = f"{SCORE}, max over regions"

#: Mean probability from which a voxel outside the predicted region counts as
#: doubtful (in the case score's support).
DOUBT = 0.1

#: A case is "poor" when its mean Dice over TC/WT/ET is below this: the event
#: whose Youden's J chooses the review threshold.
DICE_LEVEL = 0.8

#: File of a cv folder holding the review threshold (written by benchmarks/uncertainty.py).
CALIBRATION = "uncertainty.json"

#: Fewest members whose spread is an uncertainty: one member's std and mutual
#: information are 0 everywhere (and its entropy is the plain probability's).
MIN_MEMBERS = 2

#: What to re-run when a stored calibration cannot be used.
_RECALIBRATE = ("re-run benchmarks/uncertainty.py --write-calibration on the cv folder (and re-export "
                "an ONNX model from it), or pass --review-threshold")

#: Probabilities are clipped to [EPS, 1 - EPS] before logarithms.
EPS = 1e-6

_CUBE = np.ones((3, 3, 3), bool)


def _log2(x):
    """log2 of a numpy array or a torch tensor (on its own device)."""
    return x.log2() if hasattr(x, "log2") else np.log2(x)


def binary_entropy(p):
    """Entropy in bits of a Bernoulli(p) per voxel: 0 at p = 0 or 1, 1 at p = 0.5.
    Works on numpy arrays and torch tensors."""
    q = p.clip(EPS, 1 - EPS)
    return -(q * _log2(q) + (1 - q) * _log2(1 - q))


def require_members(n: int) -> None:
    """Refuse uncertainty from fewer than `MIN_MEMBERS` members (a prediction's
    models × mirror flips). Engines may call it before running any network."""
    if n < MIN_MEMBERS:
        raise MedsegError(
            f"uncertainty needs at least {MIN_MEMBERS} members (probability maps whose spread is "
            f"measured), got {n}: one model without mirror TTA gives one member, whose uncertainty "
            "would be 0 everywhere; turn on mirror TTA (`--tta`, or mirror=True: 8 members per model) "
            "or predict with several fold models (a cv folder)")


class MemberStats:
    """Streaming statistics of member probability maps (numpy arrays or torch
    tensors of one shape). `add` each member once; nothing else is kept.

    Mean and variance by Welford's update on a running *sum* (so the mean is
    bit-for-bit the sum / n that prediction without uncertainty computes): with
    m = sum/n before adding the (n+1)-th member x, M2 += (x - m)² · n/(n+1),
    in place (one temporary volume; fused for torch tensors)."""

    def __init__(self, entropy: bool = False):
        self.n = 0
        self.total = None
        self.m2 = None
        self.entropy_sum = None
        self._entropy = entropy

    def add(self, p) -> None:
        if self.n == 0:
            self.total, self.m2 = p + 0, p * 0
            self.entropy_sum = binary_entropy(p) if self._entropy else None
            self.n = 1
            return
        n = self.n
        if hasattr(p, "addcmul_"):                 # torch: fused in-place ops, 3 passes
            d = p.sub(self.total, alpha=1.0 / n)
            self.m2.addcmul_(d, d, value=n / (n + 1))
        else:
            d = self.total * (-1.0 / n)
            d += p
            d *= d
            d *= n / (n + 1)
            self.m2 += d
        self.total += p
        self.n += 1
        if self._entropy:
            self.entropy_sum += binary_entropy(p)

    def mean(self):
        if self.n == 0:
            raise MedsegError("no member was added: nothing to average")
        return self.total / self.n

    def maps(self, statistics: Sequence[str] = (STATISTIC,)) -> dict:
        """{statistic: map} of the members so far, each the shape of a member
        (`(3, X, Y, Z)` in medseg); an error below `MIN_MEMBERS` members."""
        unknown = [s for s in statistics if s not in STATISTICS]
        if unknown:
            raise MedsegError(f"uncertainty statistic {unknown[0]!r}; expected one of "
                              f"{', '.join(STATISTICS)}")
        require_members(self.n)
        mean = self.mean()
        out = {}
        if "std" in statistics:
            out["std"] = (self.m2 / self.n).clip(0, None) ** 0.5
        if "entropy" in statistics or "mutual_information" in statistics:
            h = binary_entropy(mean)
            if "entropy" in statistics:
                out["entropy"] = h
            if "mutual_information" in statistics:
                if self.entropy_sum is None:
                    raise MedsegError("mutual information needs MemberStats(entropy=True)")
                out["mutual_information"] = (h - self.entropy_sum / self.n).clip(0, None)
        return out


def _support(u: np.ndarray, mask: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """The voxels of one region that can be wrong: the predicted region, its
    one-voxel shell (26-connected) and the voxels with mean probability ≥ DOUBT."""
    near = ndimage.binary_dilation(mask, _CUBE) if mask.any() else np.zeros(mask.shape, bool)
    return near | (prob >= DOUBT)


def region_score(u: np.ndarray, mask: np.ndarray, prob: np.ndarray, method: str = SCORE) -> float:
    """One region's case score from its voxel map `u`, predicted mask `mask` and mean
    probability `prob` (3D arrays on one grid).

    - ``mean_near``: mean of `u` over the support (region, shell, doubtful voxels);
    - ``sum_ratio``: Σ u over the support / (predicted voxels + Σ u): an expected
      share of wrong voxels, in [0, 1).
    Both are 0 when the support is empty."""
    if method not in SCORES:
        raise MedsegError(f"case score {method!r}; expected one of {', '.join(SCORES)}")
    mask = np.asarray(mask, bool)
    found = ndimage.find_objects((mask | (prob >= DOUBT)).astype(np.uint8))
    if not found:
        return 0.0
    box = _box(mask.shape, found[0])       # the support lies inside: a shell is one voxel
    u, s = u[box], _support(u[box], mask[box], prob[box])
    total = float(u[s].sum(dtype=np.float64))
    if method == "mean_near":
        return total / int(s.sum())
    return total / (int(np.count_nonzero(mask)) + total) if total > 0 else 0.0


def lesion_scores(u: np.ndarray, mask: np.ndarray, voxel_ml: float, limit: int = 100) -> list[dict]:
    """Connected components (26-connected) of one predicted region, largest first
    (at most `limit`): volume (mL), centre (voxel indices on the grid of `u`) and
    score (``sum_ratio`` over the component and its one-voxel shell)."""
    mask = np.asarray(mask, bool)
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found:
        return []
    crop = _box(mask.shape, found[0])          # labelling the tumour's box, not the volume
    offset = [b.start for b in crop]
    u = u[crop]
    lab, _ = ndimage.label(mask[crop], structure=_CUBE)
    sizes = np.bincount(lab.ravel())[1:]
    boxes = ndimage.find_objects(lab)
    out = []
    for i in np.argsort(-sizes, kind="stable")[:limit]:
        box = _box(lab.shape, boxes[i])
        comp = lab[box] == i + 1
        shell = ndimage.binary_dilation(comp, _CUBE)
        centre = [int(round(c + b.start + o)) for c, b, o in zip(ndimage.center_of_mass(comp), box, offset)]
        total = float(u[box][shell].sum(dtype=np.float64))
        out.append({"volume_ml": float(sizes[i] * voxel_ml), "centre_voxel": centre,
                    "score": total / (int(sizes[i]) + total)})
    return out


def _box(shape: Sequence[int], box: tuple) -> tuple:
    """A component's bounding box grown by one voxel (inside the grid)."""
    return tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, shape))


def case_score(scores: dict[str, float]) -> float:
    """The case score from its region scores: the largest (the worst region decides)."""
    return float(max(scores.values()))


def uncertainty_record(u: np.ndarray, regions: np.ndarray, probs: np.ndarray, voxel_ml: float,
                       threshold: float | None, statistic: str = STATISTIC,
                       members: int | None = None, names: Sequence[str] = REGIONS) -> dict:
    """A case's ``uncertainty`` record (``predictions.json``) from its `(R, X, Y, Z)`
    voxel map `u`, post-processed `regions` (named `names`, the model's outputs) and
    mean probabilities `probs`:
    {"score": {region: float}, "case_score": float, "review": bool, "threshold":
    float | None, "statistic", "members", "lesions": {region: [...]}}. Without a
    threshold nothing is flagged (``review`` false, ``threshold`` null)."""
    score = {r: region_score(u[i], regions[i], probs[i]) for i, r in enumerate(names)}
    case = case_score(score)
    return {"score": score, "case_score": case,
            "review": bool(threshold is not None and case >= threshold),
            "threshold": None if threshold is None else float(threshold),
            "statistic": statistic, "case_score_method": CASE_SCORE, "members": members,
            "lesions": {r: lesion_scores(u[i], regions[i], voxel_ml) for i, r in enumerate(names)}}


def _cases(scores: Sequence[float], dice: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """`(N,)` float64 scores and Dice of the cases a threshold is chosen on; an error
    when their lengths differ or a value is NaN or infinite (roc_curve would fail
    or place the threshold on it)."""
    s, d = np.asarray(scores, np.float64), np.asarray(dice, np.float64)
    if s.shape != d.shape or s.ndim != 1:
        raise MedsegError(f"cannot choose a review threshold: expected one score per Dice, got "
                          f"{s.shape} scores and {d.shape} Dice values")
    if not (np.isfinite(s).all() and np.isfinite(d).all()):
        raise MedsegError(f"cannot choose a review threshold: expected finite scores and Dice, found "
                          f"{int((~np.isfinite(s)).sum())} scores and {int((~np.isfinite(d)).sum())} Dice "
                          "values that are NaN or infinite; re-measure those cases")
    return s, d


def choose_threshold(scores: Sequence[float], dice: Sequence[float], level: float = DICE_LEVEL,
                     *, members: int) -> dict:
    """The review threshold from out-of-fold cases: `(N,)` case scores `scores`, each
    computed from `members` members, and their `(N,)` mean Dice `dice`. A case is
    poor when its Dice < `level`; the threshold maximises Youden's J (sensitivity +
    specificity - 1) of "score ≥ threshold" for poor cases (scikit-learn's ROC
    curve), placed halfway between the lowest flagged score and the next lower
    score. → {threshold, youden_j, sensitivity, specificity, poor, cases, level,
    members}. An error when the cases are all poor or all good, or when no
    threshold beats flagging nothing (J ≤ 0: the score does not separate them)."""
    from sklearn.metrics import roc_auc_score, roc_curve
    require_members(members)
    s, d = _cases(scores, dice)
    poor = d < level
    if poor.all() or not poor.any():
        raise MedsegError(f"cannot choose a review threshold: {int(poor.sum())} of {len(s)} cases have "
                          f"Dice < {level}; it needs both poor and good cases")
    fpr, tpr, thr = roc_curve(poor, s)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first point flags nothing (threshold +inf): it wins when no score
    # threshold has J > 0, and an infinite threshold would silently flag no case.
    if best == 0 or not np.isfinite(thr[best]):
        raise MedsegError(
            f"cannot choose a review threshold: the case score does not separate poor from good cases "
            f"on these {len(s)} cases ({int(poor.sum())} with Dice < {level}; AUROC of the score for "
            f"poor cases {roc_auc_score(poor, s):.3f}, best Youden's J {float(np.max(tpr - fpr)):.3f}, "
            "expected > 0): no review threshold chosen. Check that the scores come from several members, "
            "use more cases (or folds), or give predict a --review-threshold")
    lower = s[s < thr[best]]
    cut = float((thr[best] + lower.max()) / 2) if lower.size else float(thr[best])
    flagged = s >= cut
    return {"threshold": cut, "youden_j": float(tpr[best] - fpr[best]),
            "sensitivity": float((flagged & poor).sum() / poor.sum()),
            "specificity": float((~flagged & ~poor).sum() / (~poor).sum()),
            "poor": int(poor.sum()), "cases": int(len(s)), "level": level, "members": int(members)}


def fold_thresholds(scores: Sequence[float], dice: Sequence[float], folds: Sequence[int],
                    level: float = DICE_LEVEL, *, members: int) -> dict:
    """Leave-one-fold-out review thresholds: for each fold k of the `(N,)` `folds`, the
    threshold `choose_threshold` picks on the other folds' cases (`(N,)` `scores`,
    `dice`), applied to fold k's cases: an honest sensitivity and specificity.
    → {"thresholds": {k: float}, "flagged": `(N,)` bool, "sensitivity",
    "specificity", "flagged_count"}. An error (naming the held-out fold) when the
    other folds cannot choose one."""
    s, d, f = (np.asarray(a) for a in (scores, dice, folds))
    if not s.shape == d.shape == f.shape:
        raise MedsegError(f"leave-one-fold-out thresholds: expected one score, Dice and fold per case, "
                          f"got {s.shape}, {d.shape} and {f.shape}")
    flagged, chosen = np.zeros(len(s), bool), {}
    for k in np.unique(f).tolist():
        held = f == k
        try:
            t = choose_threshold(s[~held], d[~held], level, members=members)["threshold"]
        except MedsegError as exc:
            raise MedsegError(f"fold {k} held out: {exc}") from None
        chosen[k] = t
        flagged[held] = s[held] >= t
    poor = d < level
    return {"thresholds": chosen, "flagged": flagged,
            "sensitivity": float((flagged & poor).sum() / max(int(poor.sum()), 1)),
            "specificity": float((~flagged & ~poor).sum() / max(int((~poor).sum()), 1)),
            "flagged_count": int(flagged.sum())}


def check_calibration(cal: dict, source: str, members: int | None = None) -> tuple[float, list[str]]:
    """Validate a review calibration record from any `source` (the words naming it in
    errors: a cv folder's ``uncertainty.json``, an ONNX model's metadata, a record
    about to be written) for a prediction with `members` members (None: unknown).
    → (threshold, notes): the threshold, finite, in [0, 1) like a case score; notes for
    the caller to print, each a sentence without a "note:" prefix (today one: the
    member counts differ, so the scores run on another scale). An error when
    the record is not a JSON object, its threshold is missing or not finite, it was
    chosen for another statistic or case score than this medseg's, or it does not
    record the member count it was chosen with."""
    if not isinstance(cal, dict):
        raise MedsegError(f"{source}: expected a review calibration (a JSON object with threshold, "
                          f"statistic, case_score, members), found {type(cal).__name__}; {_RECALIBRATE}")
    t = cal.get("threshold")
    # bool is an int to Python, and a JSON true is no threshold.
    number = isinstance(t, numbers.Real) and not isinstance(t, bool)
    if not number or not np.isfinite(t) or not 0 <= t < 1:
        why = (" (Infinity flags no case: the score did not separate poor from good cases on that "
               "cross-validation)" if number and not np.isfinite(t) else "")
        raise MedsegError(f"{source}: review threshold {t!r}; expected a finite number in [0, 1) (a case "
                          f"score's range){why}; {_RECALIBRATE}")
    if cal.get("statistic") != STATISTIC or cal.get("case_score") != CASE_SCORE:
        raise MedsegError(f"{source}: threshold chosen for the {cal.get('statistic')!r} map and the "
                          f"{cal.get('case_score')!r} score, but medseg scores cases with {STATISTIC!r} "
                          f"and {CASE_SCORE!r}; {_RECALIBRATE}")
    m = cal.get("members")
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < MIN_MEMBERS:
        raise MedsegError(f"{source}: members {m!r}; expected the member count the threshold was chosen "
                          f"with (an integer ≥ {MIN_MEMBERS}: scores from other counts are on another "
                          f"scale); {_RECALIBRATE}")
    notes = []
    if members is not None and members != m:
        notes.append(f"chosen with {int(m)} members per case, predicting with {members}: an ensemble's "
                     "scores are not on the same scale (README: Uncertainty)")
    return float(t), notes
