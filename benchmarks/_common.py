"""Helpers shared by the benchmarks: each arm runs in its own process, so that its
peak memory is its own."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB. Not `ru_maxrss`: Linux
    carries that over fork and exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_arm(script: str, arm: str, *args: str) -> dict | None:
    """Run `script --arm ARM ARGS…` in a fresh interpreter → the JSON dict it prints
    last, or None (with its stderr shown) when it fails."""
    r = subprocess.run([sys.executable, script, "--arm", arm, *args], capture_output=True, text=True)
    if r.returncode:
        print(f"{arm} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


REPO = Path(__file__).resolve().parents[1]
#: The weights `make demo` trains: the default of the inference benchmarks.
DEMO_CHECKPOINT = REPO / "runs/demo_cpu/fold_0/checkpoints/final.pt"


def case_benchmark_args(description: str, arms) -> argparse.Namespace:
    """Arguments of an inference benchmark over BraTS-size cases. The parent run
    takes --checkpoint and --cases; a child (--arm) also gets the case list and the
    folder to save its masks in. The parent exits 2 when the checkpoint is missing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--arm", choices=list(arms), help=argparse.SUPPRESS)
    p.add_argument("--cases-json", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.arm and not Path(args.checkpoint).is_file():
        print(f"{args.checkpoint} not found: run `make demo` first, or pass --checkpoint", file=sys.stderr)
        sys.exit(2)
    return args


def brats_size_cases(tmp: str | Path, n: int):
    """`n` synthetic BraTS-size cases (4×240×240×155, 1 mm, RAS) under `tmp`/data →
    (their `discover` cases, per case the list of its image files)."""
    from medseg.data.discover import discover
    from medseg.data.synth import synthesize
    root = Path(tmp) / "data"
    synthesize(root, n, "brats2023", 7, (240, 240, 155), geometry_variation=False)
    found = discover(root).cases
    return found, [[str(f) for f in c.images] for c in found]


def run_case_arm(script: str, arm: str, args, cases, tmp) -> dict | None:
    """One arm of an inference benchmark in its own process (masks saved in `tmp`)."""
    return run_arm(script, arm, "--checkpoint", args.checkpoint, "--cases-json", json.dumps(cases),
                   "--out", str(tmp))


def saved_regions(tmp, arm: str, n: int) -> list:
    """The masks an arm saved, as (3, X, Y, Z) TC/WT/ET region arrays."""
    import numpy as np

    from medseg.labels import labels_to_regions
    return [labels_to_regions(np.load(Path(tmp) / f"{arm}_{i}.npy"), "brats2023") for i in range(n)]


def augmentation_costs(store, case_ids, patch, n_samples: int, device: str = "cpu", seed: int = 0,
                       batch: int = 2) -> dict:
    """Seconds per training sample (full augmentation, `patch` voxels) from the
    preprocessed `store`, three ways, in this process with 1 CPU thread:
    ``worker_s``: made whole in a loader worker (read, augment, regions);
    ``worker_raw_s``: what a worker does when augmentation runs on the device
    (read the raw patch); ``device_s``: `Augmenter.batch` on `device` per sample
    (batches of `batch`, timed after the copy to the device, synchronised)."""
    import torch
    from monai.data import get_track_meta, set_track_meta
    threads, track = torch.get_num_threads(), get_track_meta()
    torch.set_num_threads(1)
    set_track_meta(False)
    try:
        return _augmentation_costs(store, case_ids, patch, n_samples, device, seed, batch)
    finally:
        torch.set_num_threads(threads)
        set_track_meta(track)


def _augmentation_costs(store, case_ids, patch, n_samples, device, seed, batch) -> dict:
    import torch
    from medseg.data.patches import PatchDataset
    from medseg.transforms import IMAGE, LABEL, patch_augmentation
    ids = list(case_ids)
    worker = PatchDataset(store, ids, patch, 2.0, 1.0, patch_augmentation(0.0))
    raw = PatchDataset(store, ids, patch, 2.0, 1.0, patch_augmentation(0.0), augment=False)
    keys = [(k % len(ids), seed * 100_000 + k) for k in range(n_samples)]
    worker[keys[0]], raw[keys[0]]           # warm-up (first map of the files)
    t0 = time.perf_counter()
    for k in keys:
        worker[k]
    worker_s = (time.perf_counter() - t0) / n_samples
    t0 = time.perf_counter()
    items = [raw[k] for k in keys]
    raw_s = (time.perf_counter() - t0) / n_samples
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = [{key: torch.stack([it[key] for it in items[i:i + batch]]).to(dev)
                for key in (IMAGE, LABEL, "seed")} for i in range(0, n_samples - batch + 1, batch)]
    raw.augmenter.batch(batches[0][IMAGE], batches[0][LABEL], batches[0]["seed"].cpu())   # warm-up
    sync()
    t0 = time.perf_counter()
    for b in batches:
        raw.augmenter.batch(b[IMAGE], b[LABEL], b["seed"].cpu())
    sync()
    device_s = (time.perf_counter() - t0) / (len(batches) * batch)
    return {"worker_s": worker_s, "worker_raw_s": raw_s, "device_s": device_s, "device": str(dev),
            "samples": n_samples}


def monai_transforms(channels, convention: str, spacing, patch, training: bool = True):
    """The standard MONAI way (the MONAI BraTS tutorial's chain): load, channel-first,
    RAS, Spacingd, brain crop, NormalizeIntensityd, regions; for training, pad,
    RandCropByPosNegLabeld (2:1) and MONAI's random rotation, zoom, flips, intensity
    scale/shift, contrast and noise, with the probabilities of medseg's augmentation."""
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped, LoadImaged,
                                  NormalizeIntensityd, Orientationd, RandAdjustContrastd,
                                  RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised, RandRotated,
                                  RandScaleIntensityd, RandShiftIntensityd, RandZoomd, Spacingd, SpatialPadd)
    import torch
    from medseg.transforms import LabelsToRegionsd
    from medseg.labels import CHANNELS
    if list(channels) != list(CHANNELS):
        raise SystemExit(f"the baseline reads channels in {CHANNELS} order, the data has {channels}")
    keys = ["image", "label"]
    steps = [LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys),
             Orientationd(keys, axcodes="RAS"), Spacingd(keys, pixdim=tuple(spacing), mode=("bilinear", "nearest")),
             CropForegroundd(keys, source_key="image", select_fn=lambda x: x > 0, allow_smaller=True),
             NormalizeIntensityd("image", nonzero=True, channel_wise=True), LabelsToRegionsd("label", convention),
             EnsureTyped(keys, dtype=torch.float32)]
    if training:
        steps += [SpatialPadd(keys, spatial_size=tuple(patch)),
                  RandCropByPosNegLabeld(keys, label_key="label", spatial_size=tuple(patch), pos=2, neg=1,
                                         num_samples=1, allow_smaller=True),
                  RandRotated(keys, range_x=0.26, range_y=0.26, range_z=0.26, prob=0.2,
                              mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True),
                  RandZoomd(keys, min_zoom=0.85, max_zoom=1.15, prob=0.2, mode=("trilinear", "nearest-exact"),
                            keep_size=True),
                  *[RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)],
                  RandScaleIntensityd("image", factors=0.1, prob=0.5),
                  RandShiftIntensityd("image", offsets=0.1, prob=0.5),
                  RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
                  RandGaussianNoised("image", std=0.05, prob=0.15)]
    return Compose(steps)


