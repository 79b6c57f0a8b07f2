"""A raw study's four series → the atlas-space case (BraTS layout) and back.

`prepare` runs the steps of `medseg.raw.register` on the chosen series and writes
the atlas-space case — four bias-corrected, skull-stripped modalities on the
atlas grid in the BraTS 2023 layout, with its brain mask and the transforms —
so every other medseg command can use it. `PreparedCase.to_native` maps maps
on the atlas grid (probabilities, uncertainty) onto a native series' grid.

QC (`PreparedCase.qc`): per registration its mutual information and the size of
the motion it found; the brain volume in mL; each out of its plausible range is
a reason for review, and `review_reasons` lists them. A registration that moved a
series by more than `MAX_SHIFT_MM` / `MAX_ROTATION_DEG`, or an atlas scale
outside `ATLAS_SCALE`, or a brain outside `BRAIN_ML`, means the case is not
trusted: the caller writes no mask for it unless asked to (`--accept-review`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from medseg.data.io import write_json, write_nifti
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS
from medseg.raw import register as rg
from medseg.raw.register import affine_transform

__all__ = ["BRAIN_EXTRACTORS", "BRAIN_ML", "MAX_SHIFT_MM", "MAX_ROTATION_DEG", "ATLAS_SCALE",
           "LAYOUT_KEYS", "PreparedCase", "prepare", "affine_transform"]

#: Brain extractors: the built-in one, and the field's standard tools when installed
#: (their command on PATH, run on the N4-corrected T1ce).
BRAIN_EXTRACTORS = {
    "builtin": "medseg's skull-enclosure extractor (no download, no GPU)",
    "hd-bet": "HD-BET 2.x (command `hd-bet`, pip install hd-bet; its weights are its own business)",
    "synthstrip": "SynthStrip (command `mri_synthstrip`, FreeSurfer ≥ 7.3 or the synthstrip container)",
}

#: Plausible adult brain volume (mL) after extraction: outside → review.
BRAIN_ML = (800.0, 2000.0)
#: Largest plausible patient motion between two series of one study.
MAX_SHIFT_MM = 40.0
MAX_ROTATION_DEG = 25.0
#: Plausible range of the atlas registration's scale factors.
ATLAS_SCALE = (0.75, 1.35)
#: Lowest plausible mutual information (−metric) of a converged registration.
MIN_MI = 0.15

#: BraTS 2023 file keys of the atlas-space case.
LAYOUT_KEYS = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}



def _motion(m: np.ndarray) -> tuple[float, float]:
    """A rigid 4×4 → (rotation angle in degrees, translation of the head centre in mm)."""
    cos = (np.trace(m[:3, :3]) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1)))), float(np.linalg.norm(m[:3, 3]))


@dataclass
class PreparedCase:
    """The atlas-space case of one study and how it got there."""

    case_id: str
    folder: Path                                  # the BraTS-layout case folder
    images: dict[str, Path]                       # role → atlas-space NIfTI
    brain: Path                                   # atlas-space brain mask
    atlas: str
    extractor: str
    native: dict[str, dict]                       # role → {"affine", "shape"} of its native grid
    t1ce_to_role: dict[str, np.ndarray]           # RAS 4×4: T1ce point → role point
    atlas_to_t1ce: np.ndarray                     # RAS 4×4: atlas point → T1ce point
    atlas_affine: np.ndarray
    atlas_shape: tuple[int, int, int]
    qc: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def review_reasons(self) -> list[str]:
        return list(self.qc.get("review_reasons", []))

    def channel_files(self) -> list[Path]:
        """The atlas-space files in CHANNELS order (missing modalities omitted)."""
        return [self.images[c] for c in CHANNELS if c in self.images]

    def native_to_atlas(self, role: str) -> np.ndarray:
        """RAS 4×4: a point of `role`'s native space → the atlas point it came from."""
        m = np.linalg.inv(self.atlas_to_t1ce)
        if role != "t1ce":
            m = m @ np.linalg.inv(self.t1ce_to_role[role])
        return m

    def to_native(self, maps: np.ndarray, role: str) -> tuple[np.ndarray, np.ndarray]:
        """`(C, X, Y, Z)` maps on the atlas grid → (`(C, x, y, z)` float32 on `role`'s
        native grid, that grid's affine): linear interpolation through the inverse
        transforms, 0 outside the atlas grid."""
        nat = self.native[role]
        ref = rg.to_sitk(np.zeros(nat["shape"], np.float32), np.asarray(nat["affine"]))
        # Resample asks, for each native point, where it lies on the atlas grid.
        t = affine_transform(self.native_to_atlas(role))
        out = []
        for m in maps:
            img = rg.to_sitk(m, self.atlas_affine)
            out.append(rg.from_sitk(rg.resample(img, ref, t))[0])
        return np.stack(out).astype(np.float32), np.asarray(nat["affine"], np.float64)

    def record(self) -> dict:
        """JSON-serialisable summary (predictions.json, transforms.json)."""
        return {"case_id": self.case_id, "atlas": self.atlas, "brain_extractor": self.extractor,
                "atlas_case": str(self.folder),
                "t1ce_to_role": {r: np.round(m, 6).tolist() for r, m in self.t1ce_to_role.items()},
                "atlas_to_t1ce": np.round(self.atlas_to_t1ce, 6).tolist(),
                "native_grids": {r: {"affine": np.round(np.asarray(g["affine"]), 6).tolist(),
                                     "shape": list(g["shape"])} for r, g in self.native.items()},
                "qc": self.qc, "seconds": self.seconds}


