"""`medseg predict`: masks for every case of a folder or datalist, or for one case
given as four files, written on each input's own grid.

Safety: output never goes into the input folder, existing masks are not
overwritten without `overwrite`, and every mask is written atomically, so an
interrupted run leaves only complete masks (re-running skips nothing silently:
it refuses, or overwrites on request).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from medseg.data.inputs import InputCase, cases_from_input, check_modalities, output_convention, run_batch
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
    """Predict every case into ``out_dir/<case_id>.nii.gz`` (`medseg.data.inputs.run_batch`:
    inputs checked first, an interrupted batch continued); returns the mask paths."""
    out_dir = Path(out_dir)
    targets = [[out_dir / f"{c.case_id}.nii.gz"]
               + ([out_dir / "probabilities" / f"{c.case_id}.nii.gz"] if probabilities else [])
               for c in cases]
    check_modalities(cases, predictor.meta, ", ".join(predictor.checkpoints))
    conv, why = output_convention(cases, convention, predictor.meta["label_convention"])
    print_fn(f"labels: {conv} (from {why})")
    post = describe_postprocessing(predictor.min_component_ml, predictor.et_min_ml)
    run = {"label_convention": conv, "convention_source": why, "engine": "torch",
           "model": predictor.checkpoints, "model_label_convention": predictor.meta["label_convention"],
           "mirror_tta": predictor.mirror, "probabilities": probabilities, "postprocessing": post,
           "min_component_ml": predictor.min_component_ml, "et_min_ml": predictor.et_min_ml}

    def one(case: InputCase, outs: list[Path]) -> None:
        predict_case(predictor, case.images, conv, outs[0], case.channels,
                     outs[1] if probabilities else None)

    res = run_batch(cases, out_dir, input_root, targets, overwrite, run, one, print_fn)
    skipped = f" ({res['skipped']} already there)" if res["skipped"] else ""
    print_fn(f"{res['predicted']} masks in {res['seconds']:.1f} s{skipped}; labels {conv}, "
             f"{len(predictor.models)} model(s){', mirror TTA' if predictor.mirror else ''}; "
             f"post-processing: {post}")
    return [t[0] for t in targets]


def predict_input(predictor: Predictor, input: str | Path, out_dir: str | Path,
                  data_root: str | Path | None = None, convention: str | None = None,
                  overwrite: bool = False, probabilities: bool = False,
                  print_fn: Callable[[str], None] = print) -> list[Path]:
    """Every case of a data folder (any supported layout) or of a datalist (paths
    relative to `data_root`) → masks in `out_dir` (the bundle's ``inferring``)."""
    cases, root = cases_from_input(input, data_root)
    return predict_all(predictor, cases, out_dir, root, convention, overwrite, probabilities, print_fn)
