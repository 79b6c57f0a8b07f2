"""A teacher's soft outputs for knowledge distillation (``train.distill``).

The teacher is a finished cross-validation run (``medseg cv --out RUN``): one
``fold_<k>/checkpoints/final.pt`` per fold. Student fold k learns from teacher
fold k only, and only on fold k's training cases, so no case of fold k's
validation set ever reaches student fold k, through its labels or through a
teacher output (teacher fold k never trained on them either, but its outputs on
them would still carry their appearance into the student). The final student
(``fold=None``, every case) learns from the mean of every teacher fold.

Teacher outputs are computed once per case, on the student's preprocessed
grid (the store's image, the arrays the patches are cut from), and kept like the
preprocessed dataset: one float16 ``(3, X, Y, Z)`` TC/WT/ET probability array per
case, memory-mapped when patches are read, under

    <store root>/teacher_outputs/t_<key>/<case>.npy   (+ <case>.json, teacher.json)

where ``<key>`` hashes the SHA-256 of every teacher checkpoint used, the store it
was computed on and the teacher's test-time augmentation. Retraining or replacing
a teacher fold changes its checksum, hence the key: its old outputs are never
read again. Each case's record also holds the CRC-32 of the store image it was
computed from, so a rebuilt store entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medseg.config import config_hash
from medseg.data.folds import load_datalist
from medseg.data.io import atomic_path, write_json
from medseg.data.preprocessed import Store
from medseg.errors import MedsegError
from medseg.labels import REGIONS

__all__ = ["TEACHER_DIR", "SOFT_DTYPE", "Teacher", "open_teacher", "file_sha256", "check_split",
           "check_pipeline", "targets_dir", "ensure_targets", "SoftTargets", "DISTILL_DEFAULT",
           "check_distill"]

#: Folder, beside the preprocessed datasets, of every teacher's stored outputs.
TEACHER_DIR = "teacher_outputs"
SOFT_DTYPE = np.float16
#: Bumped when the stored form or how outputs are computed changes.
TARGETS_VERSION = 1
#: ``train.distill`` of a run that distils nothing (and of configs older than the key).
DISTILL_DEFAULT = {"teacher": None, "weight": 0.5, "teacher_tta": False}


def check_distill(spec: dict) -> dict:
    """``train.distill`` checked: teacher (None or a folder), weight in [0, 1]."""
    if not isinstance(spec, dict) or set(spec) != set(DISTILL_DEFAULT):
        raise MedsegError(f"train.distill={spec!r}: expected {{'teacher': null or a cv run folder, "
                          f"'weight': 0..1, 'teacher_tta': true/false}}")
    w = spec["weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0:
        raise MedsegError(f"train.distill.weight={w!r}: expected a number in [0, 1] (the share of the "
                          "teacher's probabilities in each voxel's target; 0 = labels only)")
    if not isinstance(spec["teacher_tta"], bool):
        raise MedsegError(f"train.distill.teacher_tta={spec['teacher_tta']!r}: expected true or false")
    if spec["teacher"] is not None and not isinstance(spec["teacher"], str):
        raise MedsegError(f"train.distill.teacher={spec['teacher']!r}: expected null or the folder of a "
                          "`medseg cv` run")
    return spec


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Teacher:
    """A finished cross-validation run used as a teacher."""
    run: Path
    checkpoints: dict[int, Path]       # fold → final.pt
    metas: dict[int, dict]             # fold → checkpoint meta
    sha256: dict[int, str]             # fold → checksum of final.pt

    def folds_for(self, fold: int | None) -> list[int]:
        """The teacher folds whose outputs student `fold` learns from."""
        if fold is None:
            return sorted(self.checkpoints)
        if fold not in self.checkpoints:
            raise MedsegError(f"teacher {self.run}: no fold {fold} (it has folds {sorted(self.checkpoints)}); "
                              "the student's split must be the teacher's")
        return [fold]

    def describe(self, fold: int | None) -> dict:
        """What a student checkpoint records about its teacher."""
        folds = self.folds_for(fold)
        first = self.metas[folds[0]]
        summary = self.run / "cv_summary.json"
        scores = None
        if summary.is_file():
            s = json.loads(summary.read_text())
            scores = {"rules": s.get("rules"), **{r: {m: s["overall"][r][m]["mean"] for m in ("dice", "hd95")
                                                      if m in s["overall"][r]} for r in s["overall"]}}
        return {"run": str(self.run), "folds": folds, "network": first["network"], "cv_scores": scores,
                "checkpoints": {str(k): {"path": str(self.checkpoints[k]), "sha256": self.sha256[k]}
                                for k in folds}}


def open_teacher(run: str | Path) -> Teacher:
    """The fold checkpoints of the cross-validation run `run` (every fold its split
    has), with their metadata and checksums; a clear error when a fold is missing."""
    import torch
    run = Path(run)
    if not run.is_dir():
        raise MedsegError(f"teacher {run}: not a folder; pass the --out folder of a `medseg cv` run")
    found = sorted(run.glob("fold_*/checkpoints/final.pt"))
    if not found:
        raise MedsegError(f"teacher {run}: no fold_<k>/checkpoints/final.pt; the teacher must be a finished "
                          "`medseg cv` run (train every fold first)")
    ckpts, metas, shas = {}, {}, {}
    for path in found:
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise MedsegError(f"teacher checkpoint {path}: not readable ({type(exc).__name__}: {exc})") from None
        k = meta.get("fold")
        if not isinstance(k, int):
            raise MedsegError(f"teacher checkpoint {path}: trained on every case (no fold); a teacher for "
                              "cross-validated distillation needs one checkpoint per fold (`medseg cv`)")
        ckpts[k], metas[k], shas[k] = path, meta, file_sha256(path)
    k_total = _num_folds(metas[min(metas)], run)
    missing = [k for k in range(k_total) if k not in ckpts]
    if missing:
        raise MedsegError(f"teacher {run}: folds {missing} of {k_total} have no checkpoints/final.pt; finish "
                          f"the teacher's cross-validation (`medseg cv --out {run} ...` resumes it)")
    return Teacher(run, ckpts, metas, shas)


def _num_folds(meta: dict, run: Path) -> int:
    summary = run / "cv_summary.json"
    if summary.is_file():
        return int(json.loads(summary.read_text())["num_folds"])
    try:
        return int(load_datalist(meta["datalist"])["num_folds"])
    except (MedsegError, OSError, KeyError):
        raise MedsegError(f"teacher {run}: neither cv_summary.json nor its datalist {meta.get('datalist')} "
                          "is readable, so its number of folds is unknown; finish the teacher's "
                          "cross-validation first") from None


def check_split(teacher: Teacher, fold: int | None, train_ids: Sequence[str], val_ids: Sequence[str]) -> None:
    """Student fold k must hold out exactly teacher fold k's validation cases: else a
    case the student is scored on could have shaped its teacher's outputs (or the
    student would be scored on cases its teacher trained on)."""
    if fold is None:
        return
    meta = teacher.metas[fold]
    try:
        dl = load_datalist(meta["datalist"])
    except (MedsegError, OSError) as exc:
        raise MedsegError(f"teacher fold {fold}: its datalist {meta.get('datalist')} is not readable ({exc}); "
                          "the teacher's split cannot be checked against the student's") from None
    t_val = {e["id"] for e in dl["training"] if e["fold"] == fold}
    t_train = {e["id"] for e in dl["training"] if e["fold"] != fold}
    s_val, s_train = set(val_ids), set(train_ids)
    if s_val != t_val or not s_train <= t_train:
        leak = sorted(s_val & t_train)[:3]
        raise MedsegError(
            f"fold {fold}: the student's split differs from the teacher's ({meta['datalist']}): "
            f"{len(s_val ^ t_val)} validation cases differ" + (f", e.g. {leak} trained the teacher" if leak else "")
            + "; distil with the teacher's datalist (the default) so out-of-fold scores stay honest")


def check_pipeline(teacher: Teacher, store: Store) -> None:
    """The teacher must read the student's preprocessed grid as its own input."""
    from medseg.pipeline import PipelineSpec
    meta = teacher.metas[min(teacher.metas)]
    spec = PipelineSpec.from_meta(meta, str(teacher.checkpoints[min(teacher.metas)]))
    mine = store.settings["pipeline"]
    theirs = spec.preprocessing()
    if theirs != mine or meta["label_convention"] != store.convention:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise MedsegError(
            f"teacher {teacher.run}: its preprocessing differs from the student's ({', '.join(diff) or 'labels'}: "
            f"teacher {[theirs.get(k) for k in diff]}, student {[mine.get(k) for k in diff]}); distillation "
            "computes the teacher's outputs on the student's grid: set the student's data.spacing to the "
            f"teacher's ({list(spec.spacing)})")


