"""Scoring rule sets (`medseg evaluate --rules`): speed on BraTS-size cases, and
agreement with the reference implementations.

    python benchmarks/scoring_rules.py [--cases 2] [--repeats 3]
    python benchmarks/scoring_rules.py --ref-python /tmp/refenv/bin/python \\
        --brats23-python /tmp/refenv23/bin/python --brats23-code /tmp/brats23   # + cross-check

**Speed.** Synthetic BraTS-size cases (240×240×155, 1 mm; `medseg.data.synth`
tumours) with a prediction made from the reference: shifted one voxel, ET
eroded, a stray ET blob far away, the reference's two satellite lesions (64 and
48 voxels) missed. Printed: seconds per region under every rule set (median of
--repeats), from boolean masks already in memory, as `medseg evaluate` holds
them after reading the files.

**Agreement.** The cases of `tests/test_scoring.py` (as label 1: WT = TC = the
mask, ET empty) and the BraTS-size cases (labels 1/2/3) are written as NIfTI
label maps and scored by medseg and by the references, each run in its own
test-only environment (nothing is vendored, nothing becomes a medseg dependency):

- `brats23`, `brats23-met`: `metrics.py` of github.com/rachitsaluja/BraTS-2023-
  Metrics, challenges BraTS-GLI and BraTS-MET, from `--brats23-code` (a folder with
  its `metrics.py` and `surface_distance/`), run by `--brats23-python`: an
  environment with the script's 2023 stack, `pip install "numpy<2" "pandas<2"
  "scipy<1.12" nibabel connected-components-3d` (pandas 2 cannot run it).
- `brats-eval`: `--ref-python`, an environment with `pip install BraTS-evaluation`
  (pulls panoptica), through the package's own `evaluate_single_exam`: the cases
  above on TC/WT/ET with its bundled `gli` config, and the BraTS 2024 tasks on all
  their scored regions (`medseg evaluate --task`): each BraTS-size case relabelled
  (`brats2024_pairs`: a necrotic core, ET → NETC, in every case; gli2024, brats2024
  labels: a resection cavity, RC = 4, partly missed, one cavity missed and a stray
  one; ped2024, brats2024-ped labels: a cyst, CC = 3, partly wrong, and a stray one)
  plus two crops with classes absent (`empty_class_cases`), gli2024 on ET, NETC,
  SNFH, RC, TC, WT with the `gli` config (groups et, netc, snfh, rc, tc, wt) and
  ped2024 on ET, NET, CC, ED, TC, WT with the `ped` config (et, netc = NET, cc, ed,
  tc, wt); each region's label values must also equal those of the config's group.

Tolerance: |ΔDice| ≤ 1e-4, |ΔHD95| ≤ 0.05 + 1 % of the reference's value; counts
exact. Infinity in a reference output is compared as the rule set's penalty (the
references' own replacement: 374 in the 2023 script, 373 in the package's parser).
Exit status 1 when anything disagrees, so `tests/test_scoring.py`'s slow test can
run it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.evaluate import evaluate_case  # noqa: E402
from medseg.labels import REGIONS, get_task, labels_to_regions  # noqa: E402
from medseg.metrics import score_region  # noqa: E402
from medseg.scoring import RULE_SETS, get_rules  # noqa: E402

RUNNER = Path(__file__).with_name("_scoring_reference.py")
DICE_TOL, HD_ABS, HD_REL = 1e-4, 0.05, 0.01


def _blob(lab, centre, half, value):
    sl = tuple(slice(c - h, c + h) for c, h in zip(centre, half))
    lab[sl] = np.where(lab[sl] == 0, value, lab[sl])


def brats_size_pair(patient: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) label maps (brats2023 labels) of shape 240×240×155."""
    from medseg.data.synth import render_case
    ref = render_case(11, patient, shape=(240, 240, 155), geometry_variation=False).labels("brats2023")
    # Two satellite lesions (edema) the model misses: 4³ = 64 voxels (> 50 mm³, scored
    # by brats23) and 2×4×6 = 48 (dropped by brats23 GLI, kept by MET and brats-eval).
    # They sit 20 voxels from the side of the head away from the tumour (centres are
    # within 38 mm of the midline, radii ≤ 35 mm), as does a stray ET blob.
    x_far = 20 if np.argwhere(ref > 0)[:, 0].mean() > 120 else 220
    sat = np.zeros_like(ref)
    _blob(sat, (x_far, 60, 60), (2, 2, 2), 2)
    _blob(sat, (x_far, 80, 60), (1, 2, 3), 2)
    ref = np.where(sat > 0, sat, ref)
    pred = np.roll(ref, (1, -1, 0), axis=(0, 1, 2))
    pred = np.where(np.roll(sat, (1, -1, 0), axis=(0, 1, 2)) > 0, 0, pred)
    # ET eroded by one voxel (the rim becomes necrosis), a stray 4³ ET blob.
    et = pred == 3
    pred[et & ~ndimage.binary_erosion(et)] = 1
    _blob(pred, (x_far, 160, 100), (2, 2, 2), 3)
    return pred.astype(np.uint8), ref.astype(np.uint8)


