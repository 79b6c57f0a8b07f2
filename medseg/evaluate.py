"""Evaluation of label-map files against references, per case and region.

Used by `medseg cv` for out-of-fold predictions (and by `medseg evaluate`).
Metric conventions are those of `medseg.metrics` (BraTS: pooled HD95, empty-mask
rules, 373.13 mm penalty). Both files must lie on the same grid: a prediction on
another grid is an error, never a resampled guess.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable

import numpy as np

from medseg.data.io import atomic_path, load_array, load_header
from medseg.errors import DataError
from medseg.labels import REGIONS, labels_to_regions, validate_labels
from medseg.metrics import METRICS, case_metrics

__all__ = ["load_regions", "evaluate_case", "metric_rows", "summarize", "write_rows", "read_rows"]


def load_regions(path: str | Path, convention: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Label file → (`(3, X, Y, Z)` bool TC/WT/ET, affine, voxel spacing in mm)."""
    img = load_header(Path(path))
    lab = load_array(Path(path), img, dtype=np.float32)
    if lab.ndim != 3:
        raise DataError(f"{path}: expected a 3D label map, found shape {lab.shape}")
    validate_labels(np.unique(lab), convention, str(path))
    return labels_to_regions(lab.astype(np.int16), convention), img.affine, \
        tuple(float(z) for z in img.header.get_zooms()[:3])


def evaluate_case(pred: str | Path, ref: str | Path, convention: str) -> dict[str, dict[str, float]]:
    """{region: {metric: value}} for one prediction file against its reference."""
    p, p_aff, _ = load_regions(pred, convention)
    r, r_aff, spacing = load_regions(ref, convention)
    if p.shape != r.shape or not np.allclose(p_aff, r_aff, atol=1e-3):
        raise DataError(f"{pred}: grid {p.shape[1:]} does not match the reference {ref} "
                        f"{r.shape[1:]} (or their affines differ); predictions must be written on "
                        "the reference image grid (medseg predict does this)")
    return case_metrics(p, r, spacing)


def metric_rows(case_id: str, metrics: dict[str, dict[str, float]], **extra) -> list[dict]:
    """One row per region: {**extra, case, region, dice, hd95, …}."""
    return [{**extra, "case": case_id, "region": r, **metrics[r]} for r in REGIONS]


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
            "n": int(v.size)}


def summarize(rows: Iterable[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{region: {metric: {mean, std, median, n}}} over the rows."""
    rows = list(rows)
    return {r: {m: _stats([row[m] for row in rows if row["region"] == r]) for m in METRICS}
            for r in REGIONS if any(row["region"] == r for row in rows)}


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
    """CSV written by `write_rows` → rows with metric values as floats."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for m in METRICS:
            row[m] = float(row[m])
    return rows
