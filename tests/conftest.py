"""Shared fixtures: tiny synthetic datasets, made once per session and copied
before a test breaks them."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import pytest

from medseg.data.synth import synthesize

TINY = (40, 40, 28)


@pytest.fixture(scope="session")
def _pristine(tmp_path_factory):
    made: dict[tuple, Path] = {}

    def get(layout: str, cases: int = 6, test_cases: int = 0, seed: int = 0) -> Path:
        key = (layout, cases, test_cases, seed)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{layout}_{cases}_{test_cases}_{seed}") / "data"
            synthesize(root, cases, layout, seed, TINY, test_cases=test_cases)
            made[key] = root
        return made[key]
    return get


@pytest.fixture
def dataset(_pristine, tmp_path):
    """`dataset(layout, cases=6, test_cases=0)` → a fresh copy of a tiny synthetic dataset."""
    def make(layout: str, cases: int = 6, test_cases: int = 0, seed: int = 0) -> Path:
        dst = tmp_path / f"{layout}_{cases}_{test_cases}_{seed}"
        if not dst.exists():
            shutil.copytree(_pristine(layout, cases, test_cases, seed), dst)
        return dst
    return make


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `root` (to prove nothing changed)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


#: Overrides that make a training run take seconds on the 40×40×28 (6 mm) tiny data.
TINY_TRAIN = [
    "model.args.filters=[8,16,32]", "data.spacing=[6,6,6]", "data.num_workers=0",
    "train.patch=[16,16,16]", "train.epochs=2", "train.iters_per_epoch=2", "train.batch_size=2",
    "train.val_every=1", "train.warmup_epochs=0", "infer.sw_batch_size=4",
]


@pytest.fixture
def split(dataset, tmp_path):
    """`split(layout, cases=6, folds=2)` → (datalist path, data root) of a fresh tiny dataset."""
    def make(layout: str = "brats2023", cases: int = 6, folds: int = 2, seed: int = 0):
        from medseg.data.discover import discover, resolve_convention
        from medseg.data.folds import build_datalist, write_datalist
        root = dataset(layout, cases, seed=seed)
        ds = discover(root)
        conv, scans = resolve_convention(ds)
        out = tmp_path / f"{layout}_{cases}_{folds}.json"
        write_datalist(build_datalist(ds, conv, scans, folds, 0, out.stem), out)
        return out, root
    return make


def tiny_cv_run(pristine, base: Path, folds: int, overrides: list[str],
                only: list[int] | None = None) -> tuple[Path, Path]:
    """Copy the tiny 6-case brats2023 dataset to `base/data`, split it into `folds`
    and run `medseg cv` (`only`: a fold subset) → (run folder, data root)."""
    from medseg.config import resolve_config
    from medseg.cv import run_cv
    from medseg.data.discover import discover, resolve_convention
    from medseg.data.folds import build_datalist, write_datalist
    root = base / "data"
    shutil.copytree(pristine("brats2023", 6), root)
    ds = discover(root)
    conv, scans = resolve_convention(ds)
    write_datalist(build_datalist(ds, conv, scans, folds, 0, "t"), base / "split.json")
    run_cv(resolve_config("cpu", [*TINY_TRAIN, *overrides]), base / "split.json", root,
           base / "run", folds=only, print_fn=lambda s: None)
    return base / "run", root


def reoriented_case(src_case: Path, dst: Path, codes: tuple[str, str, str], zoom_z: int = 1) -> Path:
    """Copy a case with every file re-oriented to `codes` (voxels and affine move
    together: same anatomy, other storage order); `zoom_z` keeps every n-th slice
    along the last stored axis (thick slices)."""
    dst.mkdir(parents=True)
    for f in sorted(src_case.iterdir()):
        img = nib.load(f)
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                               nib.orientations.axcodes2ornt(codes))
        out = img.as_reoriented(ornt)
        if zoom_z > 1:
            out = out.slicer[:, :, ::zoom_z]
        nib.save(out, dst / f.name)
    return dst


def rotation(angles_deg: tuple[float, float, float]):
    """4×4 rotation about x, then y, then z (degrees)."""
    import numpy as np
    out = np.eye(4)
    for axis, deg in enumerate(angles_deg):
        a = np.deg2rad(deg)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(4)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def oblique_case(src_case: Path, dst: Path, angles_deg: tuple[float, float, float], zoom_z: int = 1) -> Path:
    """Copy a case with every file's affine rotated by `angles_deg` about the volume
    centre (the same voxels, an oblique pose, as a scanner writes a tilted slab);
    `zoom_z` keeps every n-th slice along the last axis (thick oblique slices)."""
    import numpy as np
    dst.mkdir(parents=True)
    for f in sorted(src_case.iterdir()):
        img = nib.load(f)
        if zoom_z > 1:
            img = img.slicer[:, :, ::zoom_z]
        centre = img.affine @ np.array([*(np.array(img.shape[:3]) - 1) / 2.0, 1.0])
        shift = np.eye(4)
        shift[:3, 3] = centre[:3]
        affine = shift @ rotation(angles_deg) @ np.linalg.inv(shift) @ img.affine
        out = nib.Nifti1Image(np.asarray(img.dataobj), affine)
        out.set_qform(affine, 1)
        out.set_sform(affine, 1)
        nib.save(out, dst / f.name)
    return dst
