"""Uncertainty of `medseg predict --uncertainty`, measured on a cross-validation's
out-of-fold cases: which voxel map, which case score, which review threshold.

    flock /tmp/medseg-heavy.lock .venv/bin/python benchmarks/uncertainty.py --run runs/demo_cpu \
        --datalist data_lists/demo_brats2023.json --data-root demo_data/brats2023

Out of fold, a case has one model that never saw it (its fold's): the fold
ensemble is not available there, so the members are that model's 8 mirror
flips (`Predictor(mirror=True).uncertainty`, the real prediction path, with the
cv folder's post-processing). Per case and region it compares the candidate
voxel statistics (`medseg.uncertainty.STATISTICS`) and case scores
(`SCORES`, plus the probability-only soft Dice error as a baseline):

- case ranking: Spearman (scipy) between the case score and 1 − Dice, per
  region, and between the case score (mean or max over regions) and 1 − mean
  Dice;
- wrong voxels: AUROC (scikit-learn) of the voxel map for "mask ≠ reference",
  pooled over cases, in two zones: the brain (any modality non-zero) and the
  union of prediction and reference dilated by 3 voxels (where errors can be);
- the review threshold of medseg's statistic and score (`choose_threshold`:
  Youden's J for mean Dice < 0.8), in-sample and with the threshold chosen on
  the other folds (leave-one-fold-out: an honest sensitivity/specificity);
- seconds per case added by `--uncertainty`: `predict_case` vs
  `predict_case_uncertainty` with the fold ensemble on demo cases and with one
  checkpoint on BraTS-size cases (240×240×155, 1 mm), against plain prediction
  and against `--tta` (`--from-json` with `--time-cases` re-times only).

Prints tables and writes them as JSON (`--out`); `--write-calibration` stores the
threshold as ``<run>/uncertainty.json``, where `medseg predict` and `medseg export`
find it. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from medseg.data.io import load_array, write_json
from medseg.errors import MedsegError
from medseg.evaluate import load_regions
from medseg.infer import Predictor, predict_case, predict_case_uncertainty
from medseg.labels import REGIONS
from medseg.metrics import dice
from medseg.predict import default_postprocessing
from medseg.train import fold_data
from medseg.uncertainty import (CALIBRATION, CASE_SCORE, DICE_LEVEL, SCORE, SCORES, STATISTIC,
                                STATISTICS, case_score, choose_threshold, region_score)

ZONES = ("brain", "near")
BASELINE = "soft_dice_error"


def soft_dice_error(mask: np.ndarray, prob: np.ndarray) -> float:
    """1 − soft Dice between the mean probability and its own mask: the error a
    calibrated model expects, without any member spread."""
    den = float(prob.sum(dtype=np.float64)) + int(mask.sum())
    return 0.0 if den == 0 else 1.0 - 2.0 * float(prob[mask].sum(dtype=np.float64)) / den


def brain_mask(images: list[str]) -> np.ndarray:
    out = None
    for p in images:
        a = load_array(Path(p)) != 0
        a = a.any(-1) if a.ndim == 4 else a
        out = a if out is None else out | a
    return out


def oof_cases(run: Path, datalist: str, data_root: str, max_cases: int):
    """Yield (fold, case id, Predictor of that fold, images, channels, label file, convention)."""
    post = default_postprocessing([run])
    folds = sorted(run.glob("fold_*/checkpoints/final.pt"))
    if not folds:
        sys.exit(f"{run}: no fold_*/checkpoints/final.pt; run `medseg cv` first")
    for ckpt in folds:
        k = int(ckpt.parents[1].name.split("_")[1])
        data = fold_data(datalist, data_root, k)
        pred = Predictor([ckpt], mirror=True, et_min_ml=post.get("et_min_ml", 0.0))
        for case in data.val[:max_cases or None]:
            images = case["image"] if isinstance(case["image"], list) else [case["image"]]
            yield k, case["id"], pred, images, data.channels, case["label"], data.convention


def measure(args) -> dict:
    """Per-case scores and Dice, pooled voxel maps, for every out-of-fold case."""
    rows, voxels = [], {(r, s): [] for r in REGIONS for s in STATISTICS}
    wrong = {(r, z): [] for r in REGIONS for z in ZONES}
    t0 = time.perf_counter()
    for k, cid, pred, images, channels, label, conv in oof_cases(Path(args.run), args.datalist,
                                                                args.data_root, args.max_cases):
        probs, maps, ref = pred.uncertainty(images, channels, STATISTICS)
        regions, _, _ = pred.regions(probs, ref)
        gt, _, _ = load_regions(label, conv)
        brain = brain_mask(images)
        row = {"fold": k, "case": cid, "dice": {}, "scores": {}}
        for i, r in enumerate(REGIONS):
            row["dice"][r] = dice(regions[i], gt[i])
            sc = {f"{s}/{m}": region_score(maps[s][i], regions[i], probs[i], m)
                  for s in STATISTICS for m in SCORES}
            sc[BASELINE] = soft_dice_error(regions[i], probs[i])
            row["scores"][r] = sc
            near = ndimage.binary_dilation(regions[i] | gt[i], np.ones((3, 3, 3), bool), 3) & brain
            err = regions[i] != gt[i]
            wrong[(r, "brain")].append(err[brain])
            wrong[(r, "near")].append(near[brain])     # where, among brain voxels, "near" holds
            for s in STATISTICS:
                voxels[(r, s)].append(maps[s][i][brain].astype(np.float32))
        rows.append(row)
        print(f"  fold {k} {cid}: Dice " + " ".join(f"{r} {row['dice'][r]:.3f}" for r in REGIONS),
              file=sys.stderr)
    print(f"{len(rows)} out-of-fold cases predicted with 8 mirror members in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    auroc = {}
    for r in REGIONS:
        err = np.concatenate(wrong[(r, "brain")])
        near = np.concatenate(wrong[(r, "near")])
        for s in STATISTICS:
            u = np.concatenate(voxels[(r, s)])
            auroc[f"{r}/{s}/brain"] = float(roc_auc_score(err, u))
            auroc[f"{r}/{s}/near"] = float(roc_auc_score(err[near], u[near]))
            voxels[(r, s)] = None
        auroc[f"{r}/wrong_fraction/brain"] = float(err.mean())
        auroc[f"{r}/wrong_fraction/near"] = float(err[near].mean())
    return {"rows": rows, "auroc": auroc}


def case_tables(rows: list[dict]) -> dict:
    """Spearman of every case score against 1 − Dice (per region and for the case)."""
    methods = list(rows[0]["scores"][REGIONS[0]])
    out = {}
    for m in methods:
        for r in REGIONS:
            s = [row["scores"][r][m] for row in rows]
            e = [1 - row["dice"][r] for row in rows]
            out[f"{r}/{m}"] = float(spearmanr(s, e).statistic)
        err = [1 - np.mean([row["dice"][r] for r in REGIONS]) for row in rows]
        for agg, fn in (("mean", np.mean), ("max", np.max)):
            s = [fn([row["scores"][r][m] for r in REGIONS]) for row in rows]
            out[f"case_{agg}/{m}"] = float(spearmanr(s, err).statistic)
    return out


def score_of(row: dict, method: str = f"{STATISTIC}/{SCORE}") -> float:
    """medseg's case score (`CASE_SCORE`) of one benchmark row."""
    return case_score({r: row["scores"][r][method] for r in REGIONS})


