"""BraTS scoring rules as data: named rule sets, one chosen per run and recorded in
every output (`--rules` of `medseg evaluate` and `medseg cv`).

The field scores the same masks in several incompatible ways. A rule set is a small
declarative record of one of them; `medseg.metrics.score_region` interprets it. No
rule set is a fork of the code. Summaries under different rule sets never mix.

=============  ===========  ==================  ==============  =====  ===========================
rule set       both empty   one empty (HD95)    HD95            units  lesion-wise
=============  ===========  ==================  ==============  =====  ===========================
brats21        Dice 1, 0    373.13              pooled          mm     –
brats23[-TSK]  Dice 1, 0    374                 directed max,   mm     3-voxel (1 MEN/MET) dilation
                                                surfel-weighted        merge, ≤ 50 mm³ (2 MET) dropped
brats-eval     NaN (skip)   373                 pooled          voxel  one-to-one Dice matching; NSD@1
                                                                       (whole-image NSD@0.5)
=============  ===========  ==================  ==============  =====  ===========================

- **brats21** (the default): medseg's historical scores and the whole-image
  convention of BraTS 2018-2021 papers (and of nnU-Net/MONAI BraTS results), so
  earlier medseg numbers stay reproducible. Its HD95 pools both directions as MedPy
  does; the legacy CaPTk routine of those challenges is not installable here, so
  that agreement is assumed, not checked.
- **brats23** (`BraTS-2023-Metrics`, the 2023/2024 leaderboards): lesion-wise Dice
  and HD95 rank. `brats23` is the GLI task; `brats23-ssa`, `-ped` (same
  parameters), `-men`, `-met` differ only in dilation and lesion-size threshold.
- **brats-eval** (the current official `BraTS-evaluation` package, on panoptica):
  lesion-wise scores are the means over matched lesion pairs; detection errors are
  the TP/FP/FN counts, not folded into the means. Checked against 0.0.10 (panoptica
  2.1.7): it ignores the voxel spacing (a 2 mm case scores as 1 mm), computes its
  whole-image NSD at 0.5 voxel but lesion NSD at 1, and gives non-overlapping masks
  an infinite whole-image HD95 (written here as the 373 penalty, as its parser does
  for lesion HD95).

IoU (Jaccard), which none of these rule sets defines, is written under every one as
the whole-image (voxel-wise) IoU with that rule set's Dice conventions for empty
masks: both empty → 1 (brats21, brats23*) or NaN (brats-eval); one empty, or no
overlap → 0. The lesion-wise rule sets get no lesion-wise IoU. A case's
``mean_iou`` is the mean of its regions' IoU (NaN regions left out).

Readings of the references that are choices, not certainties: the brats23 size
threshold compares mm³ (the script multiplies voxel counts by the spacing; the same
as voxels at BraTS's 1 mm); brats-eval's penalty of 373 for an infinite whole-image
HD95 is the parser's lesion-wise rule carried over (the package reports inf).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from medseg.errors import MedsegError

__all__ = ["LesionRules", "RuleSet", "RULE_SETS", "DEFAULT_RULES", "BASE_METRICS",
           "CASE_METRICS", "ALL_METRICS", "get_rules", "rule_metrics", "describe_rules"]

#: The rule set used when none is named: see the module docstring for why.
DEFAULT_RULES = "brats21"

#: Whole-image columns of every rule set (as medseg has always written them, plus the
#: IoU after Dice: voxel-wise, with the rule set's Dice conventions for empty masks).
BASE_METRICS = ("dice", "iou", "hd95", "hausdorff", "sensitivity", "specificity", "vol_pred_ml",
                "vol_ref_ml")
#: Per-case columns after a region's own in every metrics row (the same value on each of
#: the case's region rows): the mean over the regions' IoU (`medseg.metrics.mean_iou`).
CASE_METRICS = ("mean_iou",)
#: Every column any rule set may add; `lesions_*` are counts, the rest floats.
ALL_METRICS = BASE_METRICS + CASE_METRICS + ("nsd", "lesion_dice", "lesion_hd95", "lesion_nsd", "lesions_tp",
                              "lesions_fp", "lesions_fn")


@dataclass(frozen=True)
class LesionRules:
    """How lesions (connected components of one region) are matched and averaged.

    matching:
      ``dilated-overlap`` (BraTS 2023): ground-truth components whose `dilation`-times
      dilated masks touch (18-connected structuring element, components 26-connected)
      are one lesion; a predicted component belongs to every lesion whose dilated mask
      it touches, the whole component counting; a component touching none is a false
      positive. ``bipartite-dice`` (panoptica): one-to-one matching that maximises the
      summed Dice over pairs that overlap at all (linear_sum_assignment).
    aggregate:
      ``penalised-mean`` (BraTS 2023): (Σ kept lesions' scores + FP × (Dice 0, HD95
      penalty)) / (kept lesions + FP); no lesion and no FP → Dice 1, HD95 0.
      ``matched-mean`` (panoptica "sq"): mean over matched pairs; no match → Dice 0,
      HD95 penalty, NSD 0, or NaN when neither mask has a lesion.
    min_size: ground-truth lesions of at most this size (mm³ in mm units, voxels in
      voxel units) leave the averages and counts (their matches are still not FPs).
    """
    matching: str
    aggregate: str
    dilation: int = 0
    connectivity: int = 26
    min_size: float = 0.0


@dataclass(frozen=True)
class RuleSet:
    """One way to score a region. Fields are values a leaderboard documents.

    both_empty: ``perfect`` (Dice 1, IoU 1, HD95 0) or ``nan`` (excluded from means).
    penalty: HD95 (and Hausdorff) when exactly one mask is empty, and of every
      unmatched lesion.
    hd95: ``pooled`` — surfaces are the voxels a 6-connected erosion removes, the 95th
      percentile (linear) of both directions' distances together (MedPy, panoptica);
      ``directed-max`` — surfaces are the 2×2×2-corner surfels of DeepMind's
      surface-distance, the larger of the two area-weighted directed 95th percentiles
      (BraTS 2023 code; MONAI's `HausdorffDistanceMetric` takes the max the same way).
    units: ``mm`` (distances and lesion sizes from the voxel spacing) or ``voxel``
      (spacing taken as 1; volumes in mL still use the real spacing).
    nsd_tolerance: normalised surface Dice at this tolerance (in `units`), or None.
    image_nsd_tolerance: the whole-image NSD's tolerance where it differs from the
      lesions' (panoptica computes its global NSD without the spacing, so at its
      0.5-voxel default, but lesion NSD at the minimum spacing, 1 voxel).
    disjoint_is_penalty: both masks non-empty but not overlapping → HD95 = penalty
      rather than the distance (panoptica treats "no overlap" like "no match").
    """
    name: str
    description: str
    reference: str
    both_empty: str
    penalty: float
    hd95: str
    units: str
    nsd_tolerance: float | None = None
    image_nsd_tolerance: float | None = None
    lesions: LesionRules | None = None
    disjoint_is_penalty: bool = False
    task: str = ""
    ranking: tuple[str, ...] = ("dice", "hd95")


_BRATS23 = RuleSet(
    name="brats23", task="GLI",
    description="BraTS 2023/2024 challenge code: lesion-wise Dice/HD95 (GT lesions merged "
                "by a 3-voxel dilation, lesions <= 50 mm3 dropped, FP/FN lesions Dice 0, "
                "HD95 374), whole-image HD95 = larger directed 95th percentile; both empty "
                "-> Dice 1, HD95 0",
    reference="github.com/rachitsaluja/BraTS-2023-Metrics metrics.py",
    both_empty="perfect", penalty=374.0, hd95="directed-max", units="mm",
    lesions=LesionRules(matching="dilated-overlap", aggregate="penalised-mean", dilation=3,
                        min_size=50.0),
    ranking=("lesion_dice", "lesion_hd95"))


def _brats23_task(task: str, dilation: int, min_size: float) -> RuleSet:
    return replace(_BRATS23, name=f"brats23-{task.lower()}", task=task,
                   description=_BRATS23.description.replace("3-voxel", f"{dilation}-voxel")
                   .replace("<= 50", f"<= {min_size:g}") + f" ({task} parameters)",
                   lesions=replace(_BRATS23.lesions, dilation=dilation, min_size=min_size))


#: Every rule set by name.
RULE_SETS: dict[str, RuleSet] = {r.name: r for r in (
    RuleSet(
        name="brats21",
        description="BraTS 2021 and earlier (medseg's default): whole-image Dice and HD95 in "
                    "mm, HD95 pools both directions; both empty -> Dice 1, HD95 0; one "
                    "empty -> Dice 0, HD95 373.13 mm",
        reference="MedPy hd95 (pooled); penalty = diagonal of the 240x240x155 mm BraTS field",
        both_empty="perfect", penalty=373.13, hd95="pooled", units="mm"),
    _BRATS23,
    _brats23_task("SSA", 3, 50.0),
    _brats23_task("PED", 3, 50.0),
    _brats23_task("MEN", 1, 50.0),
    _brats23_task("MET", 1, 2.0),
    RuleSet(
        name="brats-eval",
        description="official BraTS-evaluation package (panoptica, configs gli/ped/MenPre/"
                    "GoAT/mets): lesions = 26-connected components matched one-to-one by "
                    "Dice; lesion-wise Dice/HD95/NSD = mean over matched pairs; both empty "
                    "-> NaN (excluded); one empty or no match -> Dice 0, HD95 373; HD95 "
                    "pooled; voxel units; NSD at 1 voxel (whole-image NSD at 0.5)",
        reference="pypi BraTS-evaluation 0.0.10 (panoptica 2.1.7), configs/config_gli.yaml, "
                  "brats-parse-metrics seg",
        both_empty="nan", penalty=373.0, hd95="pooled", units="voxel", nsd_tolerance=1.0,
        image_nsd_tolerance=0.5,
        lesions=LesionRules(matching="bipartite-dice", aggregate="matched-mean"),
        disjoint_is_penalty=True,
        ranking=("lesion_dice", "lesion_hd95", "lesion_nsd")),
)}


def get_rules(name: str) -> RuleSet:
    """The rule set called `name`; an error that lists the valid names otherwise."""
    try:
        return RULE_SETS[name]
    except KeyError:
        raise MedsegError(f"unknown scoring rules {name!r}; choose one of "
                          f"{', '.join(RULE_SETS)} (README: 'Scoring rules')") from None


def rule_metrics(rules: RuleSet) -> tuple[str, ...]:
    """The metric columns a region gets under `rules`, in output order."""
    out = BASE_METRICS + (("nsd",) if rules.nsd_tolerance is not None else ())
    if rules.lesions is not None:
        out += ("lesion_dice", "lesion_hd95")
        out += ("lesion_nsd",) if rules.nsd_tolerance is not None else ()
        out += ("lesions_tp", "lesions_fp", "lesions_fn")
    return out


def describe_rules(rules: RuleSet) -> dict:
    """The full definition, as written into summaries and model metadata."""
    return asdict(rules)
