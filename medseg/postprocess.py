"""Post-processing of predicted regions, shared by both engines (torch-free: the
ONNX edge runtime imports it without torch or MONAI)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["postprocess", "describe_postprocessing"]


def postprocess(regions: np.ndarray, voxel_ml: float, min_component_ml: float = 0.0,
                et_min_ml: float = 0.0) -> np.ndarray:
    """Clean a `(3, X, Y, Z)` boolean TC/WT/ET stack (a new array; the input is kept).

    - `min_component_ml`: drop connected components (26-connected) of each region
      smaller than this volume: isolated false-positive specks.
    - `et_min_ml`: if the whole predicted ET is smaller than this, it becomes
      necrosis/NET: its voxels are added to TC and WT, then removed from ET, so
      regions → labels turns them into the NCR label (an ET voxel the network left
      outside TC would otherwise become edema or background). A case without
      enhancing tumour scores ET Dice 1 only when nothing is predicted; a few
      spurious ET voxels score 0 (the BraTS winners' relabelling trick). Choose
      the threshold from cross-validation (`medseg cv` writes postprocessing.json).
    """
    out = np.asarray(regions, bool).copy()
    if min_component_ml > 0:
        min_vox = min_component_ml / voxel_ml
        for i in range(out.shape[0]):
            lab, n = ndimage.label(out[i], structure=np.ones((3, 3, 3), bool))
            if n:
                sizes = np.bincount(lab.ravel())
                small = np.flatnonzero(sizes < min_vox)
                out[i][np.isin(lab, small[small > 0])] = False
    if et_min_ml > 0 and out[2].any() and out[2].sum() * voxel_ml < et_min_ml:
        out[0] |= out[2]
        out[1] |= out[2]
        out[2] = False
    return out


def describe_postprocessing(min_component_ml: float, et_min_ml: float) -> str:
    """What `postprocess` does with these values, in words (for logs and manifests)."""
    steps = []
    if min_component_ml > 0:
        steps.append(f"components < {min_component_ml:g} mL removed")
    if et_min_ml > 0:
        steps.append(f"ET < {et_min_ml:g} mL → necrosis")
    return ", ".join(steps) or "none"
