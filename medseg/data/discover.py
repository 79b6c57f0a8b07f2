"""Find the cases under a data root, whatever BraTS layout it uses.

Three on-disk layouts are recognised:

* ``brats2021``: one folder per case, ``<id>_t1``, ``_t1ce``, ``_t2``, ``_flair``
  and ``_seg`` NIfTI files (``BraTS2021_00000``);
* ``brats2023``: one folder per case, ``<id>-t1n``, ``-t1c``, ``-t2w``, ``-t2f``
  and ``-seg`` (``BraTS-GLI-00000-000``; the last number is the time point, so
  ``-000`` and ``-001`` are one patient);
* ``msd``: Medical Segmentation Decathlon Task01 — ``dataset.json`` with
  ``imagesTr/``, ``labelsTr/``, ``imagesTs/``; one 4D image per case whose
  channels are FLAIR, T1w, T1gd, T2w.

Cases without a segmentation (validation/test sets) are *testing* cases.
Discovery reads file names only; `scan_labels` reads label values.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.io import is_nifti, load_array, load_header, nifti_stem
from medseg.errors import DataError, LabelError
from medseg.labels import (CHANNELS, CONVENTIONS, LabelConvention, brats_cohort, get_convention,
                           label4_outside_gli_hint, validate_labels)

__all__ = [
    "Layout",
    "LAYOUTS",
    "Case",
    "Dataset",
    "LabelScan",
    "discover",
    "scan_labels",
    "detect_convention",
    "resolve_convention",
    "likely_convention",
]


@dataclass(frozen=True)
class Layout:
    """File naming of one dataset family.

    `keys` maps each canonical channel (``CHANNELS``) to its file-name key;
    `channels` is the channel order of the files as the datalist lists them.
    """

    name: str
    sep: str
    keys: dict[str, str]
    label_key: str
    convention: str
    channels: tuple[str, ...] = CHANNELS


LAYOUTS: dict[str, Layout] = {
    "brats2021": Layout("brats2021", "_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
                        "seg", "brats2021"),
    "brats2023": Layout("brats2023", "-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
                        "seg", "brats2023"),
    # One 4D file per case; channel order as in the Decathlon's dataset.json.
    "msd": Layout("msd", "", {}, "", "msd", channels=("flair", "t1", "t1ce", "t2")),
}

#: MSD dataset.json modality names → canonical channel names.
MSD_MODALITIES = {"flair": "flair", "t1w": "t1", "t1gd": "t1ce", "t2w": "t2"}

_BRATS_NAME = re.compile(r"^(?P<case>.+?)(?P<sep>[_-])(?P<key>t1ce|t1c|t1n|t1|t2w|t2f|t2|flair|seg)$")
_PATIENT_2023 = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$")


@dataclass(frozen=True)
class Case:
    """One case as found on disk.

    `images` lists the image files in `Layout.channels` order (one 4D file for
    MSD); `label` is None for testing cases. `missing` names expected files that
    are absent (channel names, or ``label``).
    """

    case_id: str
    patient_id: str
    images: tuple[Path, ...]
    label: Path | None
    folder: Path
    missing: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.images + ((self.label,) if self.label is not None else ())


@dataclass
class Dataset:
    """All cases under `root` in one `layout`."""

    root: Path
    layout: Layout
    cases: list[Case]
    ignored: list[Path] = field(default_factory=list)

    @property
    def training(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None]

    @property
    def testing(self) -> list[Case]:
        return [c for c in self.cases if c.label is None]


def _patient_of(case_id: str, layout: str) -> str:
    if layout == "brats2023":
        m = _PATIENT_2023.match(case_id)
        if m:
            return m.group("patient")
    return case_id


def _walk_nifti(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if is_nifti(Path(f)))
    return out


def _discover_brats(root: Path) -> Dataset:
    groups: dict[str, dict[tuple[Path, str], dict[str, Path]]] = {"brats2021": defaultdict(dict),
                                                                  "brats2023": defaultdict(dict)}
    ignored = []
    for path in _walk_nifti(root):
        m = _BRATS_NAME.match(nifti_stem(path))
        layout = None
        if m:
            for name in ("brats2021", "brats2023"):
                lay = LAYOUTS[name]
                if m["sep"] == lay.sep and m["key"] in (*lay.keys.values(), lay.label_key):
                    layout = name
        if layout is None:
            ignored.append(path)
            continue
        groups[layout][(path.parent, m["case"])][m["key"]] = path
    found = {k: v for k, v in groups.items() if v}
    if not found:
        raise DataError(
            f"{root}: no BraTS or MSD dataset found; expected case folders with files named "
            "like BraTS2021_00000_flair.nii.gz (BraTS 2018-2021), BraTS-GLI-00000-000-t2f.nii.gz "
            "(BraTS 2023+), or an MSD Task01 folder with dataset.json and imagesTr/; "
            "check --root")
    if len(found) > 1:
        examples = {k: next(iter(v))[1] for k, v in found.items()}
        raise DataError(
            f"{root}: mixes BraTS 2021 and BraTS 2023 file names (e.g. case {examples['brats2021']} "
            f"and case {examples['brats2023']}); point --root at one dataset at a time")
    name, cases_found = next(iter(found.items()))
    layout = LAYOUTS[name]
    cases = []
    for (folder, case_id), files in sorted(cases_found.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
        missing = tuple(ch for ch in layout.channels if layout.keys[ch] not in files)
        images = tuple(files[layout.keys[ch]] for ch in layout.channels if layout.keys[ch] in files)
        cases.append(Case(case_id, _patient_of(case_id, name), images, files.get(layout.label_key),
                          folder, missing))
    return Dataset(root, layout, cases, ignored)


def _discover_msd(root: Path) -> Dataset:
    spec_path = root / "dataset.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{spec_path}: not readable JSON ({exc}); expected the Decathlon "
                        "dataset.json of Task01_BrainTumour") from None
    modality = {int(k): str(v).lower() for k, v in spec.get("modality", {}).items()}
    channels = tuple(MSD_MODALITIES.get(modality.get(i, ""), "?") for i in range(len(modality)))
    if channels != LAYOUTS["msd"].channels:
        raise DataError(
            f"{spec_path}: modality order {[modality[k] for k in sorted(modality)]} is not the "
            "Task01_BrainTumour order ['FLAIR', 'T1w', 't1gd', 'T2w']; medseg reads the 4D "
            "images in that order: reorder the channels or fix dataset.json")
    cases = []

    def add(image_rel: str, label_rel: str | None) -> None:
        image = (root / image_rel).resolve()
        label = (root / label_rel).resolve() if label_rel else None
        missing = (() if image.is_file() else ("image",)) + \
                  (("label",) if label is not None and not label.is_file() else ())
        case_id = nifti_stem(image)
        cases.append(Case(case_id, case_id, (image,) if image.is_file() else (), label,
                          image.parent, missing))

    for entry in spec.get("training", []):
        add(entry["image"], entry["label"])
    for entry in spec.get("test", []):
        add(entry if isinstance(entry, str) else entry["image"], None)
    if not cases:
        raise DataError(f"{spec_path}: lists no 'training' or 'test' cases")
    return Dataset(root, LAYOUTS["msd"], cases)


def discover(root: str | Path) -> Dataset:
    """Detect the layout under `root` and list its cases (sorted by case id).

    Raises `DataError` naming `root` when nothing recognisable is there.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a folder; pass the folder that holds the cases")
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return _discover_msd(root)
    return _discover_brats(root)


