"""The cheapest inference that keeps the accuracy: window overlap and mirror TTA for a
model, chosen on its out-of-fold cases.

    python benchmarks/student_inference.py --run runs/distill/student_kd
    python benchmarks/student_inference.py --run runs/distill/teacher --overlaps 0.5 0.25 --tta off

For every setting (overlap × TTA) each fold model of the cross-validation `--run`
predicts its own held-out cases end to end (four NIfTI files → mask file, torch
engine, the checkpoint's precision), and the masks are scored (Dice per region,
the run's rule set). Printed per setting: out-of-fold mean Dice per region, seconds
per case, and the paired difference to the most accurate setting with its 95 % BCa
bootstrap interval (case level, mean Dice over TC/WT/ET).

The choice: the fastest setting whose mean Dice is within `--tolerance` (0.005) of
the most accurate one. It is written to ``inference_choice.json`` in `--run` and,
when the run has a final model (``final/``, `medseg distill`), there too:
`medseg export` of that folder then records the overlap and the measurements in the
ONNX metadata (and uses the overlap unless --overlap is given). Window size and
spacing are the model's (its training patch and grid); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import paired_interval  # noqa: E402 (benchmarks/ is the script's folder)

REGIONS = ("TC", "WT", "ET")



def measure(run: Path, overlap: float, tta: bool, datalist: str, data_root: str, rules: str) -> dict:
    from medseg.evaluate import evaluate_case
    from medseg.predict import open_engine
    from medseg.train import fold_data
    cases, seconds = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for fold_dir in sorted(run.glob("fold_*")):
            k = int(fold_dir.name.split("_")[1])
            data = fold_data(datalist, data_root, k)
            eng = open_engine([fold_dir / "checkpoints" / "final.pt"], overlap=overlap, mirror=tta, device="cpu")
            for case in data.val:
                images = case["image"] if isinstance(case["image"], list) else [case["image"]]
                target = Path(tmp) / f"{case['id']}.nii.gz"
                t0 = time.perf_counter()
                eng.predict_case(images, target, data.convention, data.channels)
                seconds.append(time.perf_counter() - t0)
                scores = evaluate_case(target, case["label"], data.convention, rules)
                cases[case["id"]] = {r: float(scores[r]["dice"]) for r in REGIONS}
    return {"overlap": overlap, "tta": tta, "cases": cases, "s_per_case": float(np.median(seconds)),
            "dice": {r: float(np.nanmean([c[r] for c in cases.values()])) for r in REGIONS},
            "dice_mean": float(np.mean([np.nanmean(list(c.values())) for c in cases.values()]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a `medseg cv` (or `medseg distill`) folder")
    p.add_argument("--overlaps", type=float, nargs="+", default=[0.5, 0.25, 0.0])
    p.add_argument("--tta", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--tolerance", type=float, default=0.005, help="mean Dice a cheaper setting may lose")
    a = p.parse_args()
    run = Path(a.run)
    summary = json.loads((run / "cv_summary.json").read_text())
    datalist, data_root, rules = summary["datalist"], summary.get("data_root"), summary["rules"]
    if not data_root:
        raise SystemExit(f"{run}/cv_summary.json names no data root (written by an older medseg): rerun `medseg cv`")
    rows = []
    for tta in a.tta:
        for o in a.overlaps:
            r = measure(run, o, tta == "on", datalist, data_root, rules)
            print(f"overlap {o:.2f} tta {tta:>3}: mean Dice {r['dice_mean']:.4f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
                  + f"  {r['s_per_case']:.2f} s/case", flush=True)
            rows.append(r)
    best = max(rows, key=lambda r: r["dice_mean"])
    for r in rows:
        common = sorted(set(r["cases"]) & set(best["cases"]))
        diff = np.array([np.nanmean(list(r["cases"][c].values())) - np.nanmean(list(best["cases"][c].values()))
                         for c in common])
        r["delta_vs_best"], r["ci95"] = float(diff.mean()), list(paired_interval(diff))
    ok = [r for r in rows if r["dice_mean"] >= best["dice_mean"] - a.tolerance]
    choice = min(ok, key=lambda r: r["s_per_case"])
    lines = ["| overlap | TTA | Dice TC | Dice WT | Dice ET | mean Dice | Δ vs best [95 % CI] | s / case |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (chosen)" if r is choice else ""
        lines.append(f"| {r['overlap']:.2f}{mark} | {'on' if r['tta'] else 'off'} | "
                     + " | ".join(f"{r['dice'][k]:.3f}" for k in REGIONS)
                     + f" | {r['dice_mean']:.4f} | {r['delta_vs_best']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] "
                     f"| {r['s_per_case']:.2f} |")
    text = "\n".join(lines) + (f"\n\n{len(best['cases'])} out-of-fold cases of {run}; chosen: the fastest setting "
                               f"within {a.tolerance} mean Dice of the best (overlap {choice['overlap']}, TTA "
                               f"{'on' if choice['tta'] else 'off'})")
    print(text)
    record = {"overlap": choice["overlap"], "tta": choice["tta"], "tolerance": a.tolerance,
              "chosen_on": f"{len(best['cases'])} out-of-fold cases of {run.resolve()}",
              "measured": [{k: r[k] for k in ("overlap", "tta", "dice", "dice_mean", "delta_vs_best", "ci95",
                                              "s_per_case")} for r in rows]}
    for folder in [run] + ([run / "final"] if (run / "final" / "checkpoints" / "final.pt").is_file() else []):
        (folder / "inference_choice.json").write_text(json.dumps(record, indent=2) + "\n")
    (run / "inference_choice.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
