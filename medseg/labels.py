"""Label conventions, BraTS tasks, tumour regions and input channels: medseg's
fixed vocabulary.

A label map holds one integer per voxel. Its meaning depends on the dataset's
*convention*, which medseg treats as explicit data: detected from file names,
checked against the label values found, and recorded in every datalist,
checkpoint and output. A convention maps each value to a *class*:

=============  ====================================================  ===  ===  ===  ===  ===
convention     source                                                NCR  ED   ET   RC   CC
=============  ====================================================  ===  ===  ===  ===  ===
brats2021      BraTS 2018-2021 (`_t1 _t1ce _t2 _flair _seg`)          1    2    4    –    –
brats2023      BraTS 2023+ (`-t1n -t1c -t2w -t2f -seg`)               1    2    3    –    –
brats2024      BraTS 2024 GLI post-treatment (2023 names + RC = 4)    1    2    3    4    –
brats2024-ped  BraTS 2024 PED (1 ET, 2 NET, 3 CC, 4 ED)               2    4    1    –    3
msd            Medical Segmentation Decathlon Task01_BrainTumour      2    1    3    –    –
=============  ====================================================  ===  ===  ===  ===  ===

(NCR: necrosis / non-enhancing tumour core, NETC, NET; ED: edema, SNFH; ET:
enhancing tumour; RC: resection cavity; CC: cystic component.)

A *task* (`TASKS`, the table beside the conventions) says what a model learns
from such labels: the overlapping sigmoid regions the network outputs (TC, WT,
ET as always; ``gli2024`` adds RC as its own output, ``ped2024`` CC), how
regions map back to labels (the painting order), which regions are scored and
by which rule set by default, and its default label convention. BraTS 2023+ case
ids name their cohort (``BraTS-GLI-00000-000``: GLI, PED, MEN, MET, SSA, GoAT),
from which the task is detected.

Regions are sets of classes: TC = NCR ∪ ET (∪ CC in ped2024), WT = NCR ∪ ED ∪ ET
(∪ CC), ET, RC, CC, and the single classes the 2024 rules score (NETC, SNFH,
NET, ED). The resection cavity is not tumour: no tumour region holds it, so a
task that does not learn RC (gli2023 on brats2024 labels) never predicts it.
Regions map back to labels by painting (later wins): WT → ED, then RC → RC
(gli2024), TC → NCR, CC → CC (ped2024), ET → ET; i.e. ET > TC > RC > edema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from medseg.errors import DataError, LabelError, MedsegError

__all__ = [
    "REGIONS",
    "CHANNELS",
    "CLASSES",
    "CLASS_COLOURS",
    "CLASS_NAMES",
    "LabelConvention",
    "CONVENTIONS",
    "get_convention",
    "validate_labels",
    "BRATS_COHORTS",
    "brats_cohort",
    "label4_outside_gli_hint",
    "Task",
    "TASKS",
    "get_task",
    "legacy_task",
    "detect_task",
    "task_problem",
    "resolve_task",
    "labels_to_regions",
    "region_masks",
    "regions_to_labels",
    "conversion_problem",
]

#: Region channels of a three-region model (tasks gli2021, gli2023, men2023, met2023,
#: ssa2023, and every model written before tasks existed), in output order. A task's
#: own outputs: `Task.outputs`.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")

#: Canonical input channel order of medseg models (T1, T1 post-contrast, T2, FLAIR).
CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: Every class a label value can mean (see the module docstring).
CLASSES: tuple[str, ...] = ("NCR", "ED", "ET", "RC", "CC")
#: Classes that are not tumour: in no tumour region of a task that does not learn them.
NON_TUMOUR: tuple[str, ...] = ("RC",)

#: One colour per tumour class (RGB, 0-255), used by every picture medseg draws
#: (report overlays, the synthetic data preview, DICOM-SEG, viewers) with a legend
#: naming the class: necrosis / non-enhancing core red, edema green, enhancing
#: tumour yellow, resection cavity blue, cystic component violet.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "NCR": (235, 40, 25), "ED": (25, 215, 50), "ET": (255, 225, 0), "RC": (40, 110, 255),
    "CC": (200, 80, 255)}

#: Legend text of each class (every convention's name for it).
CLASS_NAMES: dict[str, str] = {
    "NCR": "necrosis / non-enhancing core (NCR, NETC, NET)", "ED": "edema (ED, SNFH)",
    "ET": "enhancing tumour (ET)", "RC": "resection cavity (RC)", "CC": "cystic component (CC)"}


@dataclass(frozen=True)
class LabelConvention:
    """How one dataset family encodes tumour classes as integers.

    `names` lists every allowed value, background included, with the dataset's
    own name for it; `class_of` maps each non-background value to its class
    (`CLASSES`).
    """

    name: str
    description: str
    names: Mapping[int, str]
    class_of: Mapping[int, str]

    def __post_init__(self):
        if set(self.class_of) != set(self.names) - {0} or not set(self.class_of.values()) <= set(CLASSES):
            raise MedsegError(f"internal error: convention {self.name} maps {dict(self.class_of)}")

    @property
    def allowed(self) -> frozenset[int]:
        return frozenset(self.names)

    def value(self, cls: str) -> int | None:
        """The label value of class `cls` (e.g. brats2021 "ET" → 4), None when absent."""
        for v, c in self.class_of.items():
            if c == cls:
                return v
        return None

    @property
    def ncr(self) -> int:
        return self.value("NCR")

    @property
    def ed(self) -> int:
        return self.value("ED")

    @property
    def et(self) -> int:
        return self.value("ET")

    @property
    def class_set(self) -> frozenset[str]:
        return frozenset(self.class_of.values())

    @property
    def outside_regions(self) -> tuple[int, ...]:
        """Values of non-tumour classes (brats2024 RC = 4): in no three-region region."""
        return tuple(v for v, c in sorted(self.class_of.items()) if c in NON_TUMOUR)

    def region_labels(self, task: "str | Task | None" = None) -> dict[str, tuple[int, ...]]:
        """Label values making up each of `task`'s regions (outputs, then the scored
        ones), e.g. brats2021 TC → (1, 4). Default task: `legacy_task` (TC, WT, ET)."""
        t = get_task(task) if task is not None else legacy_task(self.name)
        return t.region_values(self)

    def classes(self) -> dict[int, str]:
        """Each non-background label value → its class (`CLASS_COLOURS` key), e.g. msd
        {1: "ED", 2: "NCR", 3: "ET"}; brats2024 {…, 4: "RC"}."""
        return {v: self.class_of[v] for v in sorted(self.class_of)}

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
            names={0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"},
            class_of={1: "NCR", 2: "ED", 4: "ET"},
        ),
        LabelConvention(
            "brats2023",
            "BraTS 2023+: 1 NETC, 2 SNFH, 3 ET",
            names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET"},
            class_of={1: "NCR", 2: "ED", 3: "ET"},
        ),
        LabelConvention(
            "brats2024",
            "BraTS 2024 GLI post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC (resection cavity)",
            names={0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
            class_of={1: "NCR", 2: "ED", 3: "ET", 4: "RC"},
        ),
        LabelConvention(
            "brats2024-ped",
            "BraTS 2024 PED: 1 ET, 2 NET (non-enhancing tumour), 3 CC (cystic component), 4 ED",
            names={0: "background", 1: "ET", 2: "NET", 3: "CC", 4: "ED"},
            class_of={1: "ET", 2: "NCR", 3: "CC", 4: "ED"},
        ),
        LabelConvention(
            "msd",
            "MSD Task01_BrainTumour: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour",
            names={0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"},
            class_of={1: "ED", 2: "NCR", 3: "ET"},
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
            why.append("BraTS 2024 PED labels mean 1 ET, 2 NET, 3 cystic component, 4 edema: "
                       "pass --convention brats2024-ped (task ped2024)")
        elif cohort in BRATS_COHORTS:
            why.append(f"BraTS {cohort} labels are 1-3 ({BRATS_COHORTS[cohort]})")
        else:
            why.append("a case id naming no BraTS cohort (expected BraTS-<cohort>-<patient>-"
                       f"<time point>, cohort one of {', '.join(BRATS_COHORTS)}) is not GLI")
    return ("label 4 is read as the resection cavity only in BraTS 2024 GLI post-treatment cases "
            f"(BraTS-GLI-...); {'; '.join(why)}. If these are GLI-style post-treatment labels "
            "(4 = resection cavity), pass --convention brats2024; BraTS 2024 PED labels: "
            "--convention brats2024-ped; if 4 is ET (BraTS 2018-2021 "
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
                "the resection cavity (RC): use --convention brats2024 (task gli2024 learns RC as "
                "its own region); for BraTS 2024 PED labels --convention brats2024-ped; for BraTS 2018-2021 labels (ET = 4) under new file names use "
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


# ----------------------------------------------------------------------------- tasks
#: Each region as a set of classes (`Task.regions` overrides a few per task).
_REGION_CLASSES: dict[str, tuple[str, ...]] = {
    "TC": ("NCR", "ET"), "WT": ("NCR", "ED", "ET"), "ET": ("ET",), "RC": ("RC",), "CC": ("CC",),
    "NETC": ("NCR",), "SNFH": ("ED",), "NET": ("NCR",), "ED": ("ED",)}


@dataclass(frozen=True)
class Task:
    """One BraTS task: what a model learns from its labels and how it is scored.

    outputs: the network's sigmoid regions, in output order (overlapping: multi-hot).
    scored: the regions its rule set scores, in output order of the metrics.
    paint: (region, class) pairs painted in this order to turn regions back into labels
      (later wins).
    rules: the default scoring rule set (`medseg.scoring`).
    et_relabel: the default post-processing may turn a small predicted ET into core
      (`medseg cv` then chooses the volume threshold on the out-of-fold cases); False
      for metastases, where a small ET is the lesion itself.
    """

    name: str
    description: str
    convention: str
    cohort: str
    outputs: tuple[str, ...]
    scored: tuple[str, ...]
    paint: tuple[tuple[str, str], ...]
    rules: str
    overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    et_relabel: bool = True

    def region_classes(self, region: str) -> tuple[str, ...]:
        """The classes region `region` holds in this task (ped2024 TC = NCR ∪ ET ∪ CC)."""
        if region in self.overrides:
            return self.overrides[region]
        try:
            return _REGION_CLASSES[region]
        except KeyError:
            raise MedsegError(f"task {self.name}: unknown region {region!r}; known: "
                              f"{', '.join(self.regions)}") from None

    @property
    def regions(self) -> tuple[str, ...]:
        """Outputs, then the scored regions that are not outputs."""
        return self.outputs + tuple(r for r in self.scored if r not in self.outputs)

    @property
    def classes(self) -> frozenset[str]:
        """Every class the task's outputs distinguish."""
        return frozenset(c for r in self.outputs for c in self.region_classes(r))

    def region_values(self, convention: "str | LabelConvention") -> dict[str, tuple[int, ...]]:
        """Each region (outputs, then scored) → its label values in `convention`
        (classes the convention lacks are left out)."""
        conv = get_convention(convention)
        return {r: tuple(sorted(v for v, c in conv.class_of.items() if c in self.region_classes(r)))
                for r in self.regions}

    def to_dict(self) -> dict:
        """JSON-ready description, recorded in checkpoints, ONNX metadata and outputs."""
        return {"name": self.name, "outputs": list(self.outputs), "scored": list(self.scored),
                "regions": {r: list(self.region_classes(r)) for r in self.regions},
                "paint": [list(p) for p in self.paint], "convention": self.convention,
                "rules": self.rules, "cohort": self.cohort, "et_relabel": self.et_relabel}