def cv_cases(folder: Path) -> dict[str, dict[str, dict]]:
    """A cross-validation's ``cv_metrics.csv`` → {case: {region: row}}."""
    from medseg.evaluate import read_rows
    out: dict[str, dict[str, dict]] = {}
    for r in read_rows(Path(folder) / "cv_metrics.csv"):
        out.setdefault(r["case"], {})[r["region"]] = r
    return out


def paired_interval(diff) -> tuple[float, float]:
    """95 % BCa bootstrap interval (scipy, 10 000 resamples, seeded) of the mean of
    paired case-level differences."""
    import numpy as np
    from scipy.stats import bootstrap
    diff = np.asarray(diff, dtype=float)
    if len(diff) < 2 or np.allclose(diff, diff[0]):
        return float(diff.mean()), float(diff.mean())
    ci = bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=10000, random_state=0).confidence_interval
    return float(ci.low), float(ci.high)


def train_stats(folder: Path) -> tuple[float | None, float | None]:
    """A cross-validation's (median seconds per iteration over the epochs without
    validation, parameters in M); (None, None) when it has no config.json yet."""
    import csv

    import numpy as np

    from medseg.config import load_config
    from medseg.train import build_network
    if not (Path(folder) / "config.json").exists():
        return None, None
    cfg = load_config(Path(folder) / "config.json")
    secs = []
    for log in Path(folder).glob("fold_*/log.csv"):
        for r in csv.DictReader(log.open()):
            if not r.get("dice_mean"):
                secs.append(float(r["seconds"]) / cfg["train"]["iters_per_epoch"])
    params = sum(p.numel() for p in build_network(cfg).parameters()) / 1e6
    return (float(np.median(secs)) if secs else None), params
