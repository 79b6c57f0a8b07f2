"""Inputs of prediction (torch-free, shared by the PyTorch and ONNX engines): cases
from a data folder, a datalist or four explicit files, and the output-safety rules
(never inside the input folder, never overwrite without asking)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.data.discover import discover
from medseg.data.folds import load_datalist
from medseg.data.io import is_nifti, load_header
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS

__all__ = ["InputCase", "cases_from_input", "single_case", "case_headers", "check_outputs"]


@dataclass
class InputCase:
    case_id: str
    images: list[Path]
    channels: list[str]


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


def check_outputs(out_dir: Path, cases: Sequence[InputCase], input_root: Path | None,
                  targets: Sequence[Path], overwrite: bool) -> None:
    """Refuse an output folder inside an input folder, and existing targets unless
    `overwrite`."""
    roots = {input_root} if input_root else {c.images[0].parent for c in cases}
    for r in roots:
        if _inside(out_dir, r):
            raise MedsegError(f"--out {out_dir} lies inside the input folder {r}; medseg never "
                              "writes into its inputs: choose an output folder elsewhere")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]} already exists ({len(existing)} of {len(targets)} outputs); "
                          "pass --overwrite to replace them, or choose another --out")


def case_headers(images: Sequence[Path]) -> list:
    """Headers of one case's files, checked: four co-registered 3D files or one 4D
    file with 4 channels; otherwise a `DataError` naming the file and the fix."""
    heads = [load_header(p) for p in images]   # readable NIfTI, else a DataError naming it
    for p, h in zip(images[1:], heads[1:]):
        if h.shape[:3] != heads[0].shape[:3] or not np.allclose(h.affine, heads[0].affine, atol=1e-3):
            raise DataError(f"{p}: grid {h.shape[:3]} does not match {images[0].name} "
                            f"{heads[0].shape[:3]} (shape or affine differ); all modalities of a "
                            "case must be co-registered on one grid: resample this file onto it")
    four_3d = len(images) == len(CHANNELS) and len(heads[0].shape) == 3
    one_4d = len(images) == 1 and len(heads[0].shape) == 4 and heads[0].shape[3] == len(CHANNELS)
    if not (four_3d or one_4d):
        raise DataError(f"{images[0]}: expected four 3D files or one 4D file with 4 channels, "
                        f"found {len(images)} file(s) of shape {heads[0].shape}")
    return heads
