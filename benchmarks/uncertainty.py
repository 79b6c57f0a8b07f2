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
- seconds per case added by `--uncertainty`: `Predictor.predict_case` without and
  with an uncertainty target, with the fold ensemble on demo cases and with one
  checkpoint on BraTS-size cases (240×240×155, 1 mm), against plain prediction
  and against `--tta` (`--from-json` with `--time-cases` re-times only).

Prints tables and writes them as JSON (`--out`); `--write-calibration` stores the
threshold, with the member count it was chosen with, as ``<run>/uncertainty.json``,
where `medseg predict` and `medseg export` find it. When no threshold can be chosen
(e.g. the score does not separate poor from good cases) the tables are still
written, the calibration is not, and the script exits with status 2. Nothing is
asserted.

The prediction side (torch, MONAI) is imported where it is used, so the threshold
and calibration functions import quickly (tests).
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
from medseg.labels import REGIONS
from medseg.uncertainty import (CALIBRATION, CASE_SCORE, DICE_LEVEL, SCORE, SCORES, STATISTIC,
                                STATISTICS, case_score, check_calibration, choose_threshold,
                                fold_thresholds, region_score)

ZONES = ("brain", "near")
BASELINE = "soft_dice_error"

#: Members of the rows of an earlier --out that predates rows recording them: each
#: case was predicted by its own fold's model with its 8 mirror flips.
OOF_MEMBERS = 8


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
    from medseg.infer import Predictor
    from medseg.predict import default_postprocessing
    from medseg.train import fold_data
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
    from medseg.evaluate import load_regions
    from medseg.metrics import dice
    rows, voxels = [], {(r, s): [] for r in REGIONS for s in STATISTICS}
    wrong = {(r, z): [] for r in REGIONS for z in ZONES}
    t0 = time.perf_counter()
    for k, cid, pred, images, channels, label, conv in oof_cases(Path(args.run), args.datalist,
                                                                args.data_root, args.max_cases):
        probs, maps, ref = pred.uncertainty(images, channels, STATISTICS)
        regions, _ = pred.regions(probs, ref)
        gt, _, _ = load_regions(label, conv)
        brain = brain_mask(images)
        row = {"fold": k, "case": cid, "members": pred.members(), "dice": {}, "scores": {}}
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
    print(f"{len(rows)} out-of-fold cases predicted with {rows_members(rows)} members each in "
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


def rows_members(rows: list[dict]) -> int:
    """The member count of every row (one threshold is for one count)."""
    counts = sorted({int(r.get("members", OOF_MEMBERS)) for r in rows})
    if len(counts) != 1:
        raise MedsegError(f"rows predicted with {counts} members: one review threshold needs one "
                          "member count; re-run the benchmark with one setting")
    return counts[0]


def thresholds(rows: list[dict], level: float) -> dict:
    """In-sample threshold (`choose_threshold`, with the rows' member count), and
    leave-one-fold-out flags (`fold_thresholds`: threshold from the other folds;
    NaN figures when some fold's others have only poor or only good cases, or no
    separating threshold). An error when no in-sample threshold can be chosen."""
    scores = np.array([score_of(r) for r in rows])
    dices = np.array([mean_dice(r) for r in rows])
    folds = np.array([r["fold"] for r in rows])
    members = rows_members(rows)
    chosen = choose_threshold(scores, dices, level, members=members)
    poor = dices < level
    try:
        lofo = fold_thresholds(scores, dices, folds, level, members=members)
        chosen.update(lofo_sensitivity=lofo["sensitivity"], lofo_specificity=lofo["specificity"],
                      lofo_flagged=lofo["flagged_count"], lofo_thresholds=lofo["thresholds"])
    except MedsegError as exc:
        print(f"leave-one-fold-out threshold not available: {exc}", file=sys.stderr)
        chosen.update(lofo_sensitivity=float("nan"), lofo_specificity=float("nan"), lofo_flagged=None)
    chosen["auroc_poor_cases"] = float(roc_auc_score(poor, scores))
    # For comparison: "poor" = any region below the level (the worst region decides).
    worst = np.array([min(r["dice"].values()) for r in rows])
    try:
        alt = choose_threshold(scores, worst, level, members=members)
        chosen["any_region"] = {**alt, "auroc_poor_cases": float(roc_auc_score(worst < level, scores))}
    except MedsegError as exc:
        chosen["any_region"] = {"error": str(exc)}
    return chosen


def calibration(res: dict, run: str) -> dict:
    """The ``uncertainty.json`` record of a benchmark result `res` (its "threshold"
    from `thresholds`), validated by `check_calibration` as predict will read it."""
    th = res["threshold"]
    if "error" in th:
        raise MedsegError(f"no review calibration written to {Path(run) / CALIBRATION}: {th['error']}")
    cal = {"statistic": STATISTIC, "case_score": CASE_SCORE,
           "threshold": th["threshold"], "level": th["level"], "youden_j": th["youden_j"],
           "sensitivity": th["sensitivity"], "specificity": th["specificity"],
           "lofo_sensitivity": th["lofo_sensitivity"], "lofo_specificity": th["lofo_specificity"],
           "poor": th["poor"], "cases": th["cases"], "members": th["members"],
           "chosen_on": f"{th['cases']} out-of-fold cases of {run}, each predicted by its own fold's "
                        f"model with {th['members']} members (mirror flips; benchmarks/uncertainty.py)",
           "spearman": {k: v for k, v in res["spearman"].items() if k.endswith(f"{STATISTIC}/{SCORE}")},
           "auroc": {k: v for k, v in res["auroc"].items() if f"/{STATISTIC}/" in k}}
    check_calibration(cal, f"the calibration for {Path(run) / CALIBRATION}")
    return finite(cal)


def timing(args) -> dict:
    """Seconds per case: plain, --tta, --uncertainty (median over cases)."""
    from medseg.data.discover import discover
    from medseg.predict import default_postprocessing
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
    from medseg.infer import Predictor
    arms = {"plain": Predictor(ckpts, et_min_ml=post.get("et_min_ml", 0.0)),
            "tta": Predictor(ckpts, mirror=True, et_min_ml=post.get("et_min_ml", 0.0))}
    secs = {"plain": [], "tta": [], "uncertainty": []}
    for cid, images in cases:
        for arm in ("plain", "tta", "uncertainty"):
            t = time.perf_counter()
            if arm == "uncertainty":
                arms["tta"].predict_case(images, tmp / f"{cid}_u.nii.gz", conv,
                                         uncertainty_target=tmp / f"{cid}_uncertainty.nii.gz")
            else:
                arms[arm].predict_case(images, tmp / f"{cid}_{arm}.nii.gz", conv)
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
    lines += threshold_lines(res["threshold"])
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


def threshold_lines(th: dict) -> list[str]:
    """The report's lines on the review threshold (`thresholds`' result, or {"error"})."""
    if "error" in th:
        return ["", f"no review threshold: {th['error']}"]
    lines = ["", f"review threshold ({STATISTIC}, case score {CASE_SCORE}, {th['members']} members; poor = "
             f"mean Dice < {th['level']}: {th['poor']} of {th['cases']} cases): {th['threshold']:.4f}; "
             f"in-sample sensitivity {th['sensitivity']:.2f}, specificity {th['specificity']:.2f} "
             f"(Youden's J {th['youden_j']:.2f}); threshold from the other folds: sensitivity "
             f"{th['lofo_sensitivity']:.2f}, specificity {th['lofo_specificity']:.2f}; case-score "
             f"AUROC for poor cases {th['auroc_poor_cases']:.3f}"]
    alt = th["any_region"]
    lines.append(f"(if poor = any region's Dice < {th['level']}: "
                 + (f"no threshold: {alt['error']})" if "error" in alt else
                    f"{alt['poor']} cases, threshold {alt['threshold']:.4f}, sensitivity "
                    f"{alt['sensitivity']:.2f}, specificity {alt['specificity']:.2f}, AUROC "
                    f"{alt['auroc_poor_cases']:.3f})"))
    return lines


def finite(obj):
    """NaN (e.g. Spearman of a constant column) or ±inf → None, so the JSON is standard
    (json.dumps would write NaN and Infinity)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> None:
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
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.from_json:
        old = json.loads(Path(a.from_json).read_text())
        res = {"rows": old["rows"], "auroc": old["auroc"]}
        if "timing" in old and not a.time_cases:
            res["timing"] = old["timing"]
    else:
        res = measure(a)
    res["spearman"] = case_tables(res["rows"])
    try:
        res["threshold"] = thresholds(res["rows"], a.level)
    except MedsegError as exc:
        # The measurements took long: keep them (--from-json can reuse them), write no threshold.
        res["threshold"] = {"error": str(exc)}
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
        target = Path(a.run) / CALIBRATION
        try:
            cal = calibration(res, a.run)
        except MedsegError as exc:
            left = f"; the existing {target} is left as it was" if target.exists() else ""
            print(f"error: {exc}{left}", file=sys.stderr)
            sys.exit(2)
        write_json(cal, target)
        print(f"review threshold written to {target}")


if __name__ == "__main__":
    main()
