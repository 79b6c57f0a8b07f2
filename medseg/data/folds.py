"""Patient-grouped, tumour-size-stratified K-fold split, written as a MONAI datalist.

The split is data, not code: written once with a seed under ``data_lists/`` and
reused by every run. The file uses the Decathlon keys MONAI reads
(`monai.data.load_decathlon_datalist`, Auto3DSeg, Swin UNETR BraTS21):
``training`` entries with ``image`` (a list of the four modality files, or one
4D file for MSD), ``label`` and ``fold``, plus ``id`` and ``patient``;
``testing`` entries with ``image``. Paths are relative to the data root, so the
file is portable; channel order and label convention are recorded beside them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medseg import __version__
from medseg.data.discover import Case, Dataset, LabelScan
from medseg.data.io import write_json
from medseg.errors import DataError, MedsegError
from medseg.labels import LabelConvention, Task, brats_cohort, detect_task, resolve_task

__all__ = ["assign_folds", "build_datalist", "write_datalist", "load_datalist"]


def _size_bins(volumes: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bin (0..n_bins-1) of each whole-tumour volume."""
    if n_bins <= 1:
        return np.zeros(len(volumes), int)
    edges = np.quantile(volumes, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, volumes, side="right")


def assign_folds(case_ids: list[str], patients: list[str], volumes: list[float],
                 n_folds: int, seed: int) -> dict[str, int]:
    """Fold (0..n_folds-1) of each case: patients never straddle folds, tumour
    sizes are balanced across folds as far as the counts allow.

    Stratifies on whole-tumour volume quantiles (up to 3 bins: small, medium,
    large), with fewer bins when there are not `n_folds` patients per bin.
    Deterministic for a given `seed` and input (order-independent).
    """
    if n_folds < 2:
        raise MedsegError(f"--folds {n_folds}: a cross-validation split needs at least 2 folds; to "
                          "train one model on every case, split with --folds 2 (or more) and run "
                          "`medseg train` without --fold")
    n_patients = len(set(patients))
    if n_patients < n_folds:
        raise MedsegError(
            f"{n_folds} folds need at least {n_folds} patients with labels, found {n_patients} "
            f"({len(case_ids)} cases); use fewer --folds or add cases")
    order = np.argsort(case_ids, kind="stable")  # independent of discovery order
    ids = [case_ids[i] for i in order]
    pats = [patients[i] for i in order]
    # One volume per patient (mean over time points) so a patient has one stratum.
    per_patient: dict[str, list[float]] = {}
    for p, i in zip(pats, order):
        per_patient.setdefault(p, []).append(volumes[i])
    names = sorted(per_patient)
    pvol = np.array([np.mean(per_patient[p]) for p in names])
    n_bins = max(1, min(3, n_patients // n_folds))
    pbin = dict(zip(names, _size_bins(pvol, n_bins)))
    # StratifiedGroupKFold shuffles only within a stratum; permute patients first
    # (seeded) so that the seed changes the whole assignment.
    rng = np.random.default_rng(seed)
    rank = dict(zip(names, rng.permutation(len(names))))
    perm = sorted(range(len(ids)), key=lambda i: (rank[pats[i]], ids[i]))
    y = np.array([pbin[pats[i]] for i in perm])
    groups = np.array([rank[pats[i]] for i in perm])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" for tiny datasets
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(perm)), y, groups)):
            for j in test:
                folds[ids[perm[j]]] = k
    return folds


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise DataError(f"{path}: lies outside the data root {root}; datalist paths are relative "
                        "to --data-root: move the file under it") from None


def _image_entry(case: Case, dataset: Dataset):
    paths = [_rel(p, dataset.root) for p in case.images]
    return paths[0] if dataset.layout.name == "msd" else paths


def build_datalist(dataset: Dataset, convention: LabelConvention, scans: list[LabelScan],
                   n_folds: int, seed: int, name: str = "") -> dict:
    """The datalist dictionary (see module docstring) for `dataset`."""
    bad = [c.case_id for c in dataset.cases if c.missing]
    if bad:
        raise DataError(f"{dataset.root}: cases {', '.join(bad[:5])} miss files; run "
                        "`medseg data check` for details and fix them before splitting")
    ids = [c.case_id for c in dataset.cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"{dataset.root}: duplicate case ids {', '.join(dup[:5])}; case ids must "
                        "be unique: run `medseg data check` and remove the duplicates")
    scan_of = {s.case_id: s for s in scans}
    train = dataset.training
    wt = convention.region_labels()["WT"]
    volumes = [scan_of[c.case_id].volume_ml(wt) for c in train]
    folds = assign_folds([c.case_id for c in train], [c.patient_id for c in train], volumes,
                         n_folds, seed)
    return {
        "name": name,
        "description": f"{n_folds}-fold patient-grouped split of {dataset.root.name}, "
                       "stratified by whole-tumour volume",
        "medseg_version": __version__,
        "layout": dataset.layout.name,
        "label_convention": convention.to_dict(),
        "channels": list(dataset.layout.channels),
        "regions": list(detect_task(convention, [brats_cohort(c.case_id) for c in train])[0].outputs),
        "num_folds": n_folds,
        "seed": seed,
        "paths": "relative to the data root (--data-root)",
        "training": [
            {"id": c.case_id, "patient": c.patient_id, "fold": folds[c.case_id],
             "image": _image_entry(c, dataset), "label": _rel(c.label, dataset.root),
             "wt_volume_ml": round(v, 3)}
            for c, v in zip(train, volumes)
        ],
        "testing": [{"id": c.case_id, "image": _image_entry(c, dataset)} for c in dataset.testing],
    }


def write_datalist(datalist: dict, out: str | Path, overwrite: bool = False) -> bool:
    """Write `datalist` to `out` atomically; returns False if an identical file exists.

    A different existing file is an error unless `overwrite`: a committed split
    must not change under a study's feet.
    """
    out = Path(out)
    if out.exists():
        try:
            same = json.loads(out.read_text()) == datalist
        except ValueError:
            same = False
        if same:
            return False
        if not overwrite:
            raise MedsegError(f"{out}: a different datalist already exists; a split is written "
                              "once and reused: pass --overwrite to replace it, or choose another --out")
    write_json(datalist, out)
    return True


def load_datalist(path: str | Path) -> dict:
    """Read a medseg datalist, with an error naming the file when it is not one."""
    path = Path(path)
    try:
        dl = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable datalist ({exc}); create one with "
                        "`medseg data split`") from None
    for key in ("training", "channels", "label_convention", "num_folds"):
        if key not in dl:
            raise DataError(f"{path}: datalist has no '{key}' key; create it with `medseg data split`")
    return dl


def datalist_task(dl: dict, task: str | None = None, source: str = "datalist") -> tuple[Task, str]:
    """The BraTS task of a datalist's cases → (task, why): `task` when given (``--task``,
    ``data.task``), else the datalist's ``task`` key (``medseg data split --task``), else
    detected from its label convention and the cohorts its case ids name
    (`medseg.labels.resolve_task`). Labels the task cannot learn from are an error."""
    return resolve_task(dl["label_convention"]["name"], [e["id"] for e in dl["training"]], task,
                        (dl.get("task"), source), source)
