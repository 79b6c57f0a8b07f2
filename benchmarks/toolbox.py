"""The segmentation toolbox on one cross-validation: each loss, CRF and network
against the default recipe, same data, folds, seeds and training budget.

    python benchmarks/toolbox.py                              # every row, the cpu preset's budget
    python benchmarks/toolbox.py --epochs 6 --iters 8         # a smaller budget (say so when quoting it)
    python benchmarks/toolbox.py --rows default focal         # some rows
    python benchmarks/toolbox.py --folds 0 --epochs 8         # one fold's held-out cases

Rows (each a `medseg cv` of the demo's 5 folds with the ``cpu`` preset, one
after the other, in `--out`/<row>; an interrupted run resumes):

- ``default``: Dice + binary CE, `unet3d` (the recipe every other row is compared with);
- ``focal``: Focal loss alone (α 0.25, γ 2);
- ``dice_focal``: 0.7 × Dice + 0.3 × Focal;
- ``class_weighted_ce``: Dice + cross-entropy weighted per class from the training fold's label counts;
- ``crf``: no training: the default row's fold models predict their held-out cases again with
  ``--crf`` (3D dense CRF over the four modalities and the probabilities);
- ``attention_unet``, ``segresnet``, ``swinunetr``, ``deeplabv3plus``: the registry's other
  networks with their default arguments, same loss, budget and seeds (the patch is the preset's 48³
  rounded up to a multiple of the network's size divisor: 64³ for Swin UNETR).

Printed (and written to `--out`/toolbox.json and .md): per row the out-of-fold
mean Dice of TC, WT, ET with the 95 % paired bootstrap interval of the
difference to the default row (same cases), the mean HD95 and mean IoU over the
three regions, seconds per training iteration (median of the epochs without
validation) and parameters. Nothing is asserted: this measures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import cv_cases, paired_interval, train_stats  # noqa: E402 (benchmarks/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]

#: Row → `--set` overrides of the cpu preset.
ROWS: dict[str, list[str]] = {
    "default": [],
    "focal": ["train.loss.name=focal"],
    "dice_focal": ["train.loss.name=dice_focal", "train.loss.dice_weight=0.7", "train.loss.focal_weight=0.3"],
    "class_weighted_ce": ["train.loss.class_weights=log_inverse"],
    "crf": [],
    "attention_unet": ["model.name=attention_unet", "model.args={}"],
    "segresnet": ["model.name=segresnet", "model.args={}"],
    "swinunetr": ["model.name=swinunetr", "model.args={}"],
    "deeplabv3plus": ["model.name=deeplabv3plus", "model.args={}"],
}
REGIONS = ("TC", "WT", "ET")


def _patch(row: str, base: int) -> int:
    """The preset's patch rounded up to a multiple of the row's network's size divisor."""
    from medseg.models import size_divisor
    name = next((o.split("=", 1)[1] for o in ROWS[row] if o.startswith("model.name=")), "unet3d")
    div = size_divisor(name) if name != "unet3d" else size_divisor("unet3d", preset="cpu")
    return -(-base // div) * div


def _budget(a, row: str) -> list[str]:
    out = ["--preset", "cpu", "--set", f"seed={a.seed}"]
    if a.epochs:
        out += ["--set", f"train.epochs={a.epochs}", "--set", f"train.val_every={a.epochs}"]
    if a.iters:
        out += ["--set", f"train.iters_per_epoch={a.iters}"]
    p = _patch(row, 48)
    if p != 48:
        out += ["--set", f"train.patch=[{p},{p},{p}]"]
    for o in ROWS[row]:
        out += ["--set", o]
    for k in a.folds or ():
        out += ["--fold", str(k)]
    return out


def _cv(a, row: str) -> float:
    """Run (or resume) the row's cross-validation → seconds it took this time."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "medseg", "cv", "--datalist", a.datalist, "--data-root", a.data_root,
           "--out", str(Path(a.out) / row), *_budget(a, row)]
    print(f"[{row}] {' '.join(cmd[2:])}", flush=True)
    with open(Path(a.out) / f"{row}.log", "a") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"[{row}] medseg cv failed (exit {r.returncode}); see {Path(a.out) / f'{row}.log'}")
    return time.perf_counter() - t0


def _crf_row(a, params: dict) -> float:
    """The default row's fold models predict their held-out cases with the CRF → the
    row folder's ``cv_metrics.csv`` (same layout as `medseg cv`'s)."""
    from medseg.evaluate import evaluate_case, metric_rows, write_rows
    from medseg.predict import open_engine
    from medseg.train import fold_data
    t0 = time.perf_counter()
    base, out = Path(a.out) / "default", Path(a.out) / "crf"
    if (out / "cv_metrics.csv").exists():
        return 0.0
    rows = []
    for fold_dir in sorted(base.glob("fold_*")):
        k = int(fold_dir.name.split("_")[1])
        data = fold_data(a.datalist, a.data_root, k)
        engine = open_engine([fold_dir / "checkpoints" / "final.pt"], crf=params)
        for case in data.val:
            target = out / fold_dir.name / "predictions" / f"{case['id']}.nii.gz"
            images = case["image"] if isinstance(case["image"], list) else [case["image"]]
            engine.predict_case(images, target, data.convention, data.channels)
            rows += metric_rows(case["id"], evaluate_case(target, case["label"], data.convention), fold=k)
        print(f"[crf] fold {k}: {len(data.val)} cases", flush=True)
    write_rows(rows, out / "cv_metrics.csv")
    return time.perf_counter() - t0





def summarise(a) -> dict:
    base = cv_cases(Path(a.out) / "default")
    result = {}
    for row in a.rows:
        folder = Path(a.out) / row
        if not (folder / "cv_metrics.csv").exists():
            continue
        cases = cv_cases(folder)
        common = sorted(set(cases) & set(base))
        entry = {"cases": len(cases), "paired_cases": len(common)}
        for reg in REGIONS:
            d = np.array([float(cases[c][reg]["dice"]) for c in cases])
            entry[f"dice_{reg}"] = float(np.nanmean(d))
            diff = np.array([float(cases[c][reg]["dice"]) - float(base[c][reg]["dice"]) for c in common])
            diff = diff[~np.isnan(diff)]
            entry[f"delta_{reg}"] = float(diff.mean()) if len(diff) else float("nan")
            entry[f"delta_{reg}_ci95"] = list(paired_interval(diff)) if len(diff) else [float("nan")] * 2
        entry["hd95_mean"] = float(np.nanmean([float(cases[c][r]["hd95"]) for c in cases for r in REGIONS]))
        entry["iou_mean"] = float(np.nanmean([float(cases[c][r]["iou"]) for c in cases for r in REGIONS]))
        src = Path(a.out) / ("default" if row == "crf" else row)
        entry["s_per_iter"], entry["params_m"] = (None, train_stats(src)[1]) if row == "crf" else train_stats(src)
        result[row] = entry
    return result


def table(result: dict, a) -> str:
    lines = ["| row | Dice TC | Dice WT | Dice ET | Δ mean Dice vs default [95 % CI] per region (TC / WT / ET) "
             "| HD95 mm | mean IoU | s / iteration | parameters (M) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, e in result.items():
        delta = " / ".join(f"{e[f'delta_{r}']:+.3f} [{e[f'delta_{r}_ci95'][0]:+.3f}, {e[f'delta_{r}_ci95'][1]:+.3f}]"
                           for r in REGIONS) if row != "default" else "—"
        spi = f"{e['s_per_iter']:.2f}" if e["s_per_iter"] else "— (no training)"
        lines.append(f"| {row} | {e['dice_TC']:.3f} | {e['dice_WT']:.3f} | {e['dice_ET']:.3f} | {delta} | "
                     f"{e['hd95_mean']:.1f} | {e['iou_mean']:.3f} | {spi} | {e['params_m']:.2f} |")
    budget = (f"{a.epochs or 'preset'} epochs × {a.iters or 'preset'} iterations" if (a.epochs or a.iters)
              else "the cpu preset's budget (40 epochs × 16 iterations)")
    folds = f"folds {a.folds}" if a.folds else "every fold"
    return "\n".join(lines) + f"\n\n{budget}, batch 2, seed {a.seed}; out-of-fold cases of {folds}."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", default=str(REPO / "data_lists/demo_brats2023.json"))
    p.add_argument("--data-root", default=str(REPO / "demo_data/brats2023"))
    p.add_argument("--out", default=str(REPO / "runs/toolbox"))
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--epochs", type=int, help="training epochs per fold (default: the cpu preset's 40)")
    p.add_argument("--iters", type=int, help="iterations per epoch (default: the cpu preset's 16)")
    p.add_argument("--folds", type=int, nargs="+", help="train and score only these folds (default: all 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crf", default="", help="CRF parameters for the crf row, key=value,... (default: medseg's)")
    p.add_argument("--summary-only", action="store_true", help="only summarise the rows already run")
    a = p.parse_args()
    if not Path(a.datalist).is_file():
        raise SystemExit(f"{a.datalist} not found: run `make demo` first (or pass --datalist/--data-root)")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    seconds = {}
    if not a.summary_only:
        order = ["default"] + [r for r in a.rows if r != "default"]
        for row in order:
            if row == "crf":
                from medseg.crf import CRFParams
                seconds[row] = _crf_row(a, CRFParams.parse(a.crf or None))
            else:
                seconds[row] = _cv(a, row)
            print(f"[{row}] {seconds[row] / 60:.1f} min", flush=True)
    result = summarise(a)
    text = table(result, a)
    print(text)
    (Path(a.out) / "toolbox.md").write_text(text + "\n")
    (Path(a.out) / "toolbox.json").write_text(json.dumps(
        {"args": vars(a), "rows": result, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
