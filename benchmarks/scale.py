"""BraTS at real scale: the preprocessed, memory-mapped dataset against the
standard MONAI way (a CacheDataset holding every preprocessed case in memory,
MONAI transforms for patch sampling and augmentation), in one run.

    python benchmarks/scale.py                        # N = 8 and 32 BraTS-size cases
    python benchmarks/scale.py --cases 4 8 --train-iters 1 --model-preset cpu   # quicker look

On N synthetic BraTS-size cases (240×240×155, 1 mm, the full preset's spacing
and 128³ patches) it measures:

1. **Preprocessing**: seconds per case (wall clock with --jobs processes, and
   CPU seconds of one process), disk bytes per case; the in-memory cache's bytes
   per case (float32 image + region channels as CacheDataset holds them) beside.
2. **Peak resident memory of training** (a few iterations, no loader workers so
   that one process holds everything) for each N and each path: `medseg train`,
   and the same network trained from a MONAI CacheDataset (`monai_train`). The
   preprocessed path should not grow with N; the in-memory one does.
3. **Seconds of one core per 128³ sample** with the full augmentation, as a
   loader worker makes it: from the in-memory cached item (MONAI
   RandCropByPosNegLabeld → rotate → zoom → flips → intensity, on the whole
   cached volume); from the preprocessed store augmented in the worker (read the
   patch, one-resampling rotate+zoom, flips, intensity: `data.augment=worker`,
   CPU training); and from the store when augmentation runs on the training
   device (`data.augment=auto` on a GPU: the worker only reads the raw patch).
   The device-side augmentation is also timed with this CPU as the device (an
   upper bound; `benchmarks/gpu_check.sh` times it on a GPU).

Then a projection for BraTS 2021 (1,251 cases): disk, RAM per training process,
and hours of sample making per epoch (250 iterations × batch 2) for 1–16 workers.
Each training arm runs in its own process. Nothing is asserted: this measures.
The `--model-preset` default is the full preset's network; `cpu` swaps in the
small one (the data path is the same) when a full-size CPU step is too slow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BRATS21 = 1251


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (MB)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024.0
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            pass
    return total


def monai_train(datalist: Path, root: Path, iters: int, model_preset: str) -> None:
    """The baseline training process: every case of `datalist` in a MONAI CacheDataset
    (the deterministic part of `monai_transforms` cached), `iters` iterations of the
    full preset's loss and optimiser on the same network, no workers."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from medseg.config import resolve_config
    from medseg.train import build_criterion, build_network, build_optimizer, fold_data
    cfg = resolve_config("full", [] if model_preset == "full" else [f"model.args.preset={model_preset}"])
    data = fold_data(datalist, root, None)
    from _common import monai_transforms
    tf = monai_transforms(data.channels, data.convention, cfg["data"]["spacing"], cfg["train"]["patch"])
    ds = CacheDataset(data.train, tf, num_workers=1, progress=False)
    loader = DataLoader(ds, batch_size=cfg["train"]["batch_size"], shuffle=True, num_workers=0)
    model, loss_fn = build_network(cfg, training=True), build_criterion(cfg)
    opt = build_optimizer(model.parameters(), cfg)
    done = 0
    while done < iters:
        for batch in loader:
            out = model(batch["image"])
            preds = list(torch.unbind(out, 1)) if out.ndim == 6 else out
            loss = loss_fn(preds, batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= iters:
                break


def _train_peak(datalist: Path, root: Path, out: Path, cache: str, iters: int, model_preset: str,
                store: Path) -> dict:
    """Run `medseg train` (full preset; `cache` "preprocessed") or the MONAI baseline
    (`cache` "memory": `monai_train`) on every case of `datalist`; sample its
    resident memory every 50 ms → peak MB and seconds."""
    sets = ["data.num_workers=0", "train.epochs=1", f"train.iters_per_epoch={iters}",
            "train.val_every=1000"]
    if model_preset != "full":
        sets.append(f"model.args.preset={model_preset}")
    cmd = [sys.executable, "-m", "medseg", "train", "--datalist", str(datalist), "--data-root", str(root),
           "--out", str(out), "--preset", "full", "--device", "cpu", "--cache-dir", str(store),
           *[f"--set={s}" for s in sets]]
    if cache == "memory":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--monai-train", str(datalist), str(root),
               str(iters), model_preset]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            time.sleep(0.05)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    log = proc.communicate()[0]
    th.join()
    if proc.returncode:
        sys.exit(f"medseg train ({cache}) failed:\n{log[-3000:]}")
    return {"peak_rss_mb": peak[0], "seconds": time.perf_counter() - t0}


def _sub_datalist(full: dict, n: int, target: Path) -> Path:
    dl = dict(full, training=full["training"][:n])
    target.write_text(json.dumps(dl))
    return target


