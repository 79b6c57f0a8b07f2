"""Raw scanner studies: identification, registration, brain extraction, native-space
Dice and time per step, on generated studies whose truth is known.

    python benchmarks/raw_study.py --studies 50 --model runs/raw_demo_model/checkpoints/final.pt \
        --out runs/raw_study

The studies (`medseg.data.synth_raw`, a seed the model never saw in training)
are generated under ``--out/data`` (kept: a re-run reuses them). For each study:

* **identification**: `medseg.raw.study` on the study folder (distractors and all)
  against the true series; a wrong choice counts as wrong, an error as an error;
* **registration error** at the brain's surface: for points on the true brain
  surface, where the estimated T1ce → series transform puts them against where the
  known patient poses put them (mm);
* **brain extraction**: Dice of the built-in extractor's mask against the true
  brain mask on the T1ce's native grid;
* **native-space Dice**: the model predicts the prepared atlas-space case, its
  probabilities go back to the T1ce's native grid (`medseg predict --raw`'s path)
  and are scored against the true labels there; beside it the same model's Dice on
  the atlas-space version of the same case (the phantom rendered as the BraTS-like
  training data are: what perfect pre-processing would give);
* **seconds per step** (network excluded).

Prints a table and writes JSON beside ``--out``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.labels import REGIONS, labels_to_regions
from medseg.metrics import dice


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(dice(a, b)) if (a.any() or b.any()) else 1.0


def _region_dice(pred: np.ndarray, ref: np.ndarray, conv: str = "brats2023") -> dict:
    p, r = labels_to_regions(pred, conv), labels_to_regions(ref, conv)
    return {name: _dice(p[i], r[i]) for i, name in enumerate(REGIONS)}


def surface_error(truth: dict, prepared, points: np.ndarray) -> dict[str, np.ndarray]:
    """Per series: distances (mm) between estimated and true positions of `points`
    (canonical mm, on the brain surface)."""
    from medseg.data.synth_raw import surface_error_mm
    w_ce = truth["roles"]["t1ce"]["world_from_canonical"]
    return {role: surface_error_mm(points, w_ce, truth["roles"][role]["world_from_canonical"], m)
            for role, m in prepared.t1ce_to_role.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000, help="generator seed (not the demo data's)")
    ap.add_argument("--scale", default="full", choices=("full", "small"))
    ap.add_argument("--model", nargs="*", default=[], help="checkpoint(s) or ONNX file for the Dice part")
    ap.add_argument("--engine", default="torch", choices=("torch", "onnx"))
    ap.add_argument("--atlas", default="mni152")
    ap.add_argument("--out", default="runs/raw_study")
    a = ap.parse_args()

    from medseg.data.synth_raw import canonical_points_on_brain_surface, load_truth, synthesize_raw
    from medseg.raw.prepare import prepare
    from medseg.raw.run import _space
    from medseg.raw.study import identify, load_series, scan_study

    out = Path(a.out)
    data = out / "data"
    if not (data / "truth").is_dir():
        t0 = time.perf_counter()
        synthesize_raw(data, a.studies, seed=a.seed, scale=a.scale)
        print(f"generated {a.studies} studies in {time.perf_counter() - t0:.0f} s")
    ids = sorted(p.name for p in (data / "studies").iterdir())[: a.studies]
    engine = None
    if a.model:
        from medseg.predict import open_engine
        engine = open_engine(a.model, a.engine)
    rows, errors = [], {"t1": [], "t2": [], "flair": []}
    for n, sid in enumerate(ids, 1):
        truth = load_truth(data, sid)
        row: dict = {"study": sid}
        try:
            ident = identify(scan_study(data / "studies" / sid))
            chosen = {r: c.series.series_uid for r, c in ident.choices.items()}
            row["identified"] = all(chosen.get(r) == truth["roles"][r]["series_uid"] for r in truth["roles"])
            row["identification"] = {r: [chosen.get(r), truth["roles"][r]["series_uid"]] for r in truth["roles"]}
        except Exception as exc:  # noqa: BLE001 - an error is a result here
            row["identified"], row["identification_error"] = False, str(exc)[:500]
            rows.append(row)
            print(f"[{n}/{len(ids)}] {sid}: identification error: {exc}")
            continue
        series = {r: load_series(c.series) for r, c in ident.choices.items()}
        prepared = prepare(sid, series, out / "atlas_space", a.atlas)
        row["seconds"] = prepared.seconds
        row["qc"] = prepared.qc
        errs = surface_error(truth, prepared, canonical_points_on_brain_surface(data, sid))
        for r, e in errs.items():
            errors[r].append(e)
        row["registration_mm"] = {r: {"median": float(np.median(e)), "max": float(e.max())} for r, e in errs.items()}
        ref_brain = nib.load(truth["roles"]["t1ce"]["brain_path"])
        est_brain = np.asarray(nib.load(str(prepared.folder / "native" / "brain_mask_t1ce_grid.nii.gz")).dataobj) > 0
        row["brain_dice"] = _dice(est_brain, np.asarray(ref_brain.dataobj) > 0)
        if engine is not None:
            labels_ref = np.asarray(nib.load(truth["roles"]["t1ce"]["labels_path"]).dataobj)
            tmp = out / "native_masks"
            tmp.mkdir(parents=True, exist_ok=True)
            labels, _ = engine.predict_case(prepared.channel_files(), tmp / f"{sid}.nii.gz",
                                            channels=[c for c in ("t1", "t1ce", "t2", "flair")
                                                      if c in prepared.images],
                                            space=_space(prepared, "t1ce"))
            row["native_dice"] = _region_dice(labels, labels_ref)
            atlas_case = Path(truth["atlas_dir"])
            files = [atlas_case / f"{sid}-{k}.nii.gz" for k in ("t1n", "t1c", "t2w", "t2f")]
            lab_a, _ = engine.labels(files, "brats2023")
            ref_a = np.asarray(nib.load(str(atlas_case / f"{sid}-seg.nii.gz")).dataobj)
            row["atlas_dice"] = _region_dice(lab_a, ref_a)
        rows.append(row)
        msg = (f"[{n}/{len(ids)}] {sid}: identified {row['identified']}, registration median "
               + ", ".join(f"{r} {v['median']:.2f}" for r, v in row["registration_mm"].items())
               + f" mm, brain Dice {row['brain_dice']:.3f}, steps "
               + ", ".join(f"{k} {v:.1f}" for k, v in prepared.seconds.items()) + " s")
        if "native_dice" in row:
            msg += (" | Dice native " + "/".join(f"{row['native_dice'][r]:.3f}" for r in REGIONS)
                    + " atlas " + "/".join(f"{row['atlas_dice'][r]:.3f}" for r in REGIONS))
        print(msg, flush=True)
        (out.parent / f"{out.name}.partial.json").write_text(json.dumps({"studies": rows}, indent=2, default=float))

    ok = [r for r in rows if "seconds" in r]
    allerr = np.concatenate([np.concatenate(v) for v in errors.values() if v]) if ok else np.zeros(1)
    summary = {
        "studies": len(rows), "scale": a.scale, "seed": a.seed,
        "identification_correct": sum(bool(r["identified"]) for r in rows),
        "identification_errors": sum("identification_error" in r for r in rows),
        "registration_mm": {"median": float(np.median(allerr)), "p95": float(np.percentile(allerr, 95)),
                            "max": float(allerr.max()),
                            **{r: {"median": float(np.median(np.concatenate(v))), "max": float(np.concatenate(v).max())}
                               for r, v in errors.items() if v}},
        "brain_dice": {"mean": float(np.mean([r["brain_dice"] for r in ok])),
                       "min": float(np.min([r["brain_dice"] for r in ok]))},
        "seconds": {k: float(np.mean([r["seconds"].get(k, 0.0) for r in ok])) for k in ok[0]["seconds"]},
        "review": sum(bool(r["qc"]["review_reasons"]) for r in ok),
    }
    summary["seconds"]["total"] = float(sum(summary["seconds"].values()))
    if engine is not None and ok:
        summary["native_dice"] = {k: float(np.mean([r["native_dice"][k] for r in ok])) for k in REGIONS}
        summary["atlas_dice"] = {k: float(np.mean([r["atlas_dice"][k] for r in ok])) for k in REGIONS}
        summary["model"] = [str(m) for m in a.model]
    print(json.dumps(summary, indent=2))
    (out.parent / f"{out.name}.json").write_text(json.dumps({"summary": summary, "studies": rows}, indent=2,
                                                            default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
