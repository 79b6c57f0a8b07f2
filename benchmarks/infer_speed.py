"""Inference speed: `medseg predict` vs MONAI's `sliding_window_inference` used as in
the MONAI BraTS tutorial, same weights, on BraTS-size cases (4×240×240×155, 1 mm).

    make demo                                   # trains runs/demo_cpu (the default weights)
    python benchmarks/infer_speed.py [--checkpoint PATH] [--cases 2]

- **baseline** (tutorial): LoadImaged → channel-first → RAS → Spacingd →
  NormalizeIntensityd(nonzero, channel-wise) on the whole volume, then
  `sliding_window_inference(roi, sw_batch_size=1, overlap=0.5)` with constant
  blending, fp32; probabilities inverted to the input grid with `Invertd`.
- **medseg**: `Predictor` (windows over the brain box only, Gaussian blending,
  bf16 autocast, the checkpoint's overlap and window batch), the same inversion; and **medseg_fp32**, the same without autocast, to
separate the bf16 effect from the pipeline's.

Each arm runs in its own process (peak memory is its own). Printed per arm:
seconds per case, peak RSS, windows evaluated, achieved GFLOP/s against the
matmul peak measured in the same run, and Dice against the synthetic ground
truth; then the speed-ups and the Dice agreement between arms per region.
Nothing is asserted.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from _common import (brats_size_cases, case_benchmark_args, peak_rss_mb,  # noqa: E402
                     run_case_arm, saved_regions)  # (benchmarks/ is the script's folder)


def matmul_peak_gflops(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    import torch
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


class _Counting:
    """Wraps a network: counts windows (batch items) that pass through it."""

    def __init__(self, model):
        self.model, self.windows = model, 0

    def __call__(self, x):
        self.windows += x.shape[0]
        return self.model(x)

    def eval(self):
        self.model.eval()
        return self


def _window_gflop(model, roi) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 4, *roi))
    return fc.get_total_flops() / 1e9


def _arm(args) -> dict:
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (Compose, EnsureChannelFirstd, Invertd, LoadImaged,
                                  NormalizeIntensityd, Orientationd, Spacingd)

    from medseg.infer import Predictor, load_model
    from medseg.labels import regions_to_labels

    cases = json.loads(args.cases_json)
    out = Path(args.out)
    model, meta = load_model(args.checkpoint)
    roi = meta["roi"]
    gflop_window = _window_gflop(model, roi)
    times, windows = [], 0
    if args.arm in ("medseg", "medseg_fp32"):
        pred = Predictor([args.checkpoint], amp=args.arm == "medseg")
        counter = _Counting(pred.models[0])
        pred.models = [counter]
        for i, files in enumerate(cases):
            t = time.perf_counter()
            labels, ref = pred.labels(files, "brats2023")
            times.append(time.perf_counter() - t)
            np.save(out / f"{args.arm}_{i}.npy", labels)
        windows = counter.windows
    else:
        pre = Compose([
            LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=meta["spacing"]),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True)])
        counter = _Counting(model)
        for i, files in enumerate(cases):
            t = time.perf_counter()
            d = pre({"image": files})
            with torch.no_grad():
                logits = sliding_window_inference(d["image"].unsqueeze(0), roi, 1, counter, overlap=0.5)
            probs = torch.sigmoid(torch.as_tensor(logits))[0]
            pm = MetaTensor(probs, meta=d["image"].meta, applied_operations=d["image"].applied_operations)
            inv = Invertd("pred", pre, orig_keys="image", nearest_interp=False)({"pred": pm, "image": d["image"]})
            labels = regions_to_labels(np.asarray(inv["pred"]) > 0.5, "brats2023")
            times.append(time.perf_counter() - t)
            np.save(out / f"baseline_{i}.npy", labels)
        windows = counter.windows
    total = sum(times)
    return {"arm": args.arm, "s_per_case": total / len(cases), "times": times,
            "windows_per_case": windows / len(cases), "gflop_per_window": gflop_window,
            "gflops": windows * gflop_window / total, "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    args = case_benchmark_args(__doc__.split("\n")[0], ("medseg", "medseg_fp32", "baseline"))
    if args.arm:
        print(json.dumps(_arm(args)))
        return 0

    import nibabel as nib
    import numpy as np

    from medseg.labels import labels_to_regions
    from medseg.metrics import dice
    with tempfile.TemporaryDirectory() as tmp:
        found, cases = brats_size_cases(tmp, args.cases)
        res = {}
        arms = ("baseline", "medseg_fp32", "medseg")
        for arm in arms:
            res[arm] = run_case_arm(__file__, arm, args, cases, tmp)
            if res[arm] is None:
                return 1
        regions = ("TC", "WT", "ET")
        masks = {a: saved_regions(tmp, a, len(cases)) for a in arms}
        truth = [labels_to_regions(np.asarray(nib.load(c.label).dataobj), "brats2023") for c in found]

        def mean_dice(x, y):
            return {k: float(np.mean([dice(a[j], b[j]) for a, b in zip(x, y)]))
                    for j, k in enumerate(regions)}
        vs_truth = {a: mean_dice(masks[a], truth) for a in arms}
        agree = mean_dice(masks["baseline"], masks["medseg"])
        agree_bf16 = mean_dice(masks["medseg_fp32"], masks["medseg"])
    peak32, peak16 = matmul_peak_gflops("float32"), matmul_peak_gflops("bfloat16")
    print(f"{len(cases)} BraTS-size cases (4×240×240×155, 1 mm); checkpoint {args.checkpoint}")
    print(f"matmul peak on this machine: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    print(f"{'':12}{'s/case':>8}{'windows':>9}{'GFLOP/s':>9}{'% peak':>8}{'peak RSS MB':>13}"
          "   Dice vs truth TC/WT/ET")
    for arm, peak in (("baseline", peak32), ("medseg_fp32", peak32), ("medseg", peak16)):
        r = res[arm]
        print(f"{arm:12}{r['s_per_case']:8.2f}{r['windows_per_case']:9.0f}{r['gflops']:9.0f}"
              f"{100 * r['gflops'] / peak:7.0f}%{r['peak_rss_mb']:13.0f}   "
              + "/".join(f"{vs_truth[arm][k]:.3f}" for k in regions))
    fmt = ", ".join
    print(f"speed-up medseg vs baseline: {res['baseline']['s_per_case'] / res['medseg']['s_per_case']:.2f}x "
          f"(bf16 alone: {res['medseg_fp32']['s_per_case'] / res['medseg']['s_per_case']:.2f}x)")
    print("mask Dice agreement medseg vs baseline: " + fmt(f"{k} {v:.4f}" for k, v in agree.items()))
    print("mask Dice agreement medseg bf16 vs fp32: " + fmt(f"{k} {v:.4f}" for k, v in agree_bf16.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