def targets_dir(root: Path, teacher: Teacher, fold: int | None, store: Store, tta: bool) -> Path:
    """The folder of the outputs of `teacher`'s folds for student `fold` on `store`."""
    key = config_hash({"version": TARGETS_VERSION, "sha256": [teacher.sha256[k] for k in teacher.folds_for(fold)],
                       "store": store.path.name, "tta": bool(tta)})
    return Path(root) / TEACHER_DIR / f"t_{key}"


def _record(store: Store, case_id: str) -> dict:
    return {"case": case_id, "image_crc32": store.entry(case_id)["files"]["image.npy"]["crc32"]}


def _current(folder: Path, store: Store, case_id: str, n_regions: int = len(REGIONS)) -> bool:
    rec, arr = folder / f"{case_id}.json", folder / f"{case_id}.npy"
    if not (rec.is_file() and arr.is_file()):
        return False
    try:
        same = json.loads(rec.read_text()) == _record(store, case_id)
        shape = np.load(arr, mmap_mode="r").shape
    except (OSError, ValueError):
        return False
    return same and tuple(shape) == (n_regions, *store.image(case_id).shape[1:])


def ensure_targets(root: Path, teacher: Teacher, fold: int | None, store: Store, case_ids: Sequence[str],
                   tta: bool = False, device: str | None = None,
                   print_fn: Callable[[str], None] = print) -> Path:
    """Compute (once) the teacher's probabilities of `case_ids` for student `fold` on
    `store`'s grid → their folder. Teacher fold k for fold k; the mean of every
    teacher fold for the final student. Each file is written atomically."""
    check_pipeline(teacher, store)
    folder = targets_dir(root, teacher, fold, store, tta)
    n_regions = len(teacher.metas[min(teacher.metas)].get("regions", REGIONS))
    todo = [c for c in case_ids if not _current(folder, store, c, n_regions)]
    folds = teacher.folds_for(fold)
    write_json({**teacher.describe(fold), "store": str(store.path), "tta": bool(tta),
                "version": TARGETS_VERSION}, folder / "teacher.json")
    if not todo:
        return folder
    from medseg.infer import Predictor
    eng = Predictor([teacher.checkpoints[k] for k in folds], device=device, mirror=tta)
    print_fn(f"teacher {teacher.run.name} fold(s) {folds}: computing outputs of {len(todo)} case(s) "
             f"({len(case_ids) - len(todo)} stored) → {folder}")
    for case_id in todo:
        x = np.asarray(store.image(case_id), dtype=np.float32)
        p = eng._to_numpy(eng.member_mean(eng._to_backend(x)))
        with atomic_path(folder / f"{case_id}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, p.astype(SOFT_DTYPE))
        write_json(_record(store, case_id), folder / f"{case_id}.json")
    return folder


class SoftTargets:
    """Read-only access to one folder of stored teacher outputs, limited to the cases
    it was made for (reading any other case is an error, not a silent leak)."""

    def __init__(self, folder: Path, case_ids: Sequence[str], weight: float):
        self.folder, self.case_ids, self.weight = Path(folder), frozenset(case_ids), float(weight)

    def read(self, case_id: str) -> np.ndarray:
        """`(3, X, Y, Z)` float16 probabilities, memory-mapped."""
        if case_id not in self.case_ids:
            raise MedsegError(f"teacher outputs of case {case_id} requested, but it is not a training case "
                              "of this student fold")
        return np.load(self.folder / f"{case_id}.npy", mmap_mode="r")
