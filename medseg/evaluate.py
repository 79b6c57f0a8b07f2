"""Evaluation of label-map files against references, per case and region.

Used by `medseg cv` for out-of-fold predictions (and by `medseg evaluate`).
Scores follow a named rule set (`medseg.scoring`, default brats21: pooled HD95,
both empty → Dice 1, one empty → 373.13 mm). Every row also holds the region's IoU
(``iou``; voxel-wise, with the rule set's Dice conventions for empty masks) and the
case's mean IoU over TC, WT, ET (``mean_iou``, the same on the case's three rows).
Every row, CSV and summary names its rule set, and rows scored under different rule sets are never summarised together.
Both files must lie on the same grid: a prediction on another grid is an error,
never a resampled guess.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from medseg.data.discover import discover, resolve_convention
from medseg.data.io import (atomic_path, is_nifti, load_array, load_header, nifti_stem, same_grid,
                            write_json)
from medseg.errors import DataError, MedsegError
from medseg.data.inputs import read_manifest
from medseg.labels import (CONVENTIONS, REGIONS, Task, get_convention, get_task, legacy_task, region_masks,
                           resolve_task, validate_labels)
from medseg.metrics import mean_iou, score_case
from medseg.scoring import (ALL_METRICS, CASE_METRICS, DEFAULT_RULES, describe_rules, get_rules,
                            rule_metrics)

__all__ = ["load_regions", "evaluate_case", "folder_task", "metric_rows", "summarize", "write_rows", "read_rows",
           "references", "evaluate_folder", "format_table", "rules_of"]


def _check_recorded_convention(path: Path, img, convention: str) -> None:
    """A mask whose header records its labels (medseg writes ``labels=<name>`` in
    ``descrip``) must be read with a convention that gives the same region labels:
    a brats2021 mask (ET = 4) read as brats2023 would score an empty ET."""
    text = bytes(img.header["descrip"].item()).decode("ascii", "replace")
    m = re.search(r"labels=([a-z0-9-]+)", text)
    if not m or m.group(1) not in CONVENTIONS:
        return
    got, want = get_convention(m.group(1)), get_convention(convention)
    if dict(got.class_of) != dict(want.class_of):
        raise DataError(f"{path}: written with {got.name} labels ({got.description}; header "
                        f"'{text.strip()}'), but read as {want.name} ({want.description}); evaluate "
                        f"with --convention {got.name}, or predict again with --convention {want.name}")


def load_regions(path: str | Path, convention: str, task: str | Task | None = None
                 ) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Label file → (`(R, X, Y, Z)` bool masks of the regions `task` scores (default
    the convention's legacy task: TC/WT/ET), affine, voxel spacing in mm)."""
    img = load_header(Path(path))
    lab = load_array(Path(path), img, dtype=np.float32)
    if lab.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, found shape {lab.shape}")
    _check_recorded_convention(Path(path), img, convention)
    validate_labels(np.unique(lab), convention, str(path))
    t = get_task(task) if task is not None else legacy_task(convention)
    return region_masks(lab.astype(np.int16), convention, t, t.scored), img.affine, \
        tuple(float(z) for z in img.header.get_zooms()[:3])


def evaluate_case(pred: str | Path, ref: str | Path, convention: str,
                  rules: str = DEFAULT_RULES, task: str | Task | None = None) -> dict[str, dict[str, float]]:
    """{region: {metric: value}} for one prediction file against its reference, scored
    under the rule set named `rules` on the regions `task` scores (default: the
    convention's legacy task, TC/WT/ET)."""
    rule_set = get_rules(rules)
    t = get_task(task) if task is not None else legacy_task(convention)
    p, p_aff, _ = load_regions(pred, convention, t)
    r, r_aff, spacing = load_regions(ref, convention, t)
    if not same_grid(p.shape[1:], p_aff, r.shape[1:], r_aff):
        raise DataError(f"{pred}: grid {p.shape[1:]} does not match the reference {ref} "
                        f"{r.shape[1:]} (or their affines differ); predictions must be written on "
                        "the reference image grid (medseg predict does this)")
    return score_case(p, r, spacing, rule_set, regions=t.scored)