def mean_dice(row: dict) -> float:
    return float(np.mean([row["dice"][r] for r in REGIONS]))


def thresholds(rows: list[dict], level: float) -> dict:
    """In-sample threshold, and leave-one-fold-out flags (threshold from the other folds)."""
    scores = np.array([score_of(r) for r in rows])
    dices = np.array([mean_dice(r) for r in rows])
    folds = np.array([r["fold"] for r in rows])
    chosen = choose_threshold(scores, dices, level)
    flagged = np.zeros(len(rows), bool)
    poor = dices < level
    try:
        for k in np.unique(folds):
            t = choose_threshold(scores[folds != k], dices[folds != k], level)["threshold"]
            flagged[folds == k] = scores[folds == k] >= t
        chosen["lofo_sensitivity"] = float((flagged & poor).sum() / max(poor.sum(), 1))
        chosen["lofo_specificity"] = float((~flagged & ~poor).sum() / max((~poor).sum(), 1))
        chosen["lofo_flagged"] = int(flagged.sum())
    except MedsegError as exc:      # some other-folds subset has only poor (or only good) cases
        print(f"leave-one-fold-out threshold not available: {exc}", file=sys.stderr)
        chosen.update(lofo_sensitivity=float("nan"), lofo_specificity=float("nan"), lofo_flagged=None)
    chosen["auroc_poor_cases"] = float(roc_auc_score(poor, scores))
    # For comparison: "poor" = any region below the level (the worst region decides).
    worst = np.array([min(r["dice"].values()) for r in rows])
    alt = choose_threshold(scores, worst, level)
    chosen["any_region"] = {**alt, "auroc_poor_cases": float(roc_auc_score(worst < level, scores))}
    return chosen