def _external_brain(tool: str, t1ce: sitk.Image, work: Path) -> sitk.Image:
    """Run HD-BET or SynthStrip on the bias-corrected T1ce → its mask on the T1ce grid.

    HD-BET 2.x: ``hd-bet -i IN -o OUT.nii.gz -device cpu --disable_tta --save_bet_mask
    --no_bet_image`` writes the mask to ``OUT_bet.nii.gz`` (without ``--save_bet_mask``
    it deletes the mask when done; ``--disable_tta`` is its advice for the CPU).
    SynthStrip: ``mri_synthstrip -i IN -o OUT -m MASK`` writes the mask to MASK.
    """
    exe = {"hd-bet": "hd-bet", "synthstrip": "mri_synthstrip"}[tool]
    path = shutil.which(exe)
    if path is None:
        raise MedsegError(f"--brain-extractor {tool}: the command {exe!r} is not on PATH; install "
                          f"{BRAIN_EXTRACTORS[tool]} or use --brain-extractor builtin")
    src, out = work / "t1ce.nii.gz", work / "brain.nii.gz"
    sitk.WriteImage(t1ce, str(src))
    if tool == "hd-bet":
        mask = work / "brain_bet.nii.gz"
        cmd = [path, "-i", str(src), "-o", str(out), "-device", "cpu", "--disable_tta",
               "--save_bet_mask", "--no_bet_image"]
    else:
        mask = work / "brain_mask.nii.gz"
        cmd = [path, "-i", str(src), "-o", str(out), "-m", str(mask)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=work)
    except OSError as exc:
        raise MedsegError(f"--brain-extractor {tool}: could not run {path} ({exc}); fix its "
                          "installation or use --brain-extractor builtin") from None
    if proc.returncode != 0:
        raise MedsegError(f"--brain-extractor {tool} failed (exit {proc.returncode}; {' '.join(cmd)}): "
                          f"{(proc.stderr.strip() or proc.stdout.strip())[-500:]}")
    if not mask.exists():
        raise MedsegError(f"--brain-extractor {tool}: {exe} exited without error but wrote no mask "
                          f"({mask.name}); expected {BRAIN_EXTRACTORS[tool]}")
    m = sitk.ReadImage(str(mask))
    return sitk.Cast(rg.resample(m, t1ce, None, linear=False) > 0.5, sitk.sitkUInt8)


