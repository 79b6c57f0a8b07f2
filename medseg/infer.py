"""Inference shared by validation, cross-validation and prediction.

`predict_probs` is the one sliding-window path (MONAI `SlidingWindowInferer`,
Gaussian blending, optional mirror TTA, ensemble of models by averaging
probabilities). `predict_case` wraps it for a case on disk: preprocessing
(RAS, spacing, brain crop, z-score — so windows only cover the brain box),
inference, inversion of the preprocessing back onto the exact input grid
(MONAI `Invertd`: un-crop, resample probabilities, re-orient), threshold,
regions → labels in the case's convention. `Predictor.uncertainty` streams the
members (models × flips) through `medseg.uncertainty.MemberStats` for voxel
uncertainty maps; `predict_case_uncertainty` writes them and scores the case.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Invertd
from torch import nn

from medseg import __version__
from medseg.data.inputs import InputCase, case_headers, check_inputs
from medseg.data.io import load_header, write_label_map, write_region_maps
from medseg.errors import MedsegError
from medseg.labels import CHANNELS, regions_to_labels
from medseg.models import network_from_spec
from medseg.postprocess import postprocess
from medseg.transforms import IMAGE, preprocessing
from medseg.uncertainty import RANGE, STATISTIC, MemberStats, uncertainty_record

__all__ = ["autocast", "predict_probs", "volume_device", "load_model", "Predictor",
           "predict_case", "predict_case_uncertainty", "write_mask"]


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16"):
    """Mixed precision: bf16 on CPU (about 2× faster here) and CUDA, or fp16 on CUDA;
    a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise MedsegError(f"amp dtype {dtype!r}; expected 'bfloat16' or 'float16'")
    if dtype == "float16" and device.type != "cuda":
        raise MedsegError("train.amp_dtype=float16 needs CUDA; on the CPU use bfloat16")
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _flips(mirror: bool) -> list[tuple[int, ...]]:
    if not mirror:
        return [()]
    return [tuple(c) for n in range(4) for c in itertools.combinations((2, 3, 4), n)]


def volume_device(device: torch.device, shape: Sequence[int], with_stats: bool = False,
                  free_bytes: int | None = None) -> torch.device:
    """Where a whole volume's tensors go during sliding-window inference: `device`
    itself unless it is a GPU whose free memory (`free_bytes`, default: measured)
    cannot hold them with room to spare for the windows; then the host."""
    if device.type != "cuda":
        return device
    # input 4 + output/blend 3 + MONAI's count map and a flipped copy 4 (+ 6 for member stats), float32
    need = int(np.prod(shape)) * 4 * (11 + (6 if with_stats else 0))
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return device if need < free_bytes // 2 else torch.device("cpu")


@torch.no_grad()
def predict_probs(models: Sequence[nn.Module], image: torch.Tensor, roi: Sequence[int],
                  overlap: float = 0.5, sw_batch_size: int = 1, amp: bool = True,
                  mirror: bool = False, device: torch.device | str = "cpu",
                  amp_dtype: str = "bfloat16", stats: MemberStats | None = None) -> torch.Tensor:
    """`image` `(4, X, Y, Z)` preprocessed → `(3, X, Y, Z)` float32 sigmoid probabilities
    for TC/WT/ET, averaged over `models` and (with `mirror`) the 8 axis flips. With
    `stats`, every member (model × flip, `(1, 3, X, Y, Z)` on `device`) is added to it
    instead of to a plain sum (same mean, bit for bit)."""
    device = torch.device(device)
    vol_device = volume_device(device, tuple(image.shape[1:]), with_stats=stats is not None)
    # Windows run on `device`; the volume, the blending buffers and the output stay on
    # `vol_device` (the GPU when they fit in its free memory, else the host: MONAI's
    # sw_device/device split, so a large volume never runs a GPU out of memory).
    inferer = SlidingWindowInferer(roi_size=tuple(roi), sw_batch_size=sw_batch_size,
                                   overlap=overlap, mode="gaussian", sigma_scale=0.125,
                                   sw_device=device, device=vol_device)
    x = torch.as_tensor(image, dtype=torch.float32).unsqueeze(0).to(vol_device)
    acc = torch.zeros((1, 3, *x.shape[2:]), dtype=torch.float32, device=vol_device) if stats is None else None
    n = 0
    for model in models:
        model.eval()
        for axes in _flips(mirror):
            xi = torch.flip(x, axes) if axes else x
            with autocast(device, amp, amp_dtype):
                logits = inferer(xi, model)
            p = torch.sigmoid(torch.as_tensor(logits).float())
            p = torch.flip(p, axes) if axes else p
            if stats is None:
                acc += p
            else:
                stats.add(p)
            n += 1
    return (acc / n)[0].cpu() if stats is None else stats.mean()[0].cpu()


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a network from a medseg checkpoint → (model in eval mode, checkpoint meta)."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: checkpoint not found; expected a .pt file written by "
                          "`medseg train` (runs/<exp>/fold_<k>/checkpoints/final.pt); with the "
                          "bundle's inference.json, pass it as --ckpt_path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise MedsegError(f"{path}: not a readable medseg checkpoint ({type(exc).__name__}: "
                          f"{exc}); re-run training or pass another file") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise MedsegError(f"{path}: not a medseg checkpoint (no 'model'/'meta' entries)")
    meta = ckpt["meta"]
    spec = meta["network"]
    model = network_from_spec(spec)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("deep_supervision_heads")}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise MedsegError(f"{path}: checkpoint does not match network {spec}: missing {missing[:3]}")
    return model.to(device).eval(), meta