def timing(args) -> dict:
    """Seconds per case: plain, --tta, --uncertainty (median over cases)."""
    from medseg.data.discover import discover
    run = Path(args.run)
    ckpts = sorted(run.glob("fold_*/checkpoints/final.pt"))
    post = default_postprocessing([run])
    ds = discover(args.data_root)
    cases = ds.cases[:args.time_cases]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["demo"] = _time_arms(ckpts, [(c.case_id, c.images) for c in cases], Path(tmp), post,
                                 ds.layout.convention)
        if args.brats_cases:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _common import brats_size_cases
            found, _ = brats_size_cases(tmp, args.brats_cases)
            out["brats_size"] = _time_arms(ckpts[:1], [(c.case_id, c.images) for c in found],
                                           Path(tmp), post, "brats2023")
    return out


def _time_arms(ckpts, cases, tmp: Path, post: dict, conv: str) -> dict:
    arms = {"plain": Predictor(ckpts, et_min_ml=post.get("et_min_ml", 0.0)),
            "tta": Predictor(ckpts, mirror=True, et_min_ml=post.get("et_min_ml", 0.0))}
    secs = {"plain": [], "tta": [], "uncertainty": []}
    for cid, images in cases:
        for arm in ("plain", "tta", "uncertainty"):
            t = time.perf_counter()
            if arm == "uncertainty":
                predict_case_uncertainty(arms["tta"], images, conv, tmp / f"{cid}_u.nii.gz",
                                         tmp / f"{cid}_uncertainty.nii.gz")
            else:
                predict_case(arms[arm], images, conv, tmp / f"{cid}_{arm}.nii.gz")
            secs[arm].append(time.perf_counter() - t)
    med = {a: float(np.median(v)) for a, v in secs.items()}
    return {"models": len(ckpts), "cases": len(cases), "seconds_per_case": med,
            "added_vs_tta": med["uncertainty"] - med["tta"],
            "added_vs_plain": med["uncertainty"] - med["plain"]}


def report(res: dict) -> str:
    sp, au = res["spearman"], res["auroc"]
    methods = [f"{s}/{m}" for s in STATISTICS for m in SCORES] + [BASELINE]
    lines = ["Spearman(case score, 1 − Dice), out-of-fold:", "",
             "| statistic / case score | " + " | ".join(REGIONS) + " | case (mean) | case (max) |",
             "|---" * (len(REGIONS) + 3) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{sp[f'{r}/{m}']:.3f}" for r in REGIONS)
                     + f" | {sp[f'case_mean/{m}']:.3f} | {sp[f'case_max/{m}']:.3f} |")
    lines += ["", "Voxel AUROC for wrong voxels (pooled over cases; brain | dilated union of "
              "prediction and reference):", "",
              "| statistic | " + " | ".join(f"{r} brain | {r} near" for r in REGIONS) + " | mean |",
              "|---" * (2 * len(REGIONS) + 2) + "|"]
    for s in STATISTICS:
        vals = [au[f"{r}/{s}/{z}"] for r in REGIONS for z in ZONES]
        lines.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
    lines.append("| wrong voxels | " + " | ".join(f"{au[f'{r}/wrong_fraction/{z}']:.2%}"
                                                  for r in REGIONS for z in ZONES) + " | |")
    th = res["threshold"]
    lines += ["", f"review threshold ({STATISTIC}, case score {CASE_SCORE}; poor = mean "
              f"Dice < {th['level']}: {th['poor']} of {th['cases']} cases): {th['threshold']:.4f}; "
              f"in-sample sensitivity {th['sensitivity']:.2f}, specificity {th['specificity']:.2f} "
              f"(Youden's J {th['youden_j']:.2f}); threshold from the other folds: sensitivity "
              f"{th['lofo_sensitivity']:.2f}, specificity {th['lofo_specificity']:.2f}; case-score "
              f"AUROC for poor cases {th['auroc_poor_cases']:.3f}",
              f"(if poor = any region's Dice < {th['level']}: {th['any_region']['poor']} cases, threshold "
              f"{th['any_region']['threshold']:.4f}, sensitivity {th['any_region']['sensitivity']:.2f}, "
              f"specificity {th['any_region']['specificity']:.2f}, AUROC "
              f"{th['any_region']['auroc_poor_cases']:.3f})"]
    for name, t in res.get("timing", {}).items():
        s = t["seconds_per_case"]
        lines.append(f"seconds per case ({name}, {t['models']} model(s), {t['cases']} case(s), median): "
                     f"plain {s['plain']:.2f}, --tta {s['tta']:.2f}, --uncertainty {s['uncertainty']:.2f} "
                     f"(+{t['added_vs_tta']:.2f} s over --tta, +{t['added_vs_plain']:.2f} s over plain)")
    best_map = max(STATISTICS, key=lambda s: np.mean([au[f"{r}/{s}/{z}"] for r in REGIONS for z in ZONES]))
    best_map += f" (mean AUROC {np.mean([au[f'{r}/{best_map}/{z}'] for r in REGIONS for z in ZONES]):.4f})"
    best_case = max((f"case_{agg}/{m}" for agg in ("mean", "max") for m in methods), key=lambda k: sp[k])
    lines.append(f"best voxel map: {best_map}; best case score (Spearman with 1 − mean Dice): {best_case}; "
                 f"medseg uses {STATISTIC}, {CASE_SCORE}")
    return "\n".join(lines)