_PAINT3 = (("WT", "ED"), ("TC", "NCR"), ("ET", "ET"))


def _task3(name: str, description: str, convention: str, cohort: str, rules: str, et_relabel: bool = True) -> Task:
    return Task(name, description, convention, cohort, REGIONS, REGIONS, _PAINT3, rules, et_relabel=et_relabel)


#: Every task medseg learns, by name.
TASKS: dict[str, Task] = {t.name: t for t in (
    _task3("gli2021", "BraTS 2021 adult glioma: TC, WT, ET", "brats2021", "GLI", "brats21"),
    _task3("gli2023", "BraTS 2023 adult glioma (pre-treatment): TC, WT, ET", "brats2023", "GLI", "brats21"),
    Task("gli2024", "BraTS 2024 adult glioma, post-treatment: TC, WT, ET and the resection cavity (RC) as "
                    "its own output; scored on ET, NETC, SNFH, RC, TC, WT",
         "brats2024", "GLI", REGIONS + ("RC",), ("ET", "NETC", "SNFH", "RC", "TC", "WT"),
         (("WT", "ED"), ("RC", "RC"), ("TC", "NCR"), ("ET", "ET")), "brats-eval"),
    Task("ped2024", "BraTS 2024 paediatric tumours: TC, WT, ET and the cystic component (CC) as its own "
                    "output (TC = ET ∪ NET ∪ CC); scored on ET, NET, CC, ED, TC, WT",
         "brats2024-ped", "PED", REGIONS + ("CC",), ("ET", "NET", "CC", "ED", "TC", "WT"),
         (("WT", "ED"), ("TC", "NCR"), ("CC", "CC"), ("ET", "ET")), "brats-eval",
         overrides={"TC": ("NCR", "ET", "CC"), "WT": ("NCR", "ED", "ET", "CC")}),
    _task3("men2023", "BraTS 2023 meningioma (pre-operative): TC, WT, ET", "brats2023", "MEN", "brats23-men"),
    _task3("met2023", "BraTS 2023 brain metastases: TC, WT, ET", "brats2023", "MET", "brats23-met",
           et_relabel=False),
    _task3("ssa2023", "BraTS 2023 sub-Saharan African adult glioma: TC, WT, ET", "brats2023", "SSA",
           "brats23-ssa"),
)}


