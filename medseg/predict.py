"""`medseg predict`: masks for every case of a folder or datalist, or for one case
given as four files, written on each input's own grid.

Safety: output never goes into the input folder, existing masks are not
overwritten without `overwrite`, and every mask is written atomically, so an
interrupted run leaves only complete masks (re-running skips nothing silently:
it refuses, or overwrites on request).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from medseg.data.discover import LAYOUTS, discover
from medseg.data.folds import load_datalist
from medseg.data.io import is_nifti
from medseg.errors import DataError, MedsegError
from medseg.infer import Predictor, predict_case
from medseg.labels import CHANNELS

__all__ = ["InputCase", "resolve_checkpoints", "default_postprocessing", "cases_from_input",
           "single_case", "predict_all"]


@dataclass
class InputCase:
    case_id: str
    images: list[Path]
    channels: list[str]


def resolve_checkpoints(model: Sequence[str | Path]) -> list[Path]:
    """A cv run folder (every ``fold_*/checkpoints/final.pt``: the fold ensemble), a
    train run folder (``checkpoints/final.pt``) or checkpoint files."""
    out: list[Path] = []
    for m in model:
        p = Path(m)
        if p.is_file():
            out.append(p)
        elif (p / "checkpoints" / "final.pt").is_file():
            out.append(p / "checkpoints" / "final.pt")
        elif p.is_dir() and sorted(p.glob("fold_*/checkpoints/final.pt")):
            out += sorted(p.glob("fold_*/checkpoints/final.pt"))
        else:
            raise MedsegError(f"--model {p}: no checkpoint found; expected a .pt file, a training "
                              "run folder (with checkpoints/final.pt) or a cross-validation folder "
                              "(with fold_*/checkpoints/final.pt) whose training has finished")
    return out


def default_postprocessing(model: Sequence[str | Path]) -> dict:
    """The ``postprocessing.json`` that `medseg cv` chose, when `model` is one cv folder."""
    if len(model) == 1 and (Path(model[0]) / "postprocessing.json").is_file():
        post = json.loads((Path(model[0]) / "postprocessing.json").read_text())
        return {"et_min_ml": float(post["et_min_ml"])}
    return {}


def cases_from_input(path: str | Path, data_root: str | Path | None = None) -> tuple[list[InputCase], Path]:
    """A data folder (any supported layout; labels are ignored) or a datalist JSON
    (all its cases, training and testing) → cases, and the folder they live in."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        if data_root is None:
            raise MedsegError(f"--input {path} is a datalist: pass --data-root, the folder its "
                              "paths are relative to")
        dl = load_datalist(path)
        root = Path(data_root)
        cases = []
        for e in dl["training"] + dl.get("testing", []):
            imgs = e["image"] if isinstance(e["image"], list) else [e["image"]]
            cases.append(InputCase(e["id"], [root / i for i in imgs], list(dl["channels"])))
        return cases, root
    if not path.is_dir():
        raise MedsegError(f"--input {path}: not a folder or a datalist .json")
    ds = discover(path)
    bad = [c for c in ds.cases if c.missing]
    if bad:
        c = bad[0]
        raise DataError(f"{c.folder}: case {c.case_id} misses {', '.join(c.missing)}; every case "
                        "needs all four modalities (run `medseg data check`)")
    return [InputCase(c.case_id, list(c.images), list(ds.layout.channels)) for c in ds.cases], path


def single_case(files: dict[str, str | None], case_id: str | None = None) -> InputCase:
    """Four explicit files, keyed t1/t1ce/t2/flair (BraTS 2023 names t1n/t1c/t2w/t2f accepted)."""
    alias = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
    got: dict[str, Path] = {}
    for key, val in files.items():
        if val:
            got[alias.get(key, key)] = Path(val)
    missing = [c for c in CHANNELS if c not in got]
    if missing:
        raise MedsegError(f"single-case prediction needs all four modalities; missing "
                          f"{', '.join('--' + m for m in missing)}")
    for ch, p in got.items():
        if not p.is_file():
            raise DataError(f"--{ch} {p}: file not found")
        if not is_nifti(p):
            raise DataError(f"--{ch} {p}: expected a .nii or .nii.gz file")
    first = got["t1"].name
    for suffix in ("_t1.nii.gz", "-t1n.nii.gz", "_t1.nii", "-t1n.nii", ".nii.gz", ".nii"):
        if first.endswith(suffix):
            first = first[: -len(suffix)]
            break
    return InputCase(case_id or first, [got[c] for c in CHANNELS], list(CHANNELS))


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def predict_all(checkpoints: Sequence[Path], cases: list[InputCase], out_dir: str | Path,
                input_root: Path | None, convention: str | None = None, overwrite: bool = False,
                device: str | None = None, overlap: float | None = None,
                sw_batch_size: int | None = None, amp: bool | None = None, mirror: bool = False,
                min_component_ml: float = 0.0, et_min_ml: float = 0.0, probabilities: bool = False,
                print_fn: Callable[[str], None] = print) -> list[Path]:
    """Predict every case into ``out_dir/<case_id>.nii.gz``; returns the written paths."""
    out_dir = Path(out_dir)
    roots = {input_root} if input_root else {c.images[0].parent for c in cases}
    for r in roots:
        if _inside(out_dir, r):
            raise MedsegError(f"--out {out_dir} lies inside the input folder {r}; medseg never "
                              "writes into its inputs: choose an output folder elsewhere")
    targets = [out_dir / f"{c.case_id}.nii.gz" for c in cases]
    probs = [out_dir / "probabilities" / f"{c.case_id}.nii.gz" for c in cases]
    existing = [t for t in targets + (probs if probabilities else []) if t.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]} already exists ({len(existing)} of {len(targets)} masks); "
                          "pass --overwrite to replace them, or choose another --out")
    predictor = Predictor(checkpoints, device=device, overlap=overlap, sw_batch_size=sw_batch_size,
                          amp=amp, mirror=mirror, min_component_ml=min_component_ml,
                          et_min_ml=et_min_ml)
    conv = convention or predictor.meta["label_convention"]
    t0 = time.perf_counter()
    for i, (case, target) in enumerate(zip(cases, targets), 1):
        t = time.perf_counter()
        predict_case(predictor, case.images, conv, target, case.channels,
                     probs[i - 1] if probabilities else None)
        print_fn(f"[{i}/{len(cases)}] {case.case_id} → {target} ({time.perf_counter() - t:.1f} s)")
    print_fn(f"{len(cases)} masks in {time.perf_counter() - t0:.1f} s; labels {conv}, "
             f"{len(checkpoints)} model(s){', mirror TTA' if mirror else ''}; post-processing: "
             f"components < {min_component_ml} mL removed, ET < {et_min_ml} mL → necrosis")
    return targets


def layout_convention(layout: str) -> str:
    """The label convention a layout's masks use by default."""
    return {"brats2021": "brats2021", "brats2023": "brats2023", "msd": "msd"}[LAYOUTS[layout].name]
