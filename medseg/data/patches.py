"""Training and validation data read from a preprocessed store (`medseg.data.preprocessed`).

`PatchDataset` is indexed by ``(case index, seed)`` pairs that `EpochSampler`
yields: the seed fixes the patch position and every augmentation of that sample,
whichever loader worker makes it, so persistent workers (started once per
training run, not per epoch) keep training reproducible and a resumed run
replays the same samples. A sample reads only its patch from the memory-mapped
case (a few MB), not the case: resident memory does not grow with the number of
cases, and nothing is recomputed over the whole volume (tumour locations were
sampled once, at preprocessing).

Patch position, as MONAI's RandCropByPosNegLabeld after SpatialPadd (the
in-memory path): with probability pos/(pos+neg) the centre is a tumour voxel
(one tumour label of the case chosen uniformly, as nnU-Net does, so a small
enhancing core is not drowned by oedema; then one of its stored voxels), else a
background voxel anywhere in the brain box; the centre is then shifted so the
patch lies inside the box, and a box smaller than the patch is zero-padded
around its centre.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose
from torch.utils.data import Dataset, Sampler

from medseg.data.preprocessed import Store
from medseg.labels import labels_to_regions
from medseg.transforms import IMAGE, LABEL, SOFT

__all__ = ["Augmenter", "PatchDataset", "VolumeDataset", "EpochSampler", "patch_window", "sample_seed"]


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the `position`-th sample of an epoch (the same on every rank and
    worker count)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(position)]).generate_state(1)[0])


def patch_window(shape: Sequence[int], centre: Sequence[int], patch: Sequence[int]):
    """Source slices (in the volume) and target slices (in the patch) of a patch of
    size `patch` centred on `centre`, moved inside the volume; an axis shorter than
    the patch is read whole and placed in the middle (zero padding around it)."""
    src, dst = [], []
    for n, c, p in zip(shape, centre, patch):
        if n <= p:
            off = (p - n) // 2
            src.append(slice(0, n))
            dst.append(slice(off, off + n))
        else:
            start = min(max(int(c) - p // 2, 0), n - p)
            src.append(slice(start, start + p))
            dst.append(slice(0, p))
    return tuple(src), tuple(dst)


class Augmenter:
    """Augments raw patches and makes their TC/WT/ET targets, on whatever device
    the tensors are: in a loader worker (CPU), or batched on the training device
    (`data.augment=device`: the loader worker only reads the patch, ~0.03 s, and
    the GPU resamples and perturbs it in milliseconds). The sample's seed fixes
    every draw, so both places give the same augmentation (the same numbers on CPU)."""

    def __init__(self, augmentation: Compose | None, convention: str, soft_weight: float = 0.0,
                 task: str | None = None):
        self.augmentation = augmentation
        #: Distillation: the target is (1 - w) · regions + w · the teacher's probabilities.
        self.soft_weight = float(soft_weight)
        # label value → its membership of the task's output regions (labels_to_regions as a
        # lookup table, (R, 256); `task` None: TC/WT/ET, the convention's legacy task)
        self.lut = np.ascontiguousarray(labels_to_regions(np.arange(256), convention, task).astype(np.float32))
        self._lut_dev: dict[str, torch.Tensor] = {}

    def regions(self, label: torch.Tensor) -> torch.Tensor:
        """(*patch) uint8 label map → (3, *patch) float32 TC/WT/ET."""
        if label.device.type == "cpu":     # numpy's take on uint8 indices: 3× torch's gather here
            lab = label.numpy()
            return torch.from_numpy(np.stack([np.take(self.lut[r], lab) for r in range(len(self.lut))]))
        key = str(label.device)
        if key not in self._lut_dev:
            self._lut_dev[key] = torch.as_tensor(np.ascontiguousarray(self.lut.T), device=label.device)
        return self._lut_dev[key][label.long()].permute(3, 0, 1, 2)

    def one(self, image: torch.Tensor, label: torch.Tensor, seed: int, soft: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (4, *patch) (any float type), label (1, *patch) uint8 [, soft (3, *patch)
        teacher probabilities] → augmented image float32, target float32: the regions,
        or with `soft` the regions blended with the teacher's probabilities (moved with
        the image by the same draws)."""
        d = {IMAGE: image.float(), LABEL: label}
        if soft is not None:
            d[SOFT] = soft.float()
        if self.augmentation is not None:
            self.augmentation.set_random_state(seed=int(seed) % 2**32)
            track = get_track_meta()
            set_track_meta(False)        # plain tensors: no metadata bookkeeping per sample
            try:
                d = self.augmentation(d)
            finally:
                set_track_meta(track)
        regions = self.regions(torch.as_tensor(d[LABEL])[0])
        if soft is not None:
            w = self.soft_weight
            regions = (1.0 - w) * regions.to(d[SOFT].device) + w * torch.as_tensor(d[SOFT]).float().clamp(0, 1)
        return torch.as_tensor(d[IMAGE]).float().contiguous(), regions.contiguous()

    def batch(self, image: torch.Tensor, label: torch.Tensor, seeds: torch.Tensor,
              soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of raw patches from `PatchDataset(..., augment=False)`, already on
        the device → (B, 4, *patch) float32 images, (B, 3, *patch) float32 targets."""
        out = [self.one(image[b], label[b], int(seeds[b]), None if soft is None else soft[b])
               for b in range(image.shape[0])]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]).contiguous()


class PatchDataset(Dataset):
    """Training patches: ``dataset[(i, seed)]`` of case `case_ids[i]` → with `augment`
    (the default) {"image": (4, *patch) float32, "label": (3, *patch) float32
    TC/WT/ET}, augmented in the loader worker; without, the raw patch
    {"image": (4, *patch) float16 as stored, "label": (1, *patch) uint8 label map,
    "seed": the sample's seed} for `Augmenter.batch` on the training device."""

    def __init__(self, store: Store, case_ids: Sequence[str], patch: Sequence[int], pos: float, neg: float,
                 augmentation: Compose | None, augment: bool = True, soft=None, task: str | None = None):
        self.store, self.case_ids = store, list(case_ids)
        self.patch = tuple(int(p) for p in patch)
        self.p_pos = pos / (pos + neg) if pos + neg > 0 else 0.0
        #: `medseg.teacher.SoftTargets` (distillation) or None.
        self.soft = soft
        self.augmenter = Augmenter(augmentation, store.convention, soft.weight if soft is not None else 0.0, task)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.case_ids)

    def _centre(self, case_id: str, shape, label, rng: np.random.Generator):
        if rng.random() < self.p_pos:
            # read per sample (a few hundred kB), not kept: memory must not grow with the cases
            locs = self.store.locations(case_id)
        else:
            locs = np.zeros((0, 4), np.int16)
        if len(locs):
            classes = np.unique(locs[:, 0])
            rows = locs[locs[:, 0] == classes[rng.integers(len(classes))]]
            return rows[rng.integers(len(rows)), 1:]
        for _ in range(10):          # background: a voxel outside the tumour
            c = [int(rng.integers(n)) for n in shape]
            if label[tuple(c)] == 0:
                break
        return c

    def read(self, i: int, seed: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """The patch (image in `dtype`, None: as stored; label map uint8) before augmentation."""
        img, lab, _ = self._read(i, seed, dtype)
        return img, lab

    def _read(self, i: int, seed: int, dtype=np.float32):
        """`read` plus the teacher's (3, *patch) probabilities (float16) or None."""
        case_id = self.case_ids[i]
        rng = np.random.default_rng(seed)
        image, label = self.store.image(case_id), self.store.label(case_id)
        src, dst = patch_window(label.shape, self._centre(case_id, label.shape, label, rng), self.patch)
        img = np.zeros((image.shape[0], *self.patch), dtype or image.dtype)
        lab = np.zeros(self.patch, np.uint8)
        img[(slice(None), *dst)] = image[(slice(None), *src)]
        lab[dst] = label[src]
        soft = None
        if self.soft is not None:
            probs = self.soft.read(case_id)
            soft = np.zeros((probs.shape[0], *self.patch), probs.dtype)
            soft[(slice(None), *dst)] = probs[(slice(None), *src)]
            del probs
        del image, label            # unmap: only this patch was read
        return img, lab, soft

    def __getitem__(self, key) -> dict:
        i, seed = key
        if not self.augment:        # half the bytes to the training process and the device
            img, lab, soft = self._read(i, seed, dtype=None)
            out = {IMAGE: torch.from_numpy(img), LABEL: torch.from_numpy(lab[None]),
                   "seed": torch.tensor(seed, dtype=torch.int64)}
            if soft is not None:
                out[SOFT] = torch.from_numpy(soft)
            return out
        img, lab, soft = self._read(i, seed)
        image, regions = self.augmenter.one(torch.from_numpy(img), torch.from_numpy(lab[None]), seed,
                                            None if soft is None else torch.from_numpy(soft))
        return {IMAGE: image, LABEL: regions}


class VolumeDataset(Dataset):
    """Whole preprocessed cases for validation: ``dataset[i]`` → {"image": (4, X, Y, Z)
    float32, "label": (3, X, Y, Z) float32 TC/WT/ET}."""

    def __init__(self, store: Store, case_ids: Sequence[str], task: str | None = None):
        self.store, self.case_ids, self.task = store, list(case_ids), task

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> dict:
        case_id = self.case_ids[i]
        image = torch.from_numpy(np.asarray(self.store.image(case_id), dtype=np.float32))
        regions = labels_to_regions(self.store.label(case_id, mmap=False), self.store.convention, self.task)
        return {"id": case_id, IMAGE: image, LABEL: torch.from_numpy(regions.astype(np.float32))}


class EpochSampler(Sampler):
    """Yields this rank's ``(case index, seed)`` pairs of the current epoch: `count`
    per rank, drawn by walking seeded permutations of the `n` cases (every case once
    before any repeats), as the in-memory path's `_epoch_indices`. Call
    `set_epoch` before each epoch (the loader's workers persist)."""

    def __init__(self, n: int, count: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.count, self.seed, self.rank, self.world = n, count, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.count * self.world
        seq = np.concatenate([rng.permutation(self.n) for _ in range(math.ceil(total / self.n))])[:total]
        for pos in range(self.rank, total, self.world):
            yield int(seq[pos]), sample_seed(self.seed, self.epoch, pos)
