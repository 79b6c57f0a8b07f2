"""Region losses on the sigmoid outputs (TC, WT, ET): soft Dice plus binary
cross-entropy (the default), Focal loss, Dice + Focal, and class-weighted
cross-entropy.

Why not MONAI's `DiceCELoss(sigmoid=True)`: for more than one channel it applies
softmax cross-entropy (checked in MONAI 1.6.1), which treats TC, WT and ET as
mutually exclusive classes although they are nested (ET ⊂ TC ⊂ WT). With a
voxel in all three regions, softmax CE can never reach zero (its best is
-log(1/3) per target channel); binary CE can. `tests/test_losses.py` pins this.

The recipe is ``train.loss`` (a dict, recorded in every run's config and in
the bundle):

- ``name``: ``dice_ce`` (default: ``dice_weight`` · Dice + ``ce_weight`` ·
  binary CE), ``focal`` (``focal_weight`` · Focal alone), ``dice_focal``
  (``dice_weight`` · Dice + ``focal_weight`` · Focal; the documents' recipe is
  0.7 · Dice + 0.3 · Focal with α 0.25, γ 2). Focal is MONAI's sigmoid
  `FocalLoss` (α weighs positives, 1 − α negatives), one binary term per region.
- ``class_weights``: ``none`` or ``log_inverse``: the cross-entropy term
  weighs each voxel by its class, ``1 / ln(1.02 + count / max count)`` with the
  counts of the training fold's labels (`log_inverse_weights`). A voxel's class
  is the set of regions it belongs to (`region_codes`): background, edema (WT
  only), necrosis (WT and TC), enhancing (all three) for the BraTS regions, so
  the weights follow any label convention.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from monai.losses import DeepSupervisionLoss, DiceLoss, FocalLoss
from torch import nn
from torch.nn import functional as F

from medseg.errors import MedsegError

__all__ = ["LOSSES", "CLASS_WEIGHTS", "DEFAULT_LOSS", "RegionDiceBCELoss", "RegionLoss", "build_loss",
           "check_loss", "deep_supervision_weights", "log_inverse_weights", "region_codes"]

#: ``train.loss.name`` → its terms.
LOSSES = {"dice_ce": ("dice", "ce"), "focal": ("focal",), "dice_focal": ("dice", "focal")}
#: ``train.loss.class_weights`` values.
CLASS_WEIGHTS = ("none", "log_inverse")
#: The recipe of configs written before ``train.loss`` existed (and the default).
DEFAULT_LOSS = {"name": "dice_ce", "dice_weight": 1.0, "ce_weight": 1.0, "focal_weight": 1.0,
                "focal_alpha": 0.25, "focal_gamma": 2.0, "class_weights": "none"}


def check_loss(spec: Mapping) -> dict:
    """``train.loss`` → the same dict, checked (a clear error for a bad value)."""
    spec = dict(spec)
    unknown = sorted(set(spec) - set(DEFAULT_LOSS))
    missing = sorted(set(DEFAULT_LOSS) - set(spec))
    if unknown or missing:
        raise MedsegError(f"train.loss: unknown keys {unknown}, missing keys {missing}; expected "
                          f"{sorted(DEFAULT_LOSS)}")
    if spec["name"] not in LOSSES:
        raise MedsegError(f"train.loss.name={spec['name']!r}: expected one of {', '.join(LOSSES)}")
    if spec["class_weights"] not in CLASS_WEIGHTS:
        raise MedsegError(f"train.loss.class_weights={spec['class_weights']!r}: expected one of "
                          f"{', '.join(CLASS_WEIGHTS)}")
    if spec["class_weights"] != "none" and "ce" not in LOSSES[spec["name"]]:
        raise MedsegError(f"train.loss.class_weights={spec['class_weights']!r} weighs the cross-entropy "
                          f"term, which train.loss.name={spec['name']!r} does not have (Focal has its own "
                          "weighting, focal_alpha); use name=dice_ce or class_weights=none")
    for key in ("dice_weight", "ce_weight", "focal_weight", "focal_gamma"):
        v = spec[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise MedsegError(f"train.loss.{key}={v!r}: expected a number ≥ 0")
    a = spec["focal_alpha"]
    if a is not None and (not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
        raise MedsegError(f"train.loss.focal_alpha={a!r}: expected a number in [0, 1] or null (no α)")
    if all(spec[f"{t}_weight"] == 0 for t in LOSSES[spec["name"]]):
        raise MedsegError(f"train.loss: every term of {spec['name']} has weight 0")
    return spec


def region_codes(target: torch.Tensor) -> torch.Tensor:
    """`(B, R, ...)` multi-hot regions → `(B, ...)` class code ``Σ_r target_r · 2^r``:
    the set of regions a voxel belongs to, one code per class of voxel."""
    powers = (2 ** torch.arange(target.shape[1], device=target.device)).view(1, -1, *[1] * (target.ndim - 2))
    return (target.round().long() * powers).sum(1)


def log_inverse_weights(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Class weights ``1 / ln(1.02 + count / max count)`` (ENet's rule with the
    frequency taken relative to the largest class): the largest class gets
    1 / ln 2.02 ≈ 1.42, a vanishing one at most 1 / ln 1.02 ≈ 50.5. Classes with
    no voxel (count 0) get the vanishing bound; they never occur in a target."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or len(c) == 0 or (c < 0).any() or c.max() <= 0:
        raise MedsegError(f"class weights: expected non-negative voxel counts with one above 0, got {c.tolist()}")
    return 1.0 / np.log(1.02 + c / c.max())


class RegionLoss(nn.Module):
    """The weighted sum of the terms of ``train.loss`` on `(B, R, D, H, W)` logits
    and a same-shaped multi-hot {0, 1} target.

    `code_weights` (length 2^R, indexed by `region_codes`) weighs the binary CE per
    voxel: ``Σ_v w_v Σ_r bce_vr / (R Σ_v w_v)``, the weighted mean, so the term keeps
    the unweighted one's scale (as `nn.CrossEntropyLoss` with weights)."""

    def __init__(self, spec: Mapping | None = None, code_weights: Sequence[float] | None = None,
                 smooth: float = 1e-5, batch: bool = True):
        super().__init__()
        spec = check_loss({**DEFAULT_LOSS, **(spec or {})})
        terms = LOSSES[spec["name"]]
        every = {"dice": spec["dice_weight"], "ce": spec["ce_weight"], "focal": spec["focal_weight"]}
        self.weights = {t: float(every[t]) for t in terms}
        # batch=True pools Dice over the batch: a patch without ET does not give
        # an undefined per-sample ET Dice (nnU-Net's batch Dice does the same).
        self.dice = DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=batch) if "dice" in terms else None
        self.focal = (FocalLoss(use_softmax=False, gamma=float(spec["focal_gamma"]), alpha=spec["focal_alpha"],
                                reduction="mean") if "focal" in terms else None)
        if code_weights is not None:
            self.register_buffer("code_weights", torch.as_tensor(code_weights, dtype=torch.float32))
        else:
            self.code_weights = None

    def _ce(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.code_weights is None:
            return F.binary_cross_entropy_with_logits(input, target)
        w = self.code_weights.to(input.device)[region_codes(target)].unsqueeze(1)
        bce = F.binary_cross_entropy_with_logits(input.float(), target.float(), reduction="none")
        return (bce * w).sum() / (w.sum() * input.shape[1]).clamp_min(1e-12)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(input.dtype)
        total = input.new_zeros((), dtype=torch.float32)
        if self.dice is not None:
            total = total + self.weights["dice"] * self.dice(input, target)
        if "ce" in self.weights:
            total = total + self.weights["ce"] * self._ce(input, target)
        if self.focal is not None:
            total = total + self.weights["focal"] * self.focal(input, target)
        return total


class RegionDiceBCELoss(RegionLoss):
    """`lambda_dice * Dice(sigmoid) + lambda_bce * BCEWithLogits` (the default recipe)."""

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0, smooth: float = 1e-5,
                 batch: bool = True):
        super().__init__({"name": "dice_ce", "dice_weight": lambda_dice, "ce_weight": lambda_bce},
                         smooth=smooth, batch=batch)


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights for `levels` outputs (full resolution first): 1, ½, ¼, …
    divided by their sum, so the loss has the scale of a single output's. Without
    the division (MONAI's weight mode "exp") 3 outputs weigh 1.75 and 4 weigh
    1.875: the recipe's learning rate would act about 1.75-1.9× larger.
    E.g. 3 → [4/7, 2/7, 1/7]."""
    raw = [0.5 ** i for i in range(max(1, levels))]
    return [w / sum(raw) for w in raw]


def build_loss(spec: Mapping | None = None, deep_supervision: bool = True, levels: int = 3,
               code_weights: Sequence[float] | None = None) -> nn.Module:
    """The training loss of ``train.loss`` `spec` (default: Dice + binary CE); with
    deep supervision it takes a list of `levels` outputs (full resolution first)
    weighted by `deep_supervision_weights` (MONAI's `DeepSupervisionLoss`; coarser
    targets are made by nearest interpolation)."""
    loss = RegionLoss(spec, code_weights)
    if not deep_supervision:
        return loss
    return DeepSupervisionLoss(loss, weights=deep_supervision_weights(levels))
