"""`medseg predict`: masks for every case of a folder or datalist, or for one case
given as four files, written on each input's own grid.

Safety: output never goes into the input folder, existing masks are not
overwritten without `overwrite`, and every mask is written atomically, so an
interrupted run leaves only complete masks (re-running skips nothing silently:
it refuses, or overwrites on request).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from medseg.data.inputs import InputCase, cases_from_input, check_outputs, output_convention, write_manifest
from medseg.errors import MedsegError
from medseg.infer import Predictor, predict_case
from medseg.postprocess import describe_postprocessing

__all__ = ["resolve_checkpoints", "default_postprocessing", "predict_all", "predict_input"]


def resolve_checkpoints(model: Sequence[str | Path]) -> list[Path]:
    """A cv run folder (every ``fold_*/checkpoints/final.pt``: the fold ensemble), a
    train run folder (``checkpoints/final.pt``) or checkpoint files."""
    out: list[Path] = []
    for m in model:
        p = Path(m)
        if p.is_file():
            out.append(p)
        elif (p / "checkpoints" / "final.pt").is_file():
            out.append(p / "checkpoints" / "final.pt")
        elif p.is_dir() and sorted(p.glob("fold_*/checkpoints/final.pt")):
            out += sorted(p.glob("fold_*/checkpoints/final.pt"))
        else:
            raise MedsegError(f"--model {p}: no checkpoint found; expected a .pt file, a training "
                              "run folder (with checkpoints/final.pt) or a cross-validation folder "
                              "(with fold_*/checkpoints/final.pt) whose training has finished")
    return out


def default_postprocessing(model: Sequence[str | Path]) -> dict:
    """The ``postprocessing.json`` that `medseg cv` chose, when `model` is one cv folder."""
    if len(model) == 1 and (Path(model[0]) / "postprocessing.json").is_file():
        post = json.loads((Path(model[0]) / "postprocessing.json").read_text())
        return {"et_min_ml": float(post["et_min_ml"])}
    return {}


def predict_all(predictor: Predictor, cases: list[InputCase], out_dir: str | Path,
                input_root: Path | None, convention: str | None = None, overwrite: bool = False,
                probabilities: bool = False, print_fn: Callable[[str], None] = print) -> list[Path]:
    """Predict every case into ``out_dir/<case_id>.nii.gz``; returns the written paths."""
    out_dir = Path(out_dir)
    targets = [out_dir / f"{c.case_id}.nii.gz" for c in cases]
    probs = [out_dir / "probabilities" / f"{c.case_id}.nii.gz" for c in cases]
    check_outputs(out_dir, cases, input_root, targets + (probs if probabilities else []), overwrite)
    conv, why = output_convention(cases, convention, predictor.meta["label_convention"])
    print_fn(f"labels: {conv} (from {why})")
    t0 = time.perf_counter()
    for i, (case, target) in enumerate(zip(cases, targets), 1):
        t = time.perf_counter()
        predict_case(predictor, case.images, conv, target, case.channels,
                     probs[i - 1] if probabilities else None)
        print_fn(f"[{i}/{len(cases)}] {case.case_id} → {target} ({time.perf_counter() - t:.1f} s)")
    post = describe_postprocessing(predictor.min_component_ml, predictor.et_min_ml)
    write_manifest(out_dir, targets, conv, why, engine="torch", model=predictor.checkpoints,
                   model_label_convention=predictor.meta["label_convention"],
                   mirror_tta=predictor.mirror, postprocessing=post,
                   min_component_ml=predictor.min_component_ml, et_min_ml=predictor.et_min_ml)
    print_fn(f"{len(cases)} masks in {time.perf_counter() - t0:.1f} s; labels {conv}, "
             f"{len(predictor.models)} model(s){', mirror TTA' if predictor.mirror else ''}; "
             f"post-processing: {post}")
    return targets


def predict_input(predictor: Predictor, input: str | Path, out_dir: str | Path,
                  data_root: str | Path | None = None, convention: str | None = None,
                  overwrite: bool = False, probabilities: bool = False,
                  print_fn: Callable[[str], None] = print) -> list[Path]:
    """Every case of a data folder (any supported layout) or of a datalist (paths
    relative to `data_root`) → masks in `out_dir` (the bundle's ``inferring``)."""
    cases, root = cases_from_input(input, data_root)
    return predict_all(predictor, cases, out_dir, root, convention, overwrite, probabilities, print_fn)
