"""Missing modalities: out-of-fold Dice of a cross-validation under all 15 non-empty
subsets of T1, T1ce, T2, FLAIR, beside a model trained without modality dropout.

    medseg cv ... --set train.modality_dropout=0.5 --out runs/demo_dropout    # the model
    python benchmarks/missing_modality.py --run runs/demo_dropout --baseline runs/demo_cpu \
        --datalist data_lists/demo_brats2023.json --data-root demo_data/brats2023

Each fold's final checkpoint predicts its own held-out cases (as `medseg cv` does)
from only the files of the subset, through the real prediction path (the missing
channels are filled as at `medseg predict`), and the masks are scored against the
reference labels (Dice per region, BraTS empty-mask rules). The baseline run (no
dropout) is scored on full inputs, and with `--baseline-subsets all` on every
subset too. Prints a table, writes it as JSON and Markdown beside `--out`. Nothing
is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from medseg.evaluate import load_regions
from medseg.infer import Predictor
from medseg.labels import CHANNELS, REGIONS, labels_to_regions
from medseg.metrics import dice
from medseg.train import fold_data

NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
SUBSETS = [s for n in range(len(CHANNELS), 0, -1) for s in itertools.combinations(CHANNELS, n)]


def score(run: Path, datalist: str, data_root: str, subsets, max_cases: int = 0,
          only_folds: list[int] | None = None) -> dict:
    """{subset name: {region: mean Dice}} over the out-of-fold cases of `run` (of the
    folds `only_folds`, default every trained fold)."""
    dice_by = {s: {r: [] for r in REGIONS} for s in subsets}
    folds = [c for c in sorted(run.glob("fold_*/checkpoints/final.pt"))
             if only_folds is None or int(c.parents[1].name.split("_")[1]) in only_folds]
    if not folds:
        sys.exit(f"{run}: no fold_*/checkpoints/final.pt; run `medseg cv` first")
    for ckpt in folds:
        k = int(ckpt.parents[1].name.split("_")[1])
        data = fold_data(datalist, data_root, k)
        pred = Predictor([ckpt])
        for case in data.val[:max_cases or None]:
            files = dict(zip(data.channels, case["image"]))
            ref, _, _ = load_regions(case["label"], data.convention)
            for s in subsets:
                labels, _ = pred.labels([files[c] for c in s], data.convention, list(s))
                got = labels_to_regions(labels, data.convention)
                for i, r in enumerate(REGIONS):
                    dice_by[s][r].append(dice(got[i], ref[i]))
    full = dice_by[subsets[0]]
    return {"+".join(NAMES[c] for c in s): {r: float(np.mean(v)) for r, v in d.items()}
            for s, d in dice_by.items()} | {"cases": len(full["TC"]),
                                            "per_case_first": np.mean([full[r] for r in REGIONS], 0).tolist()}


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """95 % bootstrap interval (BCa, scipy) of the mean of the per-case differences
    a − b: the same cases, so the pairing removes the case-to-case spread."""
    from scipy.stats import bootstrap
    diff = np.asarray(a) - np.asarray(b)
    if len(diff) < 2:
        return float("nan"), float("nan")
    ci = bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=10000, random_state=0).confidence_interval
    return float(ci.low), float(ci.high)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="cv folder of a model trained with modality dropout")
    ap.add_argument("--baseline", required=True, help="cv folder of the same recipe without dropout")
    ap.add_argument("--datalist", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--baseline-subsets", choices=["full", "all"], default="full")
    ap.add_argument("--max-cases", type=int, default=0, help="per fold, for a quick look (0: all)")
    ap.add_argument("--folds", type=int, nargs="+", help="score only these folds, in both runs "
                    "(default: every fold the dropout run has trained)")
    ap.add_argument("--out", default="runs/missing_modality.json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    folds = a.folds or sorted(int(c.parents[1].name.split("_")[1])
                              for c in Path(a.run).glob("fold_*/checkpoints/final.pt"))
    drop = score(Path(a.run), a.datalist, a.data_root, SUBSETS, a.max_cases, folds)
    t_drop = time.perf_counter() - t0
    base = score(Path(a.baseline), a.datalist, a.data_root,
                 SUBSETS if a.baseline_subsets == "all" else SUBSETS[:1], a.max_cases, folds)
    cfg = json.loads((Path(a.run) / "config.json").read_text())
    rows = ["| inputs | " + " | ".join(f"{r} dropout" for r in REGIONS) + " | mean | "
            + " | ".join(f"{r} no dropout" for r in REGIONS) + " |",
            "|---" * (2 * len(REGIONS) + 2) + "|"]
    for name in [k for k in drop if k not in ("cases", "per_case_first")]:
        d, b = drop[name], base.get(name)
        rows.append(f"| {name} | " + " | ".join(f"{d[r]:.3f}" for r in REGIONS)
                    + f" | {np.mean([d[r] for r in REGIONS]):.3f} | "
                    + " | ".join(f"{b[r]:.3f}" if b else "–" for r in REGIONS) + " |")
    full = "+".join(NAMES[c] for c in CHANNELS)
    delta = np.mean([drop[full][r] for r in REGIONS]) - np.mean([base[full][r] for r in REGIONS])
    low, high = paired_interval(drop["per_case_first"], base["per_case_first"])
    table = "\n".join(rows)
    print(table)
    print(f"\n{drop['cases']} out-of-fold cases of folds {folds}; modality dropout "
          f"{cfg['train'].get('modality_dropout', 0.0)}; full inputs, mean Dice dropout − no dropout: "
          f"{delta:+.3f} (95 % paired bootstrap interval {low:+.3f} to {high:+.3f}); FLAIR alone WT {drop['FLAIR']['WT']:.3f}; T1ce alone ET {drop['T1ce']['ET']:.3f}; "
          f"{len(SUBSETS) * drop['cases']} predictions of the dropout model in {t_drop:.0f} s, "
          f"{time.perf_counter() - t0:.0f} s in all")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dropout": drop, "baseline": base, "full_input_delta": delta,
                               "full_input_delta_interval95": [low, high], "folds": folds,
                               "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
