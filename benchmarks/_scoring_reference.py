"""Runs the reference BraTS scorers on NIfTI label-map pairs; called by
`scoring_rules.py` with the *reference* environment's Python (never medseg's, never
imported by medseg). Reads a JSON job list, prints one JSON object.

    python _scoring_reference.py JOBS.json [--brats23-code DIR] [--brats-eval]

JOBS.json: [{"id": ..., "pred": path, "ref": path, "task": None | "gli2024" | ...,
"config": "gli" | "ped"}, ...] ("config": BraTS-evaluation's bundled config, default
gli; BraTS-2023-Metrics scores only the jobs without a task, brats2023 labels).
Output: {"brats23": {challenge: {id: {region: {...}}}}, "brats-eval": {id: {group:
{...}}} (every group of the job's config, e.g. gli: et netc snfh rc tc wt),
"groups": {config: {group: [label values]}}, "seconds": {...}, "versions": {...}}.
Infinity is written as the string "inf", NaN as null.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib import metadata
from importlib.resources import files

CHALLENGES = ("BraTS-GLI", "BraTS-MET")


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if math.isnan(f):
        return None
    if math.isinf(f):
        return "inf"
    return f


def run_brats23(code_dir: str, jobs: list[dict]) -> dict:
    """BraTS-2023-Metrics `get_LesionWiseResults`, unmodified. Its 2023 pins (numpy
    < 2, pandas < 2) are bridged by two shims that change no arithmetic:
    `np.Inf` and `DataFrame.append` (→ `pd.concat`)."""
    import numpy as np
    import pandas as pd
    if not hasattr(np, "Inf"):
        np.Inf = np.inf
    if not hasattr(pd.DataFrame, "append"):
        pd.DataFrame.append = lambda self, other, **kw: pd.concat([self, other], **kw)
    sys.path.insert(0, code_dir)
    import metrics as brats23   # the script's own module name

    out: dict = {}
    for challenge in CHALLENGES:
        out[challenge] = {}
        for job in jobs:
            df = brats23.get_LesionWiseResults(job["pred"], job["ref"], challenge)
            out[challenge][job["id"]] = {
                row["Labels"]: {k: row[k] for k in ("Legacy_Dice", "Legacy_HD95", "LesionWise_Score_Dice",
                                                    "LesionWise_Score_HD95", "Num_TP", "Num_FP", "Num_FN")}
                for _, row in df.iterrows()}
    return out


def _groups(evaluator) -> dict:
    """{group: [label values]} of a loaded Panoptica evaluator (its config's groups)."""
    groups = getattr(evaluator, "segmentation_class_groups", None)
    if groups is None:
        groups = evaluator._Panoptica_Evaluator__segmentation_class_groups
    return {name: [int(v) for v in g.value_labels] for name, g in groups.items()}


def run_brats_eval(jobs: list[dict]) -> tuple[dict, dict]:
    """BraTS-evaluation's own `evaluate_single_exam` with its bundled config named by
    each job (`gli` by default; `ped`) → ({id: {group: metrics}}, {config: groups})."""
    from brats_evaluation.evaluation import evaluate_single_exam
    from panoptica import Panoptica_Evaluator
    evaluators, groups = {}, {}
    out = {}
    keys = ("global_bin_dsc", "global_bin_hd95", "global_bin_nsd", "sq_dsc", "sq_hd95", "sq_nsd",
            "tp", "fp", "fn", "n_ref_instances", "n_pred_instances")
    for job in jobs:
        config = job.get("config") or "gli"
        if config not in evaluators:
            evaluators[config] = Panoptica_Evaluator.load_from_config(
                str(files("brats_evaluation").joinpath("configs", f"config_{config}.yaml")))
            groups[config] = _groups(evaluators[config])
        res = evaluate_single_exam(job["pred"], job["ref"], job["id"], evaluators[config])
        if "error" in res:
            raise RuntimeError(f"{job['id']}: {res['error']}")
        out[job["id"]] = {g: {k: res[g].get(k) for k in keys} for g in groups[config]}
    return out, groups


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("jobs")
    p.add_argument("--brats23-code")
    p.add_argument("--brats-eval", action="store_true")
    a = p.parse_args()
    jobs = json.loads(open(a.jobs).read())
    result: dict = {"seconds": {}, "versions": {}}
    for pkg in ("numpy", "scipy", "pandas", "panoptica", "BraTS-evaluation", "connected-components-3d"):
        try:
            result["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if a.brats23_code:
        t = time.perf_counter()
        result["brats23"] = run_brats23(a.brats23_code, [j for j in jobs if not j.get("task")])
        result["seconds"]["brats23"] = time.perf_counter() - t
    if a.brats_eval:
        t = time.perf_counter()
        result["brats-eval"], result["groups"] = run_brats_eval(jobs)
        result["seconds"]["brats-eval"] = time.perf_counter() - t
    print(json.dumps(_clean(result)))


if __name__ == "__main__":
    main()
