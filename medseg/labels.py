"""Label conventions, tumour regions and input channels: medseg's fixed vocabulary.

A label map holds one integer per voxel. Its meaning depends on the dataset's
*convention*, which medseg treats as explicit data: detected from file names,
checked against the label values found, and recorded in every datalist,
checkpoint and output.

==========  ==================================================  =====  =====  =====
convention  source                                              NCR    ED     ET
==========  ==================================================  =====  =====  =====
brats2021   BraTS 2018-2021 (`_t1 _t1ce _t2 _flair _seg`)        1      2      4
brats2023   BraTS 2023+ (`-t1n -t1c -t2w -t2f -seg`)             1      2      3
brats2024   BraTS 2024 GLI post-treatment (2023 names + RC=4)    1      2      3
msd         Medical Segmentation Decathlon Task01_BrainTumour    2      1      3
==========  ==================================================  =====  =====  =====

BraTS 2023+ case ids name their cohort (``BraTS-GLI-00000-000``: GLI, PED, MEN, MET,
SSA, GoAT). Only GLI post-treatment data (BraTS 2024) has a label 4, the resection
cavity; BraTS 2024 PED uses 1-4 with other meanings, the other cohorts 1-3.

Regions (the model's three sigmoid outputs, in this order):
TC = NCR ∪ ET, WT = NCR ∪ ED ∪ ET, ET. The resection cavity (RC, label 4 of
brats2024) is not tumour: it belongs to no region, so a three-region model never
predicts it. Regions map back to labels with precedence ET > TC > WT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from medseg.errors import LabelError, MedsegError

__all__ = [
    "REGIONS",
    "CHANNELS",
    "CLASS_COLOURS",
    "CLASS_NAMES",
    "LabelConvention",
    "CONVENTIONS",
    "get_convention",
    "validate_labels",
    "BRATS_COHORTS",
    "brats_cohort",
    "label4_outside_gli_hint",
    "labels_to_regions",
    "regions_to_labels",
]

#: Region channels of every medseg model, in output order.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")

#: Canonical input channel order of medseg models (T1, T1 post-contrast, T2, FLAIR).
CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


#: One colour per tumour class (RGB, 0-255), used by every picture medseg draws
#: (report overlays, the synthetic data preview) with a legend naming the class:
#: necrosis / non-enhancing core red, edema green, enhancing tumour yellow,
#: resection cavity blue.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "NCR": (235, 40, 25), "ED": (25, 215, 50), "ET": (255, 225, 0), "RC": (40, 110, 255)}

#: Legend text of each class (every convention's name for it).
CLASS_NAMES: dict[str, str] = {
    "NCR": "necrosis / non-enhancing core (NCR, NETC)", "ED": "edema (ED, SNFH)",
    "ET": "enhancing tumour (ET)", "RC": "resection cavity (RC)"}


@dataclass(frozen=True)
class LabelConvention:
    """How one dataset family encodes tumour sub-regions as integers.

    `ncr`, `ed` and `et` are the label values of necrotic/non-enhancing core,
    edema (SNFH) and enhancing tumour. `names` lists every allowed value,
    background included; values in `outside_regions` are allowed but belong to
    no tumour region (BraTS 2024 resection cavity).
    """

    name: str
    description: str
    ncr: int
    ed: int
    et: int
    names: Mapping[int, str]
    outside_regions: tuple[int, ...] = field(default=())

    @property
    def allowed(self) -> frozenset[int]:
        return frozenset(self.names)

    def region_labels(self) -> dict[str, tuple[int, ...]]:
        """Label values making up each region, e.g. brats2021 TC → (1, 4)."""
        return {
            "TC": (self.ncr, self.et),
            "WT": (self.ncr, self.ed, self.et),
            "ET": (self.et,),
        }

    def classes(self) -> dict[int, str]:
        """Each non-background label value → its `CLASS_COLOURS` key, e.g. msd
        {1: "ED", 2: "NCR", 3: "ET"}; brats2024 {…, 4: "RC"}."""
        found = {**{v: "RC" for v in self.outside_regions}, self.ncr: "NCR", self.ed: "ED", self.et: "ET"}
        return {v: found[v] for v in sorted(self.names) if v != 0}

    def to_dict(self) -> dict:
        """JSON-ready description, recorded in datalists, checkpoints and outputs."""
        return {
            "name": self.name,
            "labels": {str(k): v for k, v in sorted(self.names.items())},
            "regions": {r: list(v) for r, v in self.region_labels().items()},
            "outside_regions": list(self.outside_regions),
        }


CONVENTIONS: dict[str, LabelConvention] = {
    c.name: c
    for c in (
        LabelConvention(
            "brats2021",
            "BraTS 2018-2021: 1 NCR/NET, 2 ED, 4 ET",
            ncr=1, ed=2, et=4,
            names={0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"},
        ),
        LabelConvention(
            "brats2023",
            "BraTS 2023+: 1 NETC, 2 SNFH, 3 ET",
            ncr=1, ed=2, et=3,
            names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET"},
        ),
        LabelConvention(
            "brats2024",
            "BraTS 2024 GLI post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC (resection cavity, no region)",
            ncr=1, ed=2, et=3,
            names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
            outside_regions=(4,),
        ),
        LabelConvention(
            "msd",
            "MSD Task01_BrainTumour: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour",
            ncr=2, ed=1, et=3,
            names={0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
        ),
    )
}


def get_convention(name: str | LabelConvention) -> LabelConvention:
    """Look a convention up by name; the error lists the valid names."""
    if isinstance(name, LabelConvention):
        return name
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise MedsegError(
            f"unknown label convention {name!r}; expected one of {', '.join(CONVENTIONS)}"
        ) from None


#: BraTS 2023+ cohorts (case ids ``BraTS-<cohort>-<patient>-<time point>``) → their labels.
BRATS_COHORTS: dict[str, str] = {
    "GLI": "adult glioma: 1 NETC, 2 SNFH, 3 ET; BraTS 2024 post-treatment adds 4 RC",
    "PED": "paediatric tumours: BraTS 2023 1 NETC, 2 SNFH, 3 ET; BraTS 2024 1 ET, 2 NET, "
           "3 cystic component, 4 edema",
    "MEN": "meningioma: 1 NETC, 2 SNFH, 3 ET",
    "MET": "brain metastases: 1 NETC, 2 SNFH, 3 ET",
    "SSA": "sub-Saharan African glioma: 1 NETC, 2 SNFH, 3 ET",
    "GoAT": "generalisability across tumours: 1 NETC, 2 SNFH, 3 ET",
}

_COHORT = re.compile(r"BraTS-(?P<cohort>[A-Za-z]+)-\d+")


def brats_cohort(name: str) -> str | None:
    """The BraTS 2023+ cohort a case id or file path names (the last one in a path):
    ``BraTS-PED-00012-000`` → ``"PED"``; None when it names none."""
    found = _COHORT.findall(str(name))
    return found[-1] if found else None


def label4_outside_gli_hint(*cohorts: str | None) -> str:
    """Why label 4 under BraTS 2023+ names is refused in cases of `cohorts` (not GLI;
    None: an id naming no cohort), and the fix."""
    why = []
    for cohort in dict.fromkeys(cohorts):
        if cohort == "PED":
            why.append("BraTS 2024 PED labels mean 1 ET, 2 NET, 3 cystic component, 4 edema, "
                       "which no medseg convention reads: relabel them to brats2023 first "
                       "(e.g. 1→3, 2→1, 3→1, 4→2, which gives TC = ET ∪ NET ∪ CC, WT = all)")
        elif cohort in BRATS_COHORTS:
            why.append(f"BraTS {cohort} labels are 1-3 ({BRATS_COHORTS[cohort]})")
        else:
            why.append("a case id naming no BraTS cohort (expected BraTS-<cohort>-<patient>-"
                       f"<time point>, cohort one of {', '.join(BRATS_COHORTS)}) is not GLI")
    return ("label 4 is read as the resection cavity only in BraTS 2024 GLI post-treatment cases "
            f"(BraTS-GLI-...); {'; '.join(why)}. If these are GLI-style post-treatment labels "
            "(4 = resection cavity), pass --convention brats2024; if 4 is ET (BraTS 2018-2021 "
            "labels), --convention brats2021")


def _hint(found: set[int], conv: LabelConvention, source: str = "") -> str:
    """A likely cause and fix for label values outside `conv` (`source`: the file)."""
    extra = found - conv.allowed
    if conv.name == "brats2021" and 3 in extra and 4 not in found:
        return ("ET seems relabelled from 4 to 3 (as nnU-Net's BraTS conversion does); "
                "use the original BraTS 2021 labels or --convention brats2023")
    cohort = brats_cohort(source)
    if conv.name == "brats2023" and 4 in extra and cohort is not None and cohort != "GLI":
        return label4_outside_gli_hint(cohort)
    if conv.name == "brats2023" and extra == {4}:
        return ("label 4 is not ET under brats2023: for BraTS 2024 GLI post-treatment data it is "
                "the resection cavity (RC): use --convention brats2024, which keeps RC out of "
                "every region; for BraTS 2018-2021 labels (ET = 4) under new file names use "
                "--convention brats2021")
    if conv.name == "msd" and 4 in extra and 3 not in found:
        return "these look like BraTS 2018-2021 labels (ET = 4); use --convention brats2021"
    return f"allowed values are {sorted(conv.allowed)} ({conv.description})"


def validate_labels(values: Iterable[float], convention: str | LabelConvention,
                    source: str = "label map") -> None:
    """Raise `LabelError` unless every value is an integer allowed by `convention`.

    `values` are the distinct values found (e.g. `np.unique(seg)`); `source` names
    the file in the message.
    """
    conv = get_convention(convention)
    vals = np.asarray(list(values), dtype=np.float64)
    if vals.size and not np.all(np.isfinite(vals)):
        raise LabelError(f"{source}: label map contains NaN or infinite values; "
                         "expected integers from " f"{sorted(conv.allowed)}")
    non_int = vals[vals != np.round(vals)]
    if non_int.size:
        raise LabelError(
            f"{source}: label values must be integers, found {non_int[:5].tolist()}; the "
            "label map was probably resampled with linear interpolation: resample labels "
            "with nearest-neighbour interpolation")
    found = {int(v) for v in vals}
    bad = found - conv.allowed
    if bad:
        raise LabelError(
            f"{source}: label values {sorted(bad)} are not allowed by convention "
            f"'{conv.name}' (found {sorted(found)}); {_hint(found, conv, source)}")


def labels_to_regions(label: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Label map `(*spatial)` → boolean region stack `(3, *spatial)` in REGIONS order.

    Regions overlap (ET ⊂ TC ⊂ WT), so this is multi-hot, not one-hot.
    """
    conv = get_convention(convention)
    lab = np.asarray(label)
    groups = conv.region_labels()
    return np.stack([np.isin(lab, groups[r]) for r in REGIONS])


def regions_to_labels(regions: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Region stack `(3, *spatial)` (bool or {0,1}) → uint8 label map in `convention`.

    Precedence ET > TC > WT: a voxel in ET is ET even if the network left it out
    of WT; TC without ET is NCR; WT only is edema. Never produces labels outside
    the regions (e.g. brats2024 RC).
    """
    conv = get_convention(convention)
    reg = np.asarray(regions)
    if reg.ndim < 2 or reg.shape[0] != len(REGIONS):
        raise MedsegError(
            f"expected a region stack of shape (3, *spatial) for {REGIONS}, found {reg.shape}")
    tc, wt, et = (reg[i].astype(bool) for i in range(3))
    out = np.zeros(reg.shape[1:], dtype=np.uint8)
    out[wt] = conv.ed
    out[tc] = conv.ncr
    out[et] = conv.et
    return out