def get_task(name: "str | Task") -> Task:
    """Look a task up by name; the error lists the valid names."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise MedsegError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None


def legacy_task(convention: "str | LabelConvention") -> Task:
    """The task of a model written before tasks existed (three regions TC, WT, ET, no
    task recorded): gli2021 for BraTS 2021 and MSD labels, otherwise gli2023 (also
    for brats2024 labels, whose RC such a model never learned); ped2024 for
    brats2024-ped labels, which no model before tasks could read."""
    name = get_convention(convention).name
    if name == "brats2024-ped":
        return TASKS["ped2024"]
    return TASKS["gli2021" if name in ("brats2021", "msd") else "gli2023"]


def detect_task(convention: "str | LabelConvention", cohorts: Iterable[str | None] = ()) -> tuple[Task, str]:
    """The task of a dataset with labels in `convention` whose case ids name `cohorts`
    (`brats_cohort` of each case) → (task, why). brats2024 labels → gli2024,
    brats2024-ped → ped2024; 1-3 labels → the cohort's 2023 task when every case
    names one cohort (MEN, MET, SSA), otherwise gli2023 (gli2021 for 2021/MSD labels)."""
    conv = get_convention(convention)
    found = sorted({c for c in cohorts if c})
    named = f"case ids name cohort(s) {', '.join(found)}" if found else "case ids name no BraTS cohort"
    if conv.name == "brats2024":
        return TASKS["gli2024"], f"labels {conv.name} (4 = resection cavity); {named}"
    if conv.name == "brats2024-ped":
        return TASKS["ped2024"], f"labels {conv.name} (1 ET, 2 NET, 3 CC, 4 ED); {named}"
    if conv.name in ("brats2021", "msd"):
        return TASKS["gli2021"], f"labels {conv.name} (three regions TC, WT, ET); {named}"
    by_cohort = {"MEN": "men2023", "MET": "met2023", "SSA": "ssa2023"}
    if len(found) == 1 and found[0] in by_cohort:
        return TASKS[by_cohort[found[0]]], f"labels {conv.name}; every case id names cohort {found[0]}"
    mixed = " (mixed cohorts: the glioma task's rules; pass --task to choose)" if len(found) > 1 else ""
    return TASKS["gli2023"], f"labels {conv.name}; {named}{mixed}"


def task_problem(task: "str | Task", convention: "str | LabelConvention") -> str | None:
    """Why labels in `convention` cannot train or score a model of `task`, or None.

    Every class the task learns must exist in the convention (gli2024 needs RC, ped2024
    needs CC), and every tumour class of the convention must be one the task learns
    (paediatric CC labels cannot feed a three-region task); non-tumour classes (RC)
    the task does not learn are ignored, as before tasks existed."""
    t, conv = get_task(task), get_convention(convention)
    missing = sorted(t.classes - conv.class_set)
    if missing:
        return (f"task {t.name} learns {', '.join(CLASS_NAMES[c] for c in missing)}, which labels in "
                f"convention {conv.name} ({conv.description}) do not have; use data labelled in "
                f"{t.convention}, or a task whose classes these labels hold")
    extra = sorted(conv.class_set - t.classes - set(NON_TUMOUR))
    if extra:
        return (f"labels in convention {conv.name} ({conv.description}) hold "
                f"{', '.join(CLASS_NAMES[c] for c in extra)}, which task {t.name} has no region for; "
                f"use the task of those labels ({detect_task(conv)[0].name})")
    return None


def resolve_task(convention: "str | LabelConvention", case_ids: Iterable[str], chosen: str | None = None,
                 recorded: tuple[str, str] | None = None, source: str = "data") -> tuple[Task, str]:
    """The task of cases labelled in `convention` → (task, why): `chosen` (``--task``,
    ``data.task``), else `recorded` ((name, where it was recorded)), else detected from
    the convention and the cohorts the `case_ids` name (`detect_task`). Labels the task
    cannot learn from or be scored on are a `DataError` naming `source`."""
    if chosen:
        t, why = get_task(chosen), "chosen (--task / data.task)"
    elif recorded and recorded[0]:
        t, why = get_task(recorded[0]), f"recorded in {recorded[1]}"
    else:
        t, why = detect_task(convention, [brats_cohort(c) for c in case_ids])
    problem = task_problem(t, convention)
    if problem:
        raise DataError(f"{source}: {problem}")
    return t, why


def _task_of(convention: "str | LabelConvention", task: "str | Task | None") -> Task:
    return get_task(task) if task is not None else legacy_task(convention)


def labels_to_regions(label: np.ndarray, convention: str | LabelConvention,
                      task: "str | Task | None" = None) -> np.ndarray:
    """Label map `(*spatial)` → boolean region stack `(R, *spatial)` of `task`'s outputs
    (default: the three regions TC, WT, ET).

    Regions overlap (ET ⊂ TC ⊂ WT), so this is multi-hot, not one-hot.
    """
    t = _task_of(convention, task)
    return region_masks(label, convention, t, t.outputs)


def region_masks(label: np.ndarray, convention: str | LabelConvention, task: "str | Task",
                 regions: Sequence[str]) -> np.ndarray:
    """Label map → boolean stack `(len(regions), *spatial)` of the named regions of
    `task` (outputs or scored ones)."""
    t = get_task(task)
    values = t.region_values(convention)
    lab = np.asarray(label)
    missing = [r for r in regions if r not in values]
    if missing:
        raise MedsegError(f"task {t.name} has no region {', '.join(missing)}; its regions: "
                          f"{', '.join(t.regions)}")
    return np.stack([np.isin(lab, values[r]) for r in regions])


def conversion_problem(task: "str | Task", convention: "str | LabelConvention") -> str | None:
    """Why `task`'s predictions cannot be written in `convention` (a class it paints
    that the convention has no value for would be lost), or None."""
    t, conv = get_task(task), get_convention(convention)
    lost = [c for _, c in t.paint if conv.value(c) is None]
    if lost:
        return (f"a {t.name} model predicts {', '.join(CLASS_NAMES[c] for c in lost)}, which convention "
                f"{conv.name} ({conv.description}) cannot hold: writing it there would lose that label; "
                f"write the model's convention ({t.convention}) or another that holds it")
    return None


def regions_to_labels(regions: np.ndarray, convention: str | LabelConvention,
                      task: "str | Task | None" = None) -> np.ndarray:
    """Region stack `(R, *spatial)` of `task`'s outputs (bool or {0,1}) → uint8 label map
    in `convention`, painting `Task.paint` in order (later wins).

    Three regions: precedence ET > TC > WT: a voxel in ET is ET even if the network
    left it out of WT; TC without ET is NCR; WT only is edema. gli2024 paints RC
    between edema and the core (ET > TC > RC > edema); ped2024 CC after the core.
    A class `convention` cannot hold is an error (`conversion_problem`)."""
    conv = get_convention(convention)
    t = _task_of(conv, task)
    reg = np.asarray(regions)
    if reg.ndim < 2 or reg.shape[0] != len(t.outputs):
        raise MedsegError(f"expected a region stack of shape ({len(t.outputs)}, *spatial) for "
                          f"{t.outputs} (task {t.name}), found {reg.shape}")
    problem = conversion_problem(t, conv)
    if problem:
        raise LabelError(problem)
    out = np.zeros(reg.shape[1:], dtype=np.uint8)
    for region, cls in t.paint:
        out[reg[t.outputs.index(region)].astype(bool)] = conv.value(cls)
    return out
