"""Knowledge distillation on the demo's 5-fold cross-validation: is the light student
as accurate as its teacher, and does the teacher help it?

    python benchmarks/distill.py                                  # the budget below, every fold
    python benchmarks/distill.py --epochs 40                      # the cpu preset's full budget
    python benchmarks/distill.py --student thin_unet3d --weight 0.7
    python benchmarks/distill.py --summary-only                   # tables from the runs already made

Three cross-validations of the same folds, seeds and training budget (each
resumes when interrupted), in `--out`:

- ``teacher``: `medseg cv` of the cpu preset (`unet3d`, 16…128 filters);
- ``student_kd``: `medseg distill --teacher teacher` — the student network, each
  fold trained on (1 - w) · labels + w · teacher fold k's probabilities;
- ``student_plain``: the same student config with ``train.distill.teacher=null``:
  labels only, the same budget (what distillation is compared with).

Printed (and written to `--out`/distill.json and .md): out-of-fold Dice per region
and its mean, HD95, for each; the 95 % paired BCa bootstrap interval (scipy, case
level, mean Dice over TC/WT/ET) of student_kd − teacher and student_kd −
student_plain; parameters and seconds per training iteration. The acceptance
reading is: the student within 0.01 mean Dice of the teacher, and above the plain
student. Nothing is asserted: this measures.
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
REGIONS = ("TC", "WT", "ET")
ARMS = ("teacher", "student_kd", "student_plain")


def _run(cmd: list[str], log: Path, name: str) -> float:
    t0 = time.perf_counter()
    print(f"[{name}] medseg {' '.join(cmd)}", flush=True)
    with open(log, "a") as fh:
        r = subprocess.run([sys.executable, "-m", "medseg", *cmd], stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"[{name}] failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def run_arms(a) -> dict:
    out = Path(a.out)
    data = ["--datalist", a.datalist, "--data-root", a.data_root]
    teacher_set = ["--set", f"train.epochs={a.epochs}"] + (["--set", f"train.iters_per_epoch={a.iters}"]
                                                           if a.iters else [])
    seconds = {"teacher": _run(["cv", "--folds", "5", *data, "--preset", "cpu", *teacher_set,
                                "--out", str(out / "teacher")], out / "teacher.log", "teacher")}
    kd = ["distill", "--teacher", str(out / "teacher"), "--out", str(out / "student_kd"),
          "--student", a.student, "--weight", str(a.weight)]
    seconds["student_kd"] = _run(kd + ([] if a.final else ["--no-final"]), out / "student_kd.log", "student_kd")
    seconds["student_plain"] = _run(["cv", "--folds", "5", *data, "--config", str(out / "student_kd" / "config.json"),
                                     "--set", "train.distill.teacher=null", "--out", str(out / "student_plain")],
                                    out / "student_plain.log", "student_plain")
    return seconds





def _mean_dice(case: dict) -> float:
    return float(np.nanmean([float(case[r]["dice"]) for r in REGIONS]))


def summarise(a) -> dict:
    out = Path(a.out)
    found = {arm: cv_cases(out / arm) for arm in ARMS if (out / arm / "cv_metrics.csv").exists()}
    result: dict = {"arms": {}, "paired": {}}
    for arm, cases in found.items():
        e = {"cases": len(cases)}
        for r in REGIONS:
            e[f"dice_{r}"] = float(np.nanmean([float(c[r]["dice"]) for c in cases.values()]))
            e[f"hd95_{r}"] = float(np.nanmean([float(c[r]["hd95"]) for c in cases.values()]))
        e["dice_mean"] = float(np.mean([_mean_dice(c) for c in cases.values()]))
        e["s_per_iter"], e["params_m"] = train_stats(out / arm)
        result["arms"][arm] = e
    for other in ("teacher", "student_plain"):
        if "student_kd" in found and other in found:
            common = sorted(set(found["student_kd"]) & set(found[other]))
            diff = np.array([_mean_dice(found["student_kd"][c]) - _mean_dice(found[other][c]) for c in common])
            per_region = {}
            for r in REGIONS:
                d = np.array([float(found["student_kd"][c][r]["dice"]) - float(found[other][c][r]["dice"])
                              for c in common])
                d = d[~np.isnan(d)]
                per_region[r] = {"delta": float(d.mean()), "ci95": list(paired_interval(d))}
            result["paired"][f"student_kd - {other}"] = {
                "cases": len(common), "delta_mean_dice": float(diff.mean()), "ci95": list(paired_interval(diff)),
                "per_region": per_region}
    return result


def table(result: dict, a) -> str:
    lines = ["| arm | network | parameters (M) | s / iteration | Dice TC | Dice WT | Dice ET | mean Dice "
             "| HD95 TC / WT / ET (mm) |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"teacher": "unet3d (cpu preset)", "student_kd": a.student, "student_plain": a.student}
    for arm, e in result["arms"].items():
        spi = f"{e['s_per_iter']:.2f}" if e["s_per_iter"] else "—"
        lines.append(f"| {arm} | {names[arm]} | {e['params_m']:.3f} | {spi} | {e['dice_TC']:.3f} | "
                     f"{e['dice_WT']:.3f} | {e['dice_ET']:.3f} | {e['dice_mean']:.3f} | "
                     + " / ".join(f"{e[f'hd95_{r}']:.1f}" for r in REGIONS) + " |")
    lines.append("")
    for name, p in result["paired"].items():
        lines.append(f"- {name}: mean Dice {p['delta_mean_dice']:+.3f} [95 % CI {p['ci95'][0]:+.3f}, "
                     f"{p['ci95'][1]:+.3f}] over {p['cases']} paired cases; per region "
                     + ", ".join(f"{r} {v['delta']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                                 for r, v in p["per_region"].items()))
    lines.append(f"\nbudget: {a.epochs} epochs × {a.iters or 16} iterations, batch 2, seed 0; distillation "
                 f"weight {a.weight}; out-of-fold cases of the demo's 5 folds.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", default=str(REPO / "data_lists/demo_brats2023.json"))
    p.add_argument("--data-root", default=str(REPO / "demo_data/brats2023"))
    p.add_argument("--out", default=str(REPO / "runs/distill"))
    p.add_argument("--epochs", type=int, default=12, help="training epochs per fold, every arm (default 12)")
    p.add_argument("--iters", type=int, help="iterations per epoch (default: the cpu preset's 16)")
    p.add_argument("--student", default="mobilenet_unet3d")
    p.add_argument("--weight", type=float, default=0.5, help="the teacher's share of the target")
    p.add_argument("--final", action="store_true", help="also train the final student on every case")
    p.add_argument("--summary-only", action="store_true")
    a = p.parse_args()
    if not Path(a.datalist).is_file():
        raise SystemExit(f"{a.datalist} not found: run `make demo` first (or pass --datalist/--data-root)")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    seconds = {} if a.summary_only else run_arms(a)
    result = summarise(a)
    text = table(result, a)
    print(text)
    (Path(a.out) / "distill.md").write_text(text + "\n")
    (Path(a.out) / "distill.json").write_text(json.dumps({"args": vars(a), **result, "seconds": seconds},
                                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
