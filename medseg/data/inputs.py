"""Inputs of prediction (torch-free, shared by the PyTorch and ONNX engines): cases
from a data folder, a datalist or four explicit files, and the output-safety rules
(never inside the input folder, never overwrite without asking)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.data.discover import LAYOUTS, discover
from medseg.data.folds import load_datalist
from medseg.data.io import is_nifti, load_header, nifti_stem, write_json
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS, get_convention

__all__ = ["InputCase", "cases_from_input", "single_case", "output_convention", "write_manifest",
           "case_headers", "check_outputs"]


@dataclass
class InputCase:
    case_id: str
    images: list[Path]
    channels: list[str]
    #: Label convention of the dataset the case comes from (None: its names do not
    #: tell), and where that was read.
    convention: str | None = None
    convention_source: str = ""


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
        conv = dl["label_convention"]["name"]
        cases = []
        for e in dl["training"] + dl.get("testing", []):
            imgs = e["image"] if isinstance(e["image"], list) else [e["image"]]
            cases.append(InputCase(e["id"], [root / i for i in imgs], list(dl["channels"]), conv,
                                   f"the datalist {path.name}"))
        return cases, root
    if not path.is_dir():
        raise MedsegError(f"--input {path}: not a folder or a datalist .json")
    ds = discover(path)
    bad = [c for c in ds.cases if c.missing]
    if bad:
        c = bad[0]
        raise DataError(f"{c.folder}: case {c.case_id} misses {', '.join(c.missing)}; every case "
                        "needs all four modalities (run `medseg data check`)")
    src = f"the {ds.layout.name} file names in {path}"
    return [InputCase(c.case_id, list(c.images), list(ds.layout.channels), ds.layout.convention, src)
            for c in ds.cases], path


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
    conv = _convention_from_names(got)
    return InputCase(case_id or first, [got[c] for c in CHANNELS], list(CHANNELS), conv,
                     f"the {conv} file names (_t1, _t1ce, … or -t1n, -t1c, …)" if conv else "")


def _convention_from_names(files: dict[str, Path]) -> str | None:
    """BraTS 2018-2021 (`_t1 _t1ce _t2 _flair`) or BraTS 2023+ (`-t1n -t1c -t2w -t2f`)
    names on all four files → that dataset's label convention; anything else → None."""
    for name in ("brats2021", "brats2023"):
        lay = LAYOUTS[name]
        if all(nifti_stem(files[ch]).endswith(lay.sep + lay.keys[ch]) for ch in CHANNELS):
            return lay.convention
    return None


def output_convention(cases: Sequence[InputCase], override: str | None,
                      model_convention: str) -> tuple[str, str]:
    """The label convention of the masks, and why: `override` (``--convention``), else
    the input's own (detected for its folder, recorded in its datalist, or read from
    the file names), else — only when the input does not tell — the model's training
    data's, said so in the returned reason."""
    if override:
        return get_convention(override).name, "--convention"
    found = {(c.convention, c.convention_source) for c in cases if c.convention}
    if len({conv for conv, _ in found}) > 1:
        raise MedsegError(f"the input cases use several label conventions ({sorted(found)}); "
                          "predict one dataset at a time or pass --convention")
    if found:
        return next(iter(found))
    return model_convention, ("the model's training data: the input's file names do not tell; "
                              "pass --convention to choose")


def write_manifest(out_dir: Path, targets: Sequence[Path], convention: str, source: str,
                   **facts) -> Path:
    """``out_dir/predictions.json``: the label convention of the masks (and why), the
    label values, and `facts` (model, engine, post-processing …), written atomically."""
    out = Path(out_dir) / "predictions.json"
    write_json({"label_convention": convention, "convention_source": source,
                "labels": get_convention(convention).to_dict(), **facts,
                "masks": [Path(t).name for t in targets]}, out)
    return out


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
