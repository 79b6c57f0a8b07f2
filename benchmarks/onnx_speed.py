"""Edge speed: seconds per BraTS-size case and peak memory for torch fp32, torch
bf16, onnxruntime fp32, fp16 and INT8, in one run, with mask agreement against
torch fp32.

    make demo                                  # trains runs/demo_cpu (default weights)
    python benchmarks/onnx_speed.py [--checkpoint PATH] [--cases 2]

The torch arms are `medseg predict`'s `Predictor` (MONAI preprocessing and
inversion). The ONNX arms are the torch-free `EdgePredictor` (numpy
preprocessing), on files written by `medseg export` (which verified them). Each
arm runs in its own process: its peak resident memory (VmHWM) is its own.
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

ARMS = ("torch_fp32", "torch_bf16", "ort_fp32", "ort_fp16", "ort_int8")


def _arm(args) -> dict:
    import numpy as np
    cases = json.loads(args.cases_json)
    if args.arm.startswith("torch"):
        from medseg.infer import Predictor
        pred = Predictor([args.checkpoint], amp=args.arm == "torch_bf16")
        run = lambda files: pred.labels(files, "brats2023")[0]  # noqa: E731
    else:
        from medseg.edge import EdgePredictor
        pred = EdgePredictor(Path(args.out) / f"{args.arm}.onnx")
        run = lambda files: pred.labels(files, "brats2023")[0]  # noqa: E731
    times = []
    for i, files in enumerate(cases):
        t = time.perf_counter()
        labels = run(files)
        times.append(time.perf_counter() - t)
        np.save(Path(args.out) / f"{args.arm}_{i}.npy", labels)
    return {"arm": args.arm, "s_per_case": sum(times) / len(times), "times": times,
            "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    args = case_benchmark_args(__doc__.split("\n")[0], ARMS)
    if args.arm:
        print(json.dumps(_arm(args)))
        return 0

    import numpy as np

    from medseg.export import export_onnx
    from medseg.metrics import dice
    with tempfile.TemporaryDirectory() as tmp:
        for prec in ("fp32", "fp16", "int8"):
            export_onnx([Path(args.checkpoint)], Path(tmp) / f"ort_{prec}.onnx", precision=prec,
                        print_fn=lambda s: print("export:", s))
        _, cases = brats_size_cases(tmp, args.cases)
        res = {}
        for arm in ARMS:
            r = run_case_arm(__file__, arm, args, cases, tmp)
            if r is not None:
                res[arm] = r
        ref = saved_regions(tmp, "torch_fp32", len(cases))
        print(f"{len(cases)} BraTS-size cases (4×240×240×155, 1 mm); checkpoint {args.checkpoint}")
        print(f"{'':12}{'s/case':>8}{'vs torch fp32':>15}{'peak RSS MB':>13}   mask Dice vs torch fp32 TC/WT/ET")
        base = res["torch_fp32"]["s_per_case"]
        for arm, r in res.items():
            got = saved_regions(tmp, arm, len(cases))
            d = [np.mean([dice(g[j], f[j]) for g, f in zip(got, ref)]) for j in range(3)]
            print(f"{arm:12}{r['s_per_case']:8.2f}{base / r['s_per_case']:14.2f}x{r['peak_rss_mb']:13.0f}   "
                  + "/".join(f"{v:.4f}" for v in d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