def metric_rows(case_id: str, metrics: dict[str, dict[str, float]], rules: str = DEFAULT_RULES,
                **extra) -> list[dict]:
    """One row per region: {**extra, case, region, rules, dice, iou, hd95, …, mean_iou},
    the region's columns (`rule_metrics`) then the case's (`CASE_METRICS`: the mean of
    the regions' IoU, NaN regions left out)."""
    case = {"mean_iou": mean_iou(dict(metrics))}
    return [{**extra, "case": case_id, "region": r, "rules": rules, **metrics[r], **case}
            for r in metrics]


def rules_of(rows: Iterable[dict]) -> str:
    """The one rule set that scored all `rows` (rows without a ``rules`` column predate
    rule sets and were scored by brats21). Mixed rule sets are an error."""
    names = {row.get("rules") or DEFAULT_RULES for row in rows}
    if len(names) > 1:
        raise MedsegError(f"metric rows scored under different rule sets ({', '.join(sorted(names))}) "
                          "cannot be summarised together; evaluate them again with one --rules")
    return names.pop() if names else DEFAULT_RULES


def _stats(values: list[float]) -> dict[str, float | None]:
    """Mean, std, median over the values that are numbers; `n` counts them. NaN (a case
    the rule set excludes, e.g. both masks empty under brats-eval) is left out; with
    none left the statistics are null (JSON has no NaN)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "n": int(v.size)}


def summarize(rows: Iterable[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{region: {metric: {mean, std, median, n}}} over the rows, which must all have
    been scored under one rule set (its metric columns and ``mean_iou`` are summarised;
    ``mean_iou`` is a case's, so its statistics are the same in every region). Columns
    that rows written before them lack (``iou``, ``mean_iou``) are left out."""
    rows = list(rows)
    metrics = [m for m in rule_metrics(get_rules(rules_of(rows))) + CASE_METRICS
               if all(m in row for row in rows)]
    regions = list(dict.fromkeys(row["region"] for row in rows))
    return {r: {m: _stats([row[m] for row in rows if row["region"] == r]) for m in metrics}
            for r in regions}


def write_rows(rows: list[dict], path: str | Path) -> None:
    """Rows → CSV, atomically, floats at full precision."""
    if not rows:
        raise ValueError("no rows to write")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for row in rows:
        w.writerow(row)   # floats as repr: reading them back gives the same numbers
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(buf.getvalue())