@contextlib.contextmanager
def _atomic_dir(target: Path):
    """A temporary folder beside `target`, renamed onto it on success (a previous
    `target` is replaced), removed on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_motion(qc: dict, role: str, m: np.ndarray) -> None:
    angle, shift = _motion(m)
    qc["motion"][role] = {"rotation_deg": round(angle, 2), "shift_mm": round(shift, 2)}
    if angle > MAX_ROTATION_DEG or shift > MAX_SHIFT_MM:
        qc["review_reasons"].append(f"{role} → t1ce registration moved the series by {angle:.1f}° and "
                                    f"{shift:.1f} mm (plausible: ≤ {MAX_ROTATION_DEG}°, ≤ {MAX_SHIFT_MM} "
                                    "mm): the registration probably failed")


def prepare(case_id: str, series: Mapping[str, tuple[np.ndarray, np.ndarray]], out_dir: str | Path,
            atlas: str = "mni152", extractor: str = "builtin", same_frame: bool = True,
            atlas_mm: float | None = None) -> PreparedCase:
    """Bring one study into the atlas space.

    `series`: role (t1, t1ce, t2, flair; t1ce required) → (volume, RAS affine) on its
    native grid. Writes `out_dir/<case_id>/` (BraTS 2023 layout, + ``brain_mask``,
    ``transforms.json``) atomically and returns the `PreparedCase`. `atlas_mm`: the
    atlas-space voxel size (default: the atlas's own, 1 mm).
    """
    if "t1ce" not in series:
        raise DataError(f"{case_id}: no post-contrast T1 (T1ce) series; the raw path registers every "
                        "series to it and needs it")
    if extractor not in BRAIN_EXTRACTORS:
        raise MedsegError(f"--brain-extractor {extractor!r}: expected one of {', '.join(BRAIN_EXTRACTORS)}")
    atlas_path, atlas_desc = rg.atlas_files(atlas)
    seconds: dict[str, float] = {}

    def tick(step: str, t0: float) -> float:
        now = time.perf_counter()
        seconds[step] = round(seconds.get(step, 0.0) + now - t0, 3)
        return now

    t0 = time.perf_counter()
    imgs = {r: rg.to_sitk(v, a) for r, (v, a) in series.items()}
    heads = {r: rg.head_mask(i) for r, i in imgs.items()}
    t0 = tick("read", t0)
    imgs = {r: rg.n4(i, heads[r]) for r, i in imgs.items()}
    t0 = tick("n4", t0)

    qc: dict = {"registration": {}, "motion": {}, "review_reasons": []}
    fixed = imgs["t1ce"]
    t1ce_to: dict[str, np.ndarray] = {}
    mask = sitk.BinaryDilate(heads["t1ce"], [3, 3, 3])
    for role in (r for r in CHANNELS if r in imgs and r != "t1ce"):
        t, metric = rg.rigid(fixed, imgs[role], mask, same_frame=same_frame,
                             moving_mask=sitk.BinaryDilate(heads[role], [2, 2, 1]))
        t1ce_to[role] = rg.transform_matrix(t)
        qc["registration"][f"{role}_to_t1ce"] = {"mattes_mi": round(-metric, 4)}
        if -metric < MIN_MI:
            qc["review_reasons"].append(f"{role} → t1ce registration ended with mutual information "
                                        f"{-metric:.3f} (< {MIN_MI}): the series do not match")
        _check_motion(qc, role, t1ce_to[role])
    t0 = tick("coregister", t0)

    t2_on_t1ce = (rg.resample(imgs["t2"], fixed, affine_transform(t1ce_to["t2"]))
                  if "t2" in imgs else None)
    with tempfile.TemporaryDirectory(prefix="medseg-brain-") as work:
        brain = (rg.brain_mask(fixed, t2_on_t1ce, heads["t1ce"]) if extractor == "builtin"
                 else _external_brain(extractor, fixed, Path(work)))
    t0 = tick("brain", t0)

    atlas_img = sitk.Cast(sitk.ReadImage(str(atlas_path)), sitk.sitkFloat32)
    if atlas_mm:
        atlas_img = sitk.BinShrink(atlas_img, [max(1, int(round(atlas_mm / s))) for s in atlas_img.GetSpacing()])
    atlas_brain = sitk.Cast(atlas_img > 0, sitk.sitkUInt8)
    t_atlas, metric = rg.to_atlas(atlas_img, fixed * sitk.Cast(brain, sitk.sitkFloat32),
                                  sitk.BinaryDilate(atlas_brain, [4, 4, 4]))
    t0 = tick("atlas", t0)
    if extractor == "builtin":
        # Second pass with the atlas brain as a prior (drops eyes, spinal cord, neck),
        # and the atlas registration refined on the better mask.
        prior = rg.resample(atlas_brain, fixed, t_atlas.GetInverse(), linear=False)
        brain = rg.brain_mask(fixed, t2_on_t1ce, heads["t1ce"], atlas_prior=prior)
        # Then the outer CSF, meninges and any diploë that came through the skull go.
        flair_on_t1ce = (rg.resample(imgs["flair"], fixed, affine_transform(t1ce_to["flair"]))
                         if "flair" in imgs else None)
        brain = rg.peel_brain(fixed, brain, flair_on_t1ce)
        t0 = tick("brain", t0)
        t_atlas, metric = rg.to_atlas(atlas_img, fixed * sitk.Cast(brain, sitk.sitkFloat32),
                                      sitk.BinaryDilate(atlas_brain, [4, 4, 4]), initial=t_atlas)
        t0 = tick("atlas", t0)
    atlas_to_t1ce = rg.transform_matrix(t_atlas)
    qc["registration"]["t1ce_to_atlas"] = {"mattes_mi": round(-metric, 4)}
    scales = np.linalg.svd(atlas_to_t1ce[:3, :3], compute_uv=False)
    qc["atlas_scale"] = [round(float(s), 3) for s in scales]
    if scales.min() < ATLAS_SCALE[0] or scales.max() > ATLAS_SCALE[1]:
        qc["review_reasons"].append(f"t1ce → atlas registration scaled the brain by {scales.min():.2f}–"
                                    f"{scales.max():.2f} (plausible {ATLAS_SCALE[0]}–{ATLAS_SCALE[1]}): "
                                    "the atlas registration probably failed")
    if -metric < MIN_MI:
        qc["review_reasons"].append(f"t1ce → atlas registration ended with mutual information {-metric:.3f} "
                                    f"(< {MIN_MI})")

    brain_arr = sitk.GetArrayViewFromImage(brain)
    ml = float(brain_arr.sum() * np.prod(fixed.GetSpacing()) / 1000.0)
    qc["brain_ml"] = round(ml, 1)
    if not BRAIN_ML[0] <= ml <= BRAIN_ML[1]:
        qc["review_reasons"].append(f"brain mask of {ml:.0f} mL (plausible {BRAIN_ML[0]:.0f}–"
                                    f"{BRAIN_ML[1]:.0f} mL): brain extraction probably failed")

    brain_atlas = rg.resample(brain, atlas_img, t_atlas, linear=False)
    out_case = Path(out_dir) / case_id
    atlas_affine = rg.from_sitk(atlas_img)[1]
    brain_np = rg.from_sitk(brain_atlas)[0] > 0.5
    files: dict[str, Path] = {}
    with _atomic_dir(out_case) as tmp:
        for role, img in imgs.items():
            m = atlas_to_t1ce if role == "t1ce" else t1ce_to[role] @ atlas_to_t1ce
            vol = rg.from_sitk(rg.resample(img, atlas_img, affine_transform(m)))[0]
            vol = np.where(brain_np, np.maximum(vol, 0), 0).astype(np.float32)
            name = f"{case_id}-{LAYOUT_KEYS[role]}.nii.gz"
            write_nifti(vol, atlas_affine, tmp / name)
            files[role] = out_case / name
        write_nifti(brain_np.astype(np.uint8), atlas_affine, tmp / f"{case_id}-brain.nii.gz")
        # The brain mask where it was made, on the T1ce's native grid (QC, benchmarks).
        (tmp / "native").mkdir()
        b_nat, a_nat = rg.from_sitk(brain)
        write_nifti(b_nat.astype(np.uint8), a_nat, tmp / "native" / "brain_mask_t1ce_grid.nii.gz")
        t0 = tick("resample", t0)
        prepared = PreparedCase(case_id, out_case, files, out_case / f"{case_id}-brain.nii.gz",
                                f"{atlas} ({atlas_desc})", extractor,
                                {r: {"affine": series[r][1], "shape": tuple(series[r][0].shape[:3])}
                                 for r in series},
                                t1ce_to, atlas_to_t1ce, atlas_affine, tuple(atlas_img.GetSize()), qc, seconds)
        write_json(prepared.record(), tmp / "transforms.json")
    return prepared