#: Each BraTS 2024 task cross-checked: (label convention, BraTS-evaluation config).
TASKS_2024 = {"gli2024": ("brats2024", "gli"), "ped2024": ("brats2024-ped", "ped")}
#: brats2023 → brats2024-ped label values: NETC 1 → NET 2, SNFH 2 → ED 4, ET 3 → 1.
TO_PED = np.array([0, 2, 4, 1], np.uint8)
SHIFT = ((1, -1, 0), (0, 1, 2))   # brats_size_pair's prediction shift: np.roll(…, *SHIFT)


def _ball(lab, centre, radius, value, onto):
    """Paint `value` into the ball of `radius` voxels around `centre`, over the values `onto`."""
    sl = tuple(slice(max(c - radius, 0), c + radius + 1) for c in centre)
    grid = np.ogrid[sl]
    inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
    box = lab[sl]
    box[inside & np.isin(box, onto)] = value


def _beside_core(ref, dist: int, last: bool) -> tuple[int, ...]:
    """An edema voxel of `ref` (brats2023 labels) `dist` voxels (rounded) from the tumour
    core: the first or the last such voxel in C order (opposite sides of the core)."""
    core = np.isin(ref, (1, 3))
    lo = np.maximum(np.argwhere(core).min(0) - 3 * dist, 0)
    sl = tuple(slice(a, b) for a, b in zip(lo, np.argwhere(core).max(0) + 3 * dist + 1))
    d = ndimage.distance_transform_edt(~core[sl])
    found = np.argwhere((ref[sl] == 2) & (np.rint(d) == dist))
    return tuple(int(v) for v in found[-1 if last else 0] + lo)