def read_rows(path: str | Path) -> list[dict]:
    """CSV written by `write_rows` → rows with metric values as floats (and a ``rules``
    column: brats21 for files written before rule sets existed)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.setdefault("rules", DEFAULT_RULES)
        for m in ALL_METRICS:
            if m in row:
                row[m] = float(row[m])
    return rows


def references(ref: Path, convention: str | None) -> tuple[dict[str, Path], str]:
    """A data root with labels, or a plain folder of ``<case_id>.nii.gz`` label files →
    (case id → reference file, label convention)."""
    try:
        ds = discover(ref)
    except MedsegError:
        ds = None
    if ds is not None and ds.training:
        conv, _ = resolve_convention(ds, convention)
        return {c.case_id: c.label for c in ds.training}, conv.name
    files = {nifti_stem(p): p for p in sorted(ref.iterdir()) if p.is_file() and is_nifti(p)}
    if not files:
        raise MedsegError(f"--ref {ref}: no labelled cases and no .nii.gz files found")
    if convention is None:
        raise MedsegError(f"--ref {ref} is a plain folder of label files: pass --convention "
                          f"({', '.join(CONVENTIONS)})")
    return files, convention


def folder_task(pred: Path, conv: str, case_ids: Iterable[str], task: str | None = None) -> tuple[Task, str]:
    """The task a folder of predictions is scored by → (task, why): `task` (--task), else
    the model's, recorded in ``predictions.json`` by `medseg predict`, else detected
    from the references' convention and case ids. Labels the task cannot be scored
    on are an error."""
    recorded = (read_manifest(Path(pred)).get("run") or {}).get("task")
    where = f"{Path(pred) / 'predictions.json'} (the model's)"
    return resolve_task(conv, case_ids, task, (recorded, where), f"references in {conv}")


def evaluate_folder(pred: str | Path, ref: str | Path, out: str | Path,
                    convention: str | None = None, rules: str | None = None,
                    task: str | None = None) -> dict:
    """Evaluate every ``<case_id>.nii.gz`` of `pred` against its reference on the regions
    its task scores (`folder_task`), under the rule set `rules` (None: the task's);
    write ``metrics.csv`` (per case × region) and ``summary.json`` to `out`."""
    pred, ref, out = Path(pred), Path(ref), Path(out)
    if not pred.is_dir():
        raise MedsegError(f"--pred {pred}: not a folder")
    refs, conv = references(ref, convention)
    t, task_why = folder_task(pred, conv, refs, task)
    rules = rules or t.rules
    rule_set = get_rules(rules)
    # `predict --uncertainty` writes <case>_uncertainty.nii.gz beside each mask: not a mask.
    preds = {nifti_stem(p): p for p in sorted(pred.iterdir())
             if p.is_file() and is_nifti(p) and not nifti_stem(p).endswith("_uncertainty")}
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise MedsegError(f"--pred {pred}: no prediction for {len(missing)} of {len(refs)} reference "
                          f"cases, e.g. {missing[0]}.nii.gz; predict them (BraTS scores a missing "
                          "case as empty) or evaluate against a folder holding only those predicted")
    rows = []
    for case_id in sorted(refs):
        rows += metric_rows(case_id, evaluate_case(preds[case_id], refs[case_id], conv, rules, t),
                            rules=rules)
    summary = {"pred": str(pred), "ref": str(ref), "label_convention": conv, "cases": len(refs),
               "task": t.name, "task_source": task_why, "regions": list(t.scored),
               "unmatched_predictions": sorted(set(preds) - set(refs)),
               "rules": rules, "metric_conventions": rule_set.description,
               "rule_set": describe_rules(rule_set),
               "overall": summarize(rows)}
    write_rows(rows, out / "metrics.csv")
    write_json(summary, out / "summary.json")
    return summary


def _cell(stats: dict, fmt: str) -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:{fmt}} ± {stats['std']:{fmt}}"


def format_table(overall: dict, lines_before: list[tuple[str, dict]] = (),
                 rules: str = DEFAULT_RULES) -> str:
    """Mean ± std per region: one Dice line per (name, block) in `lines_before`, then
    the overall Dice, IoU and HD95 lines, and the lesion-wise lines when `overall` has
    them; then the mean IoU over the regions (a case's mean, averaged over the cases)
    and a line naming the rule set."""
    regions = list(overall) or list(REGIONS)
    out = [f"{'':10}" + "".join(f"{r:>22}" for r in regions)]
    units = "vox" if get_rules(rules).units == "voxel" else "mm"

    def line(name: str, block: dict, metric: str, fmt: str) -> str:
        return f"{name:10}" + "".join(f"{_cell(block[r][metric], fmt):>22}" for r in regions)

    out += [line(name, block, "dice", ".3f") for name, block in lines_before]
    out.append(line("Dice", overall, "dice", ".3f"))
    first = overall[regions[0]] if overall else {}
    if "iou" in first:
        out.append(line("IoU", overall, "iou", ".3f"))
    out.append(line(f"HD95 {units}", overall, "hd95", ".1f"))
    for metric, name, fmt in (("nsd", "NSD", ".3f"), ("lesion_dice", "LW Dice", ".3f"),
                              ("lesion_hd95", f"LW HD95 {units}", ".1f"),
                              ("lesion_nsd", "LW NSD", ".3f")):
        if metric in first:
            out.append(line(name, overall, metric, fmt))
    if "mean_iou" in first:
        out.append(f"{'mean IoU':10}{_cell(first['mean_iou'], '.3f'):>22}  (per case, over "
                   + ", ".join(regions) + ")")
    out.append(f"scoring rules: {rules} (README: 'Scoring rules')")
    return "\n".join(out)
