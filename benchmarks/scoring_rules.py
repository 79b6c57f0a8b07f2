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
  (pulls panoptica), its bundled `gli` config, through the package's own
  `evaluate_single_exam`.

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
from medseg.labels import REGIONS, labels_to_regions  # noqa: E402
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


def write_cases(tmp: Path, pairs) -> tuple[list[dict], dict]:
    """NIfTI label maps of every case → (jobs for the runner, {id: spacing})."""
    jobs, spacing = [], {}
    items = [(name.replace(" ", "_").replace(",", ""), p.astype(np.uint8), r.astype(np.uint8), sp)
             for name, (p, r, sp) in _test_cases().items()]
    items += [(f"brats_size_{i}", p, r, (1.0, 1.0, 1.0)) for i, (p, r) in enumerate(pairs)]
    for cid, p, r, sp in items:
        aff = np.diag([*sp, 1.0])
        for kind, arr in (("pred", p), ("ref", r)):
            nib.save(nib.Nifti1Image(arr, aff), str(tmp / f"{kind}_{cid}.nii.gz"))
        jobs.append({"id": cid, "pred": str(tmp / f"pred_{cid}.nii.gz"),
                     "ref": str(tmp / f"ref_{cid}.nii.gz")})
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


def compare(jobs, ref_out: dict) -> tuple[list[str], dict]:
    """Disagreements (text) and the largest differences per (rules, kind)."""
    bad, worst = [], {}
    plans = []
    if "brats23" in ref_out:
        plans += [("brats23", ref_out["brats23"]["BraTS-GLI"], BRATS23_KEYS),
                  ("brats23-met", ref_out["brats23"]["BraTS-MET"], BRATS23_KEYS)]
    if "brats-eval" in ref_out:
        plans.append(("brats-eval", ref_out["brats-eval"], EVAL_KEYS))
    for rules, theirs_all, keys in plans:
        for job in jobs:
            ours = evaluate_case(job["pred"], job["ref"], "brats2023", rules)
            for region in REGIONS:
                theirs = theirs_all[job["id"]][region]
                for col, key, kind in keys:
                    a, b = ours[region][col], _num(theirs[key], get_rules(rules).penalty)
                    ok, d = _close(a, b, kind)
                    w = worst.setdefault((rules, kind), [0.0, 0])
                    w[0], w[1] = max(w[0], d), w[1] + 1
                    if not ok:
                        bad.append(f"{rules:11} {job['id']:32} {region} {col:12} medseg {a:.6g} "
                                   f"reference {b:.6g}")
    return bad, worst


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
    print(f"{a.cases} BraTS-size case(s) made in {time.perf_counter() - t:.1f} s")
    for i, (pred, ref) in enumerate(pairs):
        q = labels_to_regions(ref, "brats2023")
        print(f"  case {i}: reference " + ", ".join(
            f"{r} {int(q[j].sum())} voxels in {ndimage.label(q[j], np.ones((3, 3, 3)))[1]} component(s)"
            for j, r in enumerate(REGIONS)))
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
        jobs, _ = write_cases(Path(tmp), pairs)
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        ref_out: dict = {"versions": {}, "seconds": {}}
        for python, *flags in runs:
            r = subprocess.run([python, str(RUNNER), str(Path(tmp) / "jobs.json"), *flags],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-4000:], file=sys.stderr)
                return 1
            out = json.loads(r.stdout.strip().splitlines()[-1])
            for key in ("versions", "seconds"):
                ref_out[key].update({f"{k} ({Path(python).parents[1].name})" if key == "versions" else k: v
                                     for k, v in out.pop(key).items()})
            ref_out.update(out)
        t = time.perf_counter()
        bad, worst = compare(jobs, ref_out)
        ours_s = time.perf_counter() - t
    print(f"\nreference versions: {ref_out['versions']}")
    print(f"reference seconds (all {len(jobs)} cases, 3 regions): "
          + ", ".join(f"{k} {v:.1f}" for k, v in ref_out["seconds"].items())
          + f"; medseg, every compared rule set: {ours_s:.1f}")
    print(f"\nlargest |difference| over {len(jobs)} cases × 3 regions:")
    for (rules, kind), (d, n) in sorted(worst.items()):
        print(f"  {rules:11} {kind:6} {d:.3g}  ({n} values)")
    if bad:
        print(f"\n{len(bad)} disagreement(s):")
        print("\n".join(bad))
        return 1
    print("\nall within tolerance (Dice 1e-4, HD95 0.05 + 1 %, counts exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