def brats2024_pairs(pred: np.ndarray, ref: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{task: (prediction, reference)} for gli2024 (brats2024 labels) and ped2024
    (brats2024-ped labels) from a `brats_size_pair` (brats2023 labels), every class
    present in both and every region partly wrong:

    - necrosis: the reference's ET eroded by 2 voxels becomes NETC; the prediction's
      core is smaller (the reference's ET eroded by 3, shifted as the prediction is),
      besides the NETC rim the prediction already has;
    - gli2024: a resection cavity (RC = 4) of radius 6 beside the core (over edema and
      background) and a missed 4³ cavity 28 voxels away; the prediction's cavity of
      radius 5 is off by (2, 1, 0) voxels, and it adds a stray 4³ cavity on the other side;
    - ped2024: labels relabelled 2023 → PED (NETC → NET 2, SNFH → ED 4, ET → 1); a
      cyst (CC = 3) of radius 5 beside the core on the other side (over ED, NET,
      background); the prediction's is off by (-1, 2, 1), plus a stray 4³ cyst.
    """
    et = ref == 3
    ref, pred = ref.copy(), pred.copy()
    ref[ndimage.binary_erosion(et, iterations=2)] = 1
    pred[np.roll(ndimage.binary_erosion(et, iterations=3), *SHIFT) & (pred == 3)] = 1
    cx, cy, cz = (int(v) for v in np.rint(np.argwhere(np.isin(ref, (1, 3))).mean(0)))
    rc, cc = _beside_core(ref, 5, last=False), _beside_core(ref, 4, last=True)

    g_ref, g_pred = ref.copy(), pred.copy()
    _ball(g_ref, rc, 6, 4, (0, 2))
    _blob(g_ref, (cx, cy + 28, cz), (2, 2, 2), 4)          # missed: a second, small cavity
    _ball(g_pred, tuple(np.add(rc, (2, 1, 0))), 5, 4, (0, 2))
    _blob(g_pred, (cx, cy - 28, cz), (2, 2, 2), 4)         # stray cavity

    p_ref, p_pred = TO_PED[ref], TO_PED[pred]
    _ball(p_ref, cc, 5, 3, (0, 2, 4))
    _ball(p_pred, tuple(np.add(cc, (-1, 2, 1))), 5, 3, (0, 2, 4))
    _blob(p_pred, (cx, cy - 28, cz), (2, 2, 2), 3)         # stray cyst
    out = {"gli2024": (g_pred, g_ref), "ped2024": (p_pred, p_ref)}
    for task, (p, r) in out.items():
        for name, lab in (("prediction", p), ("reference", r)):
            if set(np.unique(lab)) != {0, 1, 2, 3, 4}:
                raise RuntimeError(f"{task} {name}: labels {np.unique(lab).tolist()}, expected 0-4")
    return out


def empty_class_cases(by_task: dict) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(id, task, prediction, reference) of classes absent, as in many real 2024 cases,
    from `brats2024_pairs`' output cropped to 81³ voxels around the tumour core:
    gli2024 with no cavity in the reference (the prediction's is all false positive)
    and no NETC in the prediction; ped2024 with no cyst in either."""
    g_pred, g_ref = by_task["gli2024"]
    centre = np.rint(np.argwhere(np.isin(g_ref, (1, 3))).mean(0)).astype(int)
    lo = np.clip(centre - 40, 0, np.array(g_ref.shape) - 81)
    crop = tuple(slice(a, a + 81) for a in lo)
    g_pred, g_ref = g_pred[crop].copy(), g_ref[crop].copy()
    g_ref[g_ref == 4] = 0
    g_pred[g_pred == 1] = 3
    p_pred, p_ref = (lab[crop].copy() for lab in by_task["ped2024"])
    p_pred[p_pred == 3] = 4
    p_ref[p_ref == 3] = 4
    return [("gli2024_no_RC_ref_no_NETC_pred", "gli2024", g_pred, g_ref),
            ("ped2024_no_CC", "ped2024", p_pred, p_ref)]


def time_rules(pairs, repeats: int) -> dict:
    """{rules: {region: median seconds}} from boolean masks in memory."""
    out = {}
    for name in RULE_SETS:
        rules = get_rules(name)
        per_region = {r: [] for r in REGIONS}
        for pred, ref in pairs:
            p, q = labels_to_regions(pred, "brats2023"), labels_to_regions(ref, "brats2023")
            for i, r in enumerate(REGIONS):
                for _ in range(repeats):
                    t = time.perf_counter()
                    score_region(p[i], q[i], (1.0, 1.0, 1.0), rules)
                    per_region[r].append(time.perf_counter() - t)
        out[name] = {r: float(np.median(v)) for r, v in per_region.items()}
        out[name]["max"] = float(max(max(v) for v in per_region.values()))
    return out


def _test_cases():
    spec = importlib.util.spec_from_file_location("test_scoring", REPO / "tests" / "test_scoring.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CASES


def write_cases(tmp: Path, pairs, cases24=()) -> tuple[list[dict], dict]:
    """NIfTI label maps of every case → (jobs for the runner, {id: spacing}).

    `pairs`: brats2023 label maps, scored on TC/WT/ET (task None) with the package's
    gli config; `cases24`: (id, task, prediction, reference) in the task's labels,
    scored on all of its regions with the config `TASKS_2024` names."""
    jobs, spacing = [], {}
    legacy = ("brats2023", None, "gli")
    items = [(name.replace(" ", "_").replace(",", ""), p.astype(np.uint8), r.astype(np.uint8), sp, legacy)
             for name, (p, r, sp) in _test_cases().items()]
    items += [(f"brats_size_{i}", p, r, (1.0, 1.0, 1.0), legacy) for i, (p, r) in enumerate(pairs)]
    items += [(cid, p, r, (1.0, 1.0, 1.0), (TASKS_2024[task][0], task, TASKS_2024[task][1]))
              for cid, task, p, r in cases24]
    for cid, p, r, sp, (convention, task, config) in items:
        aff = np.diag([*sp, 1.0])
        for kind, arr in (("pred", p), ("ref", r)):
            nib.save(nib.Nifti1Image(arr, aff), str(tmp / f"{kind}_{cid}.nii.gz"))
        jobs.append({"id": cid, "pred": str(tmp / f"pred_{cid}.nii.gz"),
                     "ref": str(tmp / f"ref_{cid}.nii.gz"), "convention": convention,
                     "task": task, "config": config})
        spacing[cid] = sp
    return jobs, spacing


def _num(v, penalty):
    if v is None:
        return float("nan")
    return float(penalty) if v == "inf" else float(v)


def _close(ours: float, theirs: float, kind: str) -> tuple[bool, float]:
    if np.isnan(ours) or np.isnan(theirs):
        return bool(np.isnan(ours) and np.isnan(theirs)), 0.0
    d = abs(ours - theirs)
    if kind == "dice":
        return d <= DICE_TOL, d
    if kind == "hd":
        return d <= HD_ABS + HD_REL * abs(theirs), d
    return d == 0, d


#: (our column, their key, kind) per reference.
BRATS23_KEYS = [("dice", "Legacy_Dice", "dice"), ("hd95", "Legacy_HD95", "hd"),
                ("lesion_dice", "LesionWise_Score_Dice", "dice"),
                ("lesion_hd95", "LesionWise_Score_HD95", "hd"),
                ("lesions_tp", "Num_TP", "count"), ("lesions_fp", "Num_FP", "count"),
                ("lesions_fn", "Num_FN", "count")]
EVAL_KEYS = [("dice", "global_bin_dsc", "dice"), ("hd95", "global_bin_hd95", "hd"),
             ("nsd", "global_bin_nsd", "dice"), ("lesion_dice", "sq_dsc", "dice"),
             ("lesion_hd95", "sq_hd95", "hd"), ("lesion_nsd", "sq_nsd", "dice"),
             ("lesions_tp", "tp", "count"), ("lesions_fp", "fp", "count"),
             ("lesions_fn", "fn", "count")]
#: medseg region → BraTS-evaluation group (gli config: et netc snfh rc tc wt; ped: et
#: netc cc ed tc wt, its netc being the PED NET).
EVAL_GROUPS = {"ET": "et", "NETC": "netc", "SNFH": "snfh", "RC": "rc", "TC": "tc", "WT": "wt",
               "NET": "netc", "CC": "cc", "ED": "ed"}


def compare(jobs, ref_out: dict) -> tuple[list[str], dict, list[tuple]]:
    """Disagreements (text), the largest differences per (rules[ task], kind), and the
    2024 tasks' values: (task, case, region, column, medseg, reference, |difference|).
    brats23 scores the brats2023 jobs only (task None); brats-eval every job, a 2024
    task's on all its scored regions, whose label values must be those of the config's
    group."""
    bad, worst, rows24 = [], {}, []
    plans = []
    if "brats23" in ref_out:
        plans += [("brats23", ref_out["brats23"]["BraTS-GLI"], BRATS23_KEYS),
                  ("brats23-met", ref_out["brats23"]["BraTS-MET"], BRATS23_KEYS)]
    if "brats-eval" in ref_out:
        plans.append(("brats-eval", ref_out["brats-eval"], EVAL_KEYS))
    for rules, theirs_all, keys in plans:
        for job in jobs:
            task = job.get("task")
            if task and rules != "brats-eval":
                continue
            ours = evaluate_case(job["pred"], job["ref"], job.get("convention", "brats2023"), rules, task)
            regions = get_task(task).scored if task else REGIONS
            for region in regions:
                group = EVAL_GROUPS[region] if rules == "brats-eval" else region
                if task:
                    mine = set(get_task(task).region_values(job["convention"])[region])
                    their_labels = ref_out.get("groups", {}).get(job["config"], {}).get(group)
                    if their_labels is None or set(their_labels) != mine:
                        bad.append(f"{rules:11} {job['id']:32} {region} label values: medseg "
                                   f"{sorted(mine)}, config {job['config']} group {group} {their_labels}")
                theirs = theirs_all[job["id"]][group]
                for col, key, kind in keys:
                    a, b = ours[region][col], _num(theirs[key], get_rules(rules).penalty)
                    ok, d = _close(a, b, kind)
                    w = worst.setdefault((f"{rules} {task}" if task else rules, kind), [0.0, 0])
                    w[0], w[1] = max(w[0], d), w[1] + 1
                    if task:
                        rows24.append((task, job["id"], region, col, a, b, d))
                    if not ok:
                        bad.append(f"{rules:11} {job['id']:32} {region} {col:12} medseg {a:.6g} "
                                   f"reference {b:.6g}")
    return bad, worst, rows24


def print_2024(rows24) -> None:
    """One line per (case, region) of the 2024 tasks: medseg / reference per column."""
    cols = [c for c, _, _ in EVAL_KEYS]
    short = {"lesion_dice": "LW dice", "lesion_hd95": "LW hd95", "lesion_nsd": "LW nsd",
             "lesions_tp": "tp", "lesions_fp": "fp", "lesions_fn": "fn"}
    table: dict = {}
    for task, cid, region, col, a, b, d in rows24:
        table.setdefault((cid, region), {})[col] = (a, b)
    print("\nBraTS 2024 tasks, brats-eval: medseg / BraTS-evaluation")
    print(f"{'case':32} {'region':6}" + "".join(f"{short.get(c, c):>18}" for c in cols))
    for (cid, region), vals in table.items():
        print(f"{cid:32} {region:6}" + "".join(
            f"{vals[c][0]:>9.4g}/{vals[c][1]:<8.4g}" if c in vals else f"{'':18}" for c in cols))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2, help="BraTS-size cases")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-python", help="Python of an environment with BraTS-evaluation")
    p.add_argument("--brats23-python", help="Python of an environment for BraTS-2023-Metrics")
    p.add_argument("--brats23-code", help="folder holding BraTS-2023-Metrics' metrics.py")
    p.add_argument("--no-timing", action="store_true")
    a = p.parse_args()

    t = time.perf_counter()
    pairs = [brats_size_pair(i) for i in range(a.cases)]
    by_task = [brats2024_pairs(pred, ref) for pred, ref in pairs] if a.ref_python else []
    cases24 = [(f"{task}_brats_size_{i}", task, p, r) for i, d in enumerate(by_task) for task, (p, r) in d.items()]
    cases24 += empty_class_cases(by_task[0]) if by_task else []
    print(f"{a.cases} BraTS-size case(s) made in {time.perf_counter() - t:.1f} s"
          + (" (+ gli2024 and ped2024 versions of each, and 2 cropped ones with classes absent)"
             if by_task else ""))
    for i, (pred, ref) in enumerate(pairs):
        q = labels_to_regions(ref, "brats2023")
        print(f"  case {i}: reference " + ", ".join(
            f"{r} {int(q[j].sum())} voxels in {ndimage.label(q[j], np.ones((3, 3, 3)))[1]} component(s)"
            for j, r in enumerate(REGIONS)))
        for task, (_, ref24) in (by_task[i].items() if by_task else ()):
            values = get_task(task).region_values(TASKS_2024[task][0])
            masks = {r: np.isin(ref24, values[r]) for r in get_task(task).scored}
            print(f"    {task}: reference " + ", ".join(
                f"{r} {int(m.sum())} ({ndimage.label(m, np.ones((3, 3, 3)))[1]})" for r, m in masks.items()))
    if not a.no_timing:
        timing = time_rules(pairs, a.repeats)
        print(f"\nseconds per region (median of {a.repeats}; max over all runs), 240×240×155:")
        print(f"{'rules':12}" + "".join(f"{r:>8}" for r in REGIONS) + f"{'max':>8}")
        for name, row in timing.items():
            print(f"{name:12}" + "".join(f"{row[r]:8.3f}" for r in REGIONS) + f"{row['max']:8.3f}")
    runs = []
    if a.ref_python:
        runs.append([a.ref_python, "--brats-eval"])
    if a.brats23_python and a.brats23_code:
        runs.append([a.brats23_python, "--brats23-code", a.brats23_code])
    if not runs:
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        jobs, _ = write_cases(Path(tmp), pairs, cases24)
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        ref_out: dict = {"versions": {}, "seconds": {}}
        for python, *flags in runs:
            r = subprocess.run([python, str(RUNNER), str(Path(tmp) / "jobs.json"), *flags],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-4000:], file=sys.stderr)
                return 1
            out = json.loads(r.stdout.strip().splitlines()[-1])
            ref_out.setdefault("groups", {}).update(out.pop("groups", {}))
            for key in ("versions", "seconds"):
                ref_out[key].update({f"{k} ({Path(python).parents[1].name})" if key == "versions" else k: v
                                     for k, v in out.pop(key).items()})
            ref_out.update(out)
        t = time.perf_counter()
        bad, worst, rows24 = compare(jobs, ref_out)
        ours_s = time.perf_counter() - t
    print(f"\nreference versions: {ref_out['versions']}")
    n24 = sum(1 for j in jobs if j.get("task"))
    print(f"reference seconds ({len(jobs)} cases: {len(jobs) - n24} on TC/WT/ET, {n24} on their 2024 "
          "task's 6 regions): "
          + ", ".join(f"{k} {v:.1f}" for k, v in ref_out["seconds"].items())
          + f"; medseg, every compared rule set: {ours_s:.1f}")
    if rows24:
        print_2024(rows24)
    print("\nlargest |difference| (per rule set, 2024 task; values compared):")
    for (rules, kind), (d, n) in sorted(worst.items()):
        print(f"  {rules:19} {kind:6} {d:.3g}  ({n} values)")
    if bad:
        print(f"\n{len(bad)} disagreement(s):")
        print("\n".join(bad))
        return 1
    print("\nall within tolerance (Dice 1e-4, HD95 0.05 + 1 %, counts exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
