"""Region loss: soft Dice + *binary* cross-entropy on the three sigmoid outputs.

Why not MONAI's `DiceCELoss(sigmoid=True)`: for more than one channel it applies
softmax cross-entropy (checked in MONAI 1.6.1), which treats TC, WT and ET as
mutually exclusive classes although they are nested (ET ⊂ TC ⊂ WT). With a
voxel in all three regions, softmax CE can never reach zero (its best is
-log(1/3) per target channel); binary CE can. `tests/test_losses.py` pins this.
"""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss, DiceLoss
from torch import nn

__all__ = ["RegionDiceBCELoss", "build_loss", "deep_supervision_weights"]


class RegionDiceBCELoss(nn.Module):
    """`lambda_dice * Dice(sigmoid) + lambda_bce * BCEWithLogits`.

    input: `(B, 3, D, H, W)` logits for TC/WT/ET; target: same shape, multi-hot {0, 1}.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0, smooth: float = 1e-5,
                 batch: bool = True):
        super().__init__()
        # batch=True pools Dice over the batch: a patch without ET does not give
        # an undefined per-sample ET Dice (nnU-Net's batch Dice does the same).
        self.dice = DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=batch)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(input.dtype)
        return self.lambda_dice * self.dice(input, target) + self.lambda_bce * self.bce(input, target)


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights for `levels` outputs (full resolution first): 1, ½, ¼, …
    divided by their sum, so the loss has the scale of a single output's. Without
    the division (MONAI's weight mode "exp") 3 outputs weigh 1.75 and 4 weigh
    1.875: the recipe's learning rate would act about 1.75-1.9× larger.
    E.g. 3 → [4/7, 2/7, 1/7]."""
    raw = [0.5 ** i for i in range(max(1, levels))]
    return [w / sum(raw) for w in raw]


def build_loss(lambda_dice: float = 1.0, lambda_bce: float = 1.0,
               deep_supervision: bool = True, levels: int = 3) -> nn.Module:
    """The training loss; with deep supervision it takes a list of `levels` outputs
    (full resolution first) weighted by `deep_supervision_weights` (MONAI's
    `DeepSupervisionLoss`; coarser targets are made by nearest interpolation)."""
    loss = RegionDiceBCELoss(lambda_dice, lambda_bce)
    if not deep_supervision:
        return loss
    return DeepSupervisionLoss(loss, weights=deep_supervision_weights(levels))
