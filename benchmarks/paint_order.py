"""How a four-output task's regions become labels: each painting order of the
exclusive classes, scored on the same out-of-fold probabilities.

    python benchmarks/paint_order.py --run runs/demo_gli2024_cpu \\
        --datalist data_lists/demo_gli2024.json --data-root demo_data/gli2024

A gli2024 network has sigmoid outputs TC, WT, ET and RC. The resection cavity
and the tumour core are exclusive in the labels, but two sigmoids can both say
yes: the painting order (`medseg.labels.Task.paint`, later wins) decides. For
every held-out case of every fold, the fold's model predicts the probabilities
once (post-processing as `medseg cv`: none); each order turns them into a label
map on the case's grid, scored under the task's rules against the reference.
Printed: mean Dice per scored region for each order, and the paired difference
of the two orders per region (mean and 95 % BCa interval over the cases). The
orders differ only where two outputs overlap, so the comparison needs no retraining.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import paired_interval  # noqa: E402

from medseg.data.io import write_label_map  # noqa: E402
from medseg.evaluate import evaluate_case  # noqa: E402
from medseg.infer import Predictor  # noqa: E402
from medseg.labels import get_task, regions_to_labels  # noqa: E402
from medseg.train import fold_data  # noqa: E402

#: Orders compared per task: the default first (`Task.paint`), then the alternative.
ALTERNATIVES = {
    "gli2024": (("WT", "ED"), ("TC", "NCR"), ("RC", "RC"), ("ET", "ET")),     # cavity over the core
    "ped2024": (("WT", "ED"), ("CC", "CC"), ("TC", "NCR"), ("ET", "ET")),     # core over the cyst
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="a finished `medseg cv` folder of a four-output task")
    p.add_argument("--datalist", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--rules", help="scoring rules (default: the task's)")
    a = p.parse_args()
    folds = sorted(a.run.glob("fold_*/checkpoints/final.pt"))
    if not folds:
        raise SystemExit(f"{a.run}: no fold_*/checkpoints/final.pt")
    scores: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ck in folds:
            k = int(ck.parent.parent.name.split("_")[1])
            eng = Predictor([ck])
            task = get_task(eng.spec.task)
            if task.name not in ALTERNATIVES:
                raise SystemExit(f"{a.run}: task {task.name} has no alternative order here")
            orders = {"default": task.paint, "alternative": ALTERNATIVES[task.name]}
            rules = a.rules or task.rules
            data = fold_data(a.datalist, a.data_root, k)
            for case in data.val:
                images = case["image"] if isinstance(case["image"], list) else [case["image"]]
                probs, ref = eng.probabilities(images, data.channels)
                regions, _ = eng.regions(probs, ref)
                for name, paint in orders.items():
                    labels = regions_to_labels(regions, data.convention, replace(task, paint=paint))
                    target = Path(tmp) / f"{name}_{case['id']}.nii.gz"
                    write_label_map(labels, ref, target, data.convention, source="paint_order")
                    got = evaluate_case(target, case["label"], data.convention, rules, task)
                    scores.setdefault(name, []).append({r: got[r]["dice"] for r in task.scored})
                print(f"fold {k} {case['id']}: " + "  ".join(
                    f"{n} RC {scores[n][-1].get('RC', scores[n][-1].get('CC')):.3f}" for n in orders), flush=True)
    print(f"\n{a.run} ({task.name}, {rules}), {len(scores['default'])} out-of-fold cases")
    print("default:     " + " > ".join(c for _, c in reversed(task.paint)) + " (later wins)")
    print("alternative: " + " > ".join(c for _, c in reversed(ALTERNATIVES[task.name])))
    print(f"{'region':8}{'default':>9}{'alternative':>13}{'alt − default [95 % CI]':>30}")
    for r in task.scored:
        d = np.array([s[r] for s in scores["default"]], float)
        line = f"{r:8}{np.nanmean(d):9.3f}"
        cells = ""
        for other in ("alternative",):
            e = np.array([s[r] for s in scores[other]], float)
            ok = ~(np.isnan(d) | np.isnan(e))
            lo, hi = paired_interval(e[ok] - d[ok]) if ok.sum() > 2 else (float("nan"), float("nan"))
            line += f"{np.nanmean(e):13.3f}"
            cells += f"{np.mean(e[ok] - d[ok]):+16.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(line + cells)
    means = {n: float(np.mean([np.nanmean([s[r] for s in scores[n]]) for r in task.scored])) for n in scores}
    print("mean Dice over the scored regions: " + ", ".join(f"{n} {v:.3f}" for n, v in means.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