@dataclass(frozen=True)
class LabelScan:
    """Distinct label values of one case, with voxel counts and voxel volume."""

    case_id: str
    counts: dict[float, int]
    voxel_ml: float

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(self.counts)

    @classmethod
    def from_array(cls, case_id: str, seg: np.ndarray, zooms) -> "LabelScan":
        values, counts = np.unique(seg, return_counts=True)
        return cls(case_id, {float(v): int(n) for v, n in zip(values, counts)},
                   float(np.prod(zooms[:3])) / 1000.0)

    def volume_ml(self, labels: tuple[int, ...]) -> float:
        """Volume of the voxels holding any of `labels`, e.g. WT = (1, 2, 4) in mL."""
        return sum(n for v, n in self.counts.items() if v in labels) * self.voxel_ml


def _scan_one(case: Case, conv: LabelConvention | None) -> LabelScan:
    img = load_header(case.label)
    scan = LabelScan.from_array(case.case_id, load_array(case.label, img), img.header.get_zooms())
    if conv is not None:
        validate_labels(scan.values, conv, source=str(case.label))
    return scan


def scan_labels(cases: list[Case], convention: str | LabelConvention | None = None,
                jobs: int | None = None) -> list[LabelScan]:
    """Read every training case's label map (in threads: gzip decoding releases the GIL).

    With `convention`, values outside it raise `LabelError` naming the file.
    """
    conv = get_convention(convention) if convention is not None else None
    todo = [c for c in cases if c.label is not None and c.label.is_file()]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda c: _scan_one(c, conv), todo))