def finite(obj):
    """NaN (e.g. Spearman of a constant column) → None, so the JSON is standard."""
    if isinstance(obj, float):
        return None if np.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="cv folder (fold_*/checkpoints/final.pt)")
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--max-cases", type=int, default=0, help="per fold, for a quick look (0: all)")
    ap.add_argument("--time-cases", type=int, default=6, help="demo cases timed with the fold ensemble")
    ap.add_argument("--brats-cases", type=int, default=2,
                    help="also time this many BraTS-size cases with one checkpoint (0: none)")
    ap.add_argument("--level", type=float, default=DICE_LEVEL,
                    help="a case is poor when its mean Dice is below this")
    ap.add_argument("--write-calibration", action="store_true",
                    help=f"store the review threshold as <run>/{CALIBRATION}")
    ap.add_argument("--out", default="runs/uncertainty_benchmark.json")
    ap.add_argument("--from-json", help="reuse the per-case rows and AUROCs of an earlier --out "
                    "(no prediction): recompute the tables and the threshold")
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.from_json:
        old = json.loads(Path(a.from_json).read_text())
        res = {"rows": old["rows"], "auroc": old["auroc"]}
        if "timing" in old and not a.time_cases:
            res["timing"] = old["timing"]
    else:
        res = measure(a)
    res["spearman"] = case_tables(res["rows"])
    res["threshold"] = thresholds(res["rows"], a.level)
    res["mean_dice_tta"] = {r: float(np.mean([row["dice"][r] for row in res["rows"]])) for r in REGIONS}
    if a.time_cases:
        res["timing"] = timing(a)
    text = report(res)
    print(text)
    res["seconds"] = time.perf_counter() - t0
    out = Path(a.out)
    write_json(finite(res), out)
    out.with_suffix(".md").write_text(text + "\n")
    if a.write_calibration:
        th = res["threshold"]
        cal = {"statistic": STATISTIC, "case_score": CASE_SCORE,
               "threshold": th["threshold"], "level": th["level"], "youden_j": th["youden_j"],
               "sensitivity": th["sensitivity"], "specificity": th["specificity"],
               "lofo_sensitivity": th["lofo_sensitivity"], "lofo_specificity": th["lofo_specificity"],
               "poor": th["poor"], "cases": th["cases"], "members": 8,
               "chosen_on": f"{th['cases']} out-of-fold cases of {a.run}, each predicted by its own fold's "
                            "model with 8 mirror-flip members (benchmarks/uncertainty.py)",
               "spearman": {k: v for k, v in res["spearman"].items() if k.endswith(f"{STATISTIC}/{SCORE}")},
               "auroc": {k: v for k, v in res["auroc"].items() if f"/{STATISTIC}/" in k}}
        write_json(finite(cal), Path(a.run) / CALIBRATION)
        print(f"review threshold written to {Path(a.run) / CALIBRATION}")


if __name__ == "__main__":
    main()