def _memory_item_bytes(case: dict, channels, convention, spacing) -> int:
    """Bytes CacheDataset holds for one training case: the deterministic part of the
    baseline's training transforms (preprocessing + pad), float32 image + region channels."""
    from medseg.config import resolve_config
    from monai.transforms import Randomizable
    from _common import monai_transforms
    cfg = resolve_config("full")
    tf = monai_transforms(channels, convention, spacing, cfg["train"]["patch"])
    d = {"image": case["image"], "label": case["label"]}
    for t in tf.flatten().transforms:
        if isinstance(t, Randomizable):
            break
        d = t(d)
    return int(d["image"].numel() * 4 + d["label"].numel() * 4)


def _sample_rates(cases: list[dict], channels, convention, store, n_samples: int, seed: int = 0) -> dict:
    """Seconds per 128³ training sample made by one thread, both paths."""
    import torch
    from medseg.config import resolve_config
    from monai.transforms import Compose, Randomizable
    torch.set_num_threads(1)
    cfg = resolve_config("full")
    patch = cfg["train"]["patch"]
    # in-memory path: the cached items, then the random part per sample (as a loader worker)
    from _common import monai_transforms
    tf = monai_transforms(channels, convention, cfg["data"]["spacing"], patch).flatten().transforms
    first = next(i for i, t in enumerate(tf) if isinstance(t, Randomizable))
    cached = []
    for c in cases[:2]:
        d = {"image": c["image"], "label": c["label"]}
        for t in tf[:first]:
            d = t(d)
        cached.append(d)
    rand = Compose(tf[first:])
    rand.set_random_state(seed)
    t0 = time.perf_counter()
    for k in range(n_samples):
        out = rand(dict(cached[k % len(cached)]))
        out = out[0] if isinstance(out, list) else out
        assert tuple(out["image"].shape[1:]) == tuple(patch)
    memory = (time.perf_counter() - t0) / n_samples
    # the preprocessed path: augmented in a loader worker, or on the device (the worker reads)
    from _common import augmentation_costs
    pre = augmentation_costs(store, [c["id"] for c in cases[:2]], patch, n_samples, "cpu", seed)
    return {"memory_s_per_sample": memory, "preprocessed_s_per_sample": pre["worker_s"],
            "preprocessed_raw_s_per_sample": pre["worker_raw_s"], "device_aug_s_per_sample_on_cpu": pre["device_s"]}


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--monai-train":     # the baseline's own process
        monai_train(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, nargs="+", default=[8, 32], help="dataset sizes N")
    ap.add_argument("--work", help="folder for data and runs (default: a temporary folder)")
    ap.add_argument("--jobs", type=int, default=None, help="preprocessing processes (default: CPU count)")
    ap.add_argument("--train-iters", type=int, default=2)
    ap.add_argument("--model-preset", default="full", choices=["full", "cpu"])
    ap.add_argument("--samples", type=int, default=12, help="samples timed per path")
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155],
                    help="synthetic grid over the 240x240x155 mm field (default: BraTS 1 mm)")
    ap.add_argument("--skip-memory-path", action="store_true", help="train only the preprocessed path, "
                    "not the MONAI CacheDataset baseline")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="medseg_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    n_max = max(a.cases)

    from medseg.data.discover import discover, resolve_convention
    from medseg.data.folds import build_datalist, write_datalist
    from medseg.data.synth import synthesize
    from medseg.train import fold_data
    root = work / "data"
    if not (root.exists() and len(list(root.iterdir())) >= n_max):
        t0 = time.perf_counter()
        synthesize(root, n_max, "brats2023", 7, tuple(a.shape))
        print(f"synthesized {n_max} cases of {a.shape} in {time.perf_counter() - t0:.0f} s", flush=True)
    ds = discover(root)
    conv, scans = resolve_convention(ds)
    full_dl = work / "all.json"
    write_datalist(build_datalist(ds, conv, scans, 2, 0, "scale"), full_dl)
    data = fold_data(full_dl, root, None)
    cases = sorted(data.train, key=lambda c: c["id"])

    # 1. preprocessing
    from medseg.data.preprocessed import ensure_store
    from medseg.config import resolve_config
    spacing = resolve_config("full")["data"]["spacing"]
    store_root = work / "preprocessed"
    import shutil
    shutil.rmtree(store_root, ignore_errors=True)
    jobs = a.jobs or min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    store = ensure_store(cases, store_root, spacing, data.channels, data.convention, jobs=jobs,
                         print_fn=lambda s: None)
    wall = time.perf_counter() - t0
    entries = [json.loads((store.path / c["id"] / "entry.json").read_text()) for c in cases]
    cpu_s = float(np.mean([e["seconds"] for e in entries]))
    disk = float(np.mean([sum(f["bytes"] for f in e["files"].values()) for e in entries]))
    mem_item = float(np.mean([_memory_item_bytes(c, data.channels, data.convention, spacing) for c in cases[:2]]))
    src = float(np.mean([sum(os.path.getsize(f) for f in c["image"] + [c["label"]]) for c in cases]))
    print(f"\npreprocessing {len(cases)} cases: {wall / len(cases):.2f} s per case wall clock with {jobs} "
          f"process(es), {cpu_s:.2f} s of one process per case", flush=True)
    print(f"bytes per case: preprocessed {disk / 1e6:.1f} MB on disk (memory-mapped); in-memory cache "
          f"{mem_item / 1e6:.1f} MB of RAM per process; source .nii.gz {src / 1e6:.1f} MB")

    # 2. peak resident memory of training
    print("\npeak resident memory of `medseg train` (full preset data: 1 mm, 128³ patches; "
          f"network: {a.model_preset} preset; {a.train_iters} iterations):", flush=True)
    full = json.loads(full_dl.read_text())
    peaks = {}
    for cache in ["preprocessed"] + ([] if a.skip_memory_path else ["memory"]):
        for n in a.cases:
            dl = _sub_datalist(full, n, work / f"n{n}.json")
            r = _train_peak(dl, root, work / f"run_{cache}_{n}", cache, a.train_iters, a.model_preset,
                            store_root)
            shutil.rmtree(work / f"run_{cache}_{n}", ignore_errors=True)
            peaks[(cache, n)] = r
            print(f"  {cache:>12}  N={n:<3} peak {r['peak_rss_mb']:8.0f} MB  ({r['seconds']:.0f} s)", flush=True)
    lo, hi = min(a.cases), max(a.cases)
    ratios = {}
    for cache in ("preprocessed", "memory"):
        if (cache, lo) in peaks:
            ratios[cache] = peaks[(cache, hi)]["peak_rss_mb"] / peaks[(cache, lo)]["peak_rss_mb"]
            print(f"  {cache}: peak at N={hi} / N={lo} = {ratios[cache]:.2f}")

    # 3. samples per second per worker
    rates = _sample_rates(cases, data.channels, data.convention, store, a.samples)
    speedup = rates["memory_s_per_sample"] / rates["preprocessed_s_per_sample"]
    speedup_dev = rates["memory_s_per_sample"] / rates["preprocessed_raw_s_per_sample"]
    print("\none loader worker (1 thread), 128³ samples with full augmentation, seconds of one core per sample:")
    print(f"  in-memory path (MONAI transforms on the cached case)     {rates['memory_s_per_sample']:.3f} s "
          f"({1 / rates['memory_s_per_sample']:.1f}/s)")
    print(f"  preprocessed, augmented in the worker (data.augment=worker, CPU training) "
          f"{rates['preprocessed_s_per_sample']:.3f} s: {speedup:.1f}x faster")
    print(f"  preprocessed, augmented on the device (data.augment=auto on a GPU): the worker reads "
          f"{rates['preprocessed_raw_s_per_sample']:.3f} s: {speedup_dev:.1f}x faster")
    print(f"  (that augmentation, run here on this CPU as the device, 1 thread: "
          f"{rates['device_aug_s_per_sample_on_cpu']:.3f} s per sample; on a GPU: benchmarks/gpu_check.sh)",
          flush=True)

    # projection
    per_epoch = 250 * 2
    base_rss = peaks.get(("preprocessed", hi), {}).get("peak_rss_mb", float("nan"))
    print(f"\nprojection for BraTS 2021 ({BRATS21} cases, full preset):")
    print(f"  disk: preprocessed {disk * BRATS21 / 1e9:.0f} GB once per experiment; the in-memory cache "
          f"{mem_item * BRATS21 / 1e9:.0f} GB of RAM in every training process (each fold of "
          "`cv --devices`, each DDP rank)")
    print(f"  RAM per training process: preprocessed ≈ {base_rss / 1e3:.1f} GB whatever N (measured at N={hi}); "
          f"in-memory ≈ {mem_item * BRATS21 / 1e9:.0f} GB + the same")
    print("  hours of sample making per epoch (250 iterations x batch 2), per worker count "
          "(a GPU step of about 0.1-0.2 s needs the loader to make a batch in that time):")
    print("  workers " + " ".join(f"{w:>7}" for w in (1, 2, 4, 8, 16)))
    for name, key in (("memory", "memory_s_per_sample"), ("worker", "preprocessed_s_per_sample"),
                      ("device", "preprocessed_raw_s_per_sample")):
        print(f"  {name:>7} " + " ".join(f"{per_epoch * rates[key] / w / 3600:7.3f}" for w in (1, 2, 4, 8, 16)))
    out = work / "scale.json"
    out.write_text(json.dumps({
        "cases": a.cases, "preprocess_wall_s_per_case": wall / len(cases), "preprocess_cpu_s_per_case": cpu_s,
        "jobs": jobs, "disk_bytes_per_case": disk, "memory_cache_bytes_per_case": mem_item,
        "peaks": {f"{c}_{n}": v for (c, n), v in peaks.items()}, "peak_ratio_hi_lo": ratios,
        "rates": rates, "speedup": speedup, "speedup_device_augmentation": speedup_dev,
        "model_preset": a.model_preset}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