def _label4_outside_gli(scans: list[LabelScan]) -> list[LabelScan]:
    """Cases holding label 4 whose id names no GLI cohort (BraTS-PED-..., unknown ids)."""
    return [s for s in scans if 4 in s.values and brats_cohort(s.case_id) != "GLI"]


def _paediatric_2024(scans: list[LabelScan]) -> bool:
    """Every case is a PED case (``BraTS-PED-...``) and some hold label 4: BraTS 2024
    PED labels (1 ET, 2 NET, 3 CC, 4 ED); BraTS 2023 PED used 1-3 as GLI does."""
    return (bool(scans) and all(brats_cohort(s.case_id) == "PED" for s in scans)
            and any(4 in s.values for s in scans))


def likely_convention(layout: Layout, found: set[float], scans: list[LabelScan]) -> str:
    """BraTS 2023 names with both 3 and 4 are BraTS 2024 GLI post-treatment data,
    unless `scans` show label 4 in a case outside the GLI cohort (then ``brats2023``,
    against which such cases fail)."""
    if layout.convention == "brats2023" and 4 in found and _paediatric_2024(scans):
        return "brats2024-ped"
    if layout.convention == "brats2023" and 4 in found and 3 in found:
        if not _label4_outside_gli(scans):
            return "brats2024"
    return layout.convention


def _case_list(scans: list[LabelScan], limit: int = 5) -> str:
    """``id (found [0, 1, 2, 4])`` for the first `limit` cases, then how many more."""
    text = ", ".join(f"{s.case_id} (found {sorted(int(v) for v in s.values)})" for s in scans[:limit])
    return text + (f" and {len(scans) - limit} more" if len(scans) > limit else "")


def detect_convention(dataset: Dataset, scans: list[LabelScan]) -> LabelConvention:
    """The layout's label convention, checked against the values actually found.

    BraTS 2023 names with label 4 are BraTS 2024 GLI post-treatment data (4 =
    resection cavity), recognised as ``brats2024`` only when every case holding
    4 is a GLI case (``BraTS-GLI-...``) and ET (3) also occurs. A dataset of PED
    cases only (``BraTS-PED-...``) with label 4 is BraTS 2024 PED
    (``brats2024-ped``: 1 ET, 2 NET, 3 cystic component, 4 edema). Label 4
    elsewhere is an error naming the cases (MEN/MET/SSA/GoAT use 1-3). Label 4
    without any 3 looks like BraTS 2021 labels under new names; reading it as RC
    would silently empty ET, so that is an error too. Each error suggests
    ``--convention``, which skips this detection.
    """
    found: set[float] = set()
    for s in scans:
        found.update(s.values)
    where = f"{dataset.root} ({dataset.layout.name} layout)"
    if dataset.layout.convention == "brats2023" and 4 in found and not _paediatric_2024(scans):
        odd = _label4_outside_gli(scans)
        if odd:
            b23 = get_convention("brats2023")
            raise LabelError(
                f"{where}: label 4 found outside the GLI cohort, in case(s) {_case_list(odd)}; "
                f"expected labels {sorted(b23.allowed)} ({b23.description}) for these cases: "
                + label4_outside_gli_hint(*(brats_cohort(s.case_id) for s in odd)))
    conv = get_convention(likely_convention(dataset.layout, found, scans))
    bad = found - conv.allowed
    if bad:
        cases = [s for s in scans if set(s.values) & bad]
        try:
            validate_labels(sorted(found), conv, source=where)
        except LabelError as exc:
            msg = f"{exc}; cases with these values include {_case_list(cases)}"
            if "--convention" not in msg:
                msg += (f"; if you know the labels' convention, pass it with --convention "
                        f"({', '.join(CONVENTIONS)})")
            raise LabelError(msg) from None
    return conv


def resolve_convention(dataset: Dataset, convention: str | None = None,
                       jobs: int | None = None) -> tuple[LabelConvention, list[LabelScan]]:
    """Scan the training labels and return (convention, scans).

    `convention` None: detected from the layout and the values found; otherwise
    every label file is checked against the named convention.
    """
    if convention:
        conv = get_convention(convention)
        return conv, scan_labels(dataset.training, conv, jobs=jobs)
    scans = scan_labels(dataset.training, jobs=jobs)
    return detect_convention(dataset, scans), scans