class Predictor:
    """Fold checkpoints (1..K) → label maps on each case's input grid."""

    def __init__(self, checkpoints: Sequence[str | Path], device: str | None = None,
                 overlap: float | None = None, sw_batch_size: int | None = None,
                 amp: bool | None = None, mirror: bool = False, min_component_ml: float = 0.0,
                 et_min_ml: float = 0.0):
        if not checkpoints:
            raise MedsegError("no checkpoints given")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoints = [str(p) for p in checkpoints]
        loaded = [load_model(p, self.device) for p in checkpoints]
        self.models = [m for m, _ in loaded]
        self.meta = loaded[0][1]
        for (_, meta), path in zip(loaded[1:], checkpoints[1:]):
            for key in ("network", "spacing", "roi", "channels", "modality_dropout"):
                if meta.get(key) != self.meta.get(key):
                    raise MedsegError(f"{path}: {key} {meta.get(key)} differs from {checkpoints[0]} "
                                      f"({self.meta.get(key)}); an ensemble needs identical models")
        inf = self.meta["infer"]
        self.overlap = inf["overlap"] if overlap is None else overlap
        self.sw_batch_size = inf["sw_batch_size"] if sw_batch_size is None else sw_batch_size
        self.amp = inf.get("amp", True) if amp is None else amp
        # fp16 weights trained on CUDA still predict on a CPU: use bf16 there.
        self.amp_dtype = inf.get("amp_dtype", "bfloat16") if self.device.type == "cuda" else "bfloat16"
        self.threshold = inf["threshold"]
        self.mirror = mirror
        self.min_component_ml, self.et_min_ml = min_component_ml, et_min_ml
        self._pre: dict[tuple[str, ...], object] = {}

    def preprocess(self, channels: Sequence[str]):
        """The inference preprocessing for images given in `channels` order (one per
        channel order, kept: `Invertd` needs the instance that ran)."""
        key = tuple(channels)
        if key not in self._pre:
            self._pre[key] = preprocessing(key, "brats2023", self.meta["spacing"], with_label=False)
        return self._pre[key]

    def _prepared(self, images: Sequence[Path], channels: Sequence[str]):
        """→ (preprocessed `(4, …)` MetaTensor, the preprocessing that made it)."""
        pre = self.preprocess(channels)
        case_headers(images)
        src = {IMAGE: [str(p) for p in images] if len(images) > 1 else str(images[0])}
        try:
            data = pre(src)
        except Exception as exc:  # noqa: BLE001 - MONAI wraps everything in RuntimeError
            check_inputs([InputCase(images[0].parent.name, images, list(channels))])  # names the file
            raise MedsegError(f"{images[0].parent}: could not preprocess {', '.join(p.name for p in images)} "
                              f"({str(exc).splitlines()[-1]}); run `medseg data check` on this folder") from None
        return data[IMAGE], pre

    @staticmethod
    def _inverted(arr: torch.Tensor, img, pre) -> np.ndarray:
        """`(C, …)` maps on the preprocessed grid → `(C, X, Y, Z)` float32 on the input grid
        (un-crop, linear resampling, original orientation: MONAI `Invertd`)."""
        pm = MetaTensor(arr, meta=img.meta, applied_operations=img.applied_operations)
        inverted = Invertd(keys="pred", transform=pre, orig_keys=IMAGE,
                           nearest_interp=False, to_tensor=True)({"pred": pm, IMAGE: img})["pred"]
        return np.asarray(inverted.detach().cpu().numpy(), dtype=np.float32)

    def _run(self, img, stats: MemberStats | None = None) -> torch.Tensor:
        return predict_probs(self.models, img, self.meta["roi"], self.overlap, self.sw_batch_size,
                             self.amp, self.mirror, self.device, self.amp_dtype, stats)

    def probabilities(self, images: Sequence[str | Path],
                      channels: Sequence[str] = CHANNELS) -> tuple[np.ndarray, Path]:
        """Four files (or one 4D file) whose channels are in `channels` order →
        `(3, X, Y, Z)` probabilities on the grid of the first file, and that file."""
        images = [Path(p) for p in images]
        img, pre = self._prepared(images, channels)
        return self._inverted(self._run(img), img, pre), images[0]

    def members(self) -> int:
        """Members of one prediction: models × (8 mirror flips, or 1)."""
        return len(self.models) * (8 if self.mirror else 1)

    def uncertainty(self, images: Sequence[str | Path], channels: Sequence[str] = CHANNELS,
                    statistics: Sequence[str] = (STATISTIC,)) -> tuple[np.ndarray, dict, Path]:
        """As `probabilities`, streaming the members (`members()`) through
        `MemberStats` → (`(3, X, Y, Z)` mean probabilities, {statistic: `(3, X, Y, Z)`
        map}, first file), all on the input grid: computed on the model's grid,
        then inverted together."""
        images = [Path(p) for p in images]
        img, pre = self._prepared(images, channels)
        stats = MemberStats(entropy="mutual_information" in statistics)
        probs = self._run(img, stats)
        maps = stats.maps(statistics)
        stack = torch.cat([probs] + [maps[s][0].float().cpu() for s in statistics])
        del stats, maps
        out = self._inverted(stack, img, pre)
        return out[:3], {s: out[3 * i + 3: 3 * i + 6] for i, s in enumerate(statistics)}, images[0]

    def labels(self, images: Sequence[str | Path], convention: str,
               channels: Sequence[str] = CHANNELS) -> tuple[np.ndarray, nib.Nifti1Image]:
        """→ uint8 label map in `convention` on the input grid, and the input's header image."""
        labels, ref_img, _ = self.labels_and_probs(images, convention, channels)
        return labels, ref_img

    def labels_and_probs(self, images: Sequence[str | Path], convention: str,
                         channels: Sequence[str] = CHANNELS):
        """→ (uint8 labels, input header image, `(3, X, Y, Z)` probabilities) on the input grid."""
        probs, ref = self.probabilities(images, channels)
        regions, ref_img, _ = self.regions(probs, ref)
        return regions_to_labels(regions, convention), ref_img, probs

    def regions(self, probs: np.ndarray, ref: Path) -> tuple[np.ndarray, nib.Nifti1Image, float]:
        """`(3, X, Y, Z)` probabilities on the grid of `ref` → (post-processed bool TC/WT/ET,
        `ref`'s header image, voxel volume in mL)."""
        ref_img = load_header(ref)
        shape = ref_img.shape[:3]
        if probs.shape[1:] != shape:
            raise MedsegError(f"{ref}: internal error: inverted prediction {probs.shape[1:]} "
                              f"!= input grid {shape}")
        voxel_ml = float(np.prod(ref_img.header.get_zooms()[:3])) / 1000.0
        regions = postprocess(probs > self.threshold, voxel_ml, self.min_component_ml, self.et_min_ml)
        return regions, ref_img, voxel_ml


def write_mask(labels: np.ndarray, ref_img: nib.Nifti1Image, target: str | Path, convention: str) -> None:
    """uint8 mask on `ref_img`'s grid (shape, affine, qform/sform, zooms; not its
    display fields), labelled as `convention` in the header, written atomically."""
    write_label_map(labels, ref_img, Path(target), convention, source=f"medseg {__version__}")


def predict_case(predictor: Predictor, images: Sequence[str | Path], convention: str,
                 target: str | Path, channels: Sequence[str] = CHANNELS,
                 probs_target: str | Path | None = None) -> np.ndarray:
    """Predict one case and write `<target>` (a `.nii.gz` mask on the input grid); with
    `probs_target`, also the TC/WT/ET probabilities as a 4D float32 image (X, Y, Z, 3)
    on the same grid."""
    labels, ref_img, probs = predictor.labels_and_probs(images, convention, channels)
    write_mask(labels, ref_img, target, convention)
    if probs_target is not None:
        write_region_maps(probs, ref_img, Path(probs_target), f"medseg {__version__} probabilities")
    return labels


def predict_case_uncertainty(predictor: Predictor, images: Sequence[str | Path], convention: str,
                             target: str | Path, uncertainty_target: str | Path,
                             channels: Sequence[str] = CHANNELS, probs_target: str | Path | None = None,
                             review_threshold: float | None = None) -> tuple[np.ndarray, dict]:
    """`predict_case` plus `<uncertainty_target>`: the `STATISTIC` map of TC/WT/ET as a 4D
    float32 image (X, Y, Z, 3) on the input grid → (labels, the case's ``uncertainty``
    record: `medseg.uncertainty.uncertainty_record`)."""
    probs, maps, ref = predictor.uncertainty(images, channels)
    regions, ref_img, voxel_ml = predictor.regions(probs, ref)
    labels = regions_to_labels(regions, convention)
    write_mask(labels, ref_img, target, convention)
    u = maps[STATISTIC]
    write_region_maps(u, ref_img, Path(uncertainty_target),
                      f"medseg {__version__} uncertainty {STATISTIC}", cal=RANGE[STATISTIC])
    if probs_target is not None:
        write_region_maps(probs, ref_img, Path(probs_target), f"medseg {__version__} probabilities")
    return labels, uncertainty_record(u, regions, probs, voxel_ml, review_threshold, STATISTIC,
                                      predictor.members())
