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

from medseg.data.inputs import (InputCase, cases_from_input, check_modalities, dicom_seg_path,
                                output_convention, run_batch, with_dicom)
from medseg.data.io import load_header
from medseg.errors import MedsegError
from medseg.infer import Predictor, predict_case, predict_case_uncertainty
from medseg.postprocess import describe_postprocessing
from medseg.uncertainty import CALIBRATION, CASE_SCORE, STATISTIC
from medseg.viewer import viewer_paths, write_viewer_files
from medseg.volumetry import VOLUMES_CSV, case_volumetry, write_batch_volumes

__all__ = ["resolve_checkpoints", "default_postprocessing", "review_calibration", "review_threshold",
           "predict_all", "predict_input"]


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


def review_calibration(model: Sequence[str | Path]) -> tuple[dict, Path] | None:
    """The review threshold chosen on cross-validation (``uncertainty.json``, written by
    ``benchmarks/uncertainty.py``) and its file, when `model` is one cv folder, one of
    its fold folders or a fold's checkpoint; else None."""
    if len(model) != 1:
        return None
    p = Path(model[0])
    p = p if p.is_dir() else p.parent.parent          # fold_k/checkpoints/final.pt → fold_k
    folders = [p, p.parent] if p.name.startswith("fold_") else [p]   # a cv fold: its cv folder too
    path = next((f / CALIBRATION for f in folders if (f / CALIBRATION).is_file()), None)
    if path is None:
        return None
    try:
        cal = json.loads(path.read_text())
        float(cal["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedsegError(f"{path}: not a readable review calibration ({type(exc).__name__}: {exc}); "
                          "re-run benchmarks/uncertainty.py --write-calibration, or pass "
                          "--review-threshold") from None
    if cal.get("statistic") != STATISTIC or cal.get("case_score") != CASE_SCORE:
        raise MedsegError(f"{path}: threshold chosen for the {cal.get('statistic')!r} map and the "
                          f"{cal.get('case_score')!r} score, but medseg scores cases with {STATISTIC!r} "
                          f"and {CASE_SCORE!r}; re-run benchmarks/uncertainty.py --write-calibration, or pass "
                          "--review-threshold")
    return cal, path


def review_threshold(model: Sequence[str | Path], override: float | None, members: int,
                     print_fn: Callable[[str], None] = print) -> float | None:
    """The case score from which `medseg predict --uncertainty` flags a case for review:
    `override` (``--review-threshold``), else the cv folder's calibration; None (no
    flags) when there is neither. Says which, and when the calibration's member count
    differs from this prediction's `members` (scores then run on another scale)."""
    if override is not None:
        print_fn(f"review threshold {override:g} (--review-threshold)")
        return float(override)
    found = review_calibration(model)
    if found is None:
        print_fn("no review threshold: cases are scored but none is flagged (pass --review-threshold, "
                 f"or give a cv folder with {CALIBRATION}: benchmarks/uncertainty.py --write-calibration)")
        return None
    cal, path = found
    print_fn(f"review threshold {cal['threshold']:.4g} from {path} ({cal.get('chosen_on', 'cross-validation')})")
    if cal.get("members") and int(cal["members"]) != members:
        print_fn(f"note: chosen with {cal['members']} members per case, predicting with {members}: "
                 "an ensemble's scores are not on the same scale (README: Uncertainty)")
    return float(cal["threshold"])


def predict_all(predictor: Predictor, cases: list[InputCase], out_dir: str | Path,
                input_root: Path | None, convention: str | None = None, overwrite: bool = False,
                probabilities: bool = False, print_fn: Callable[[str], None] = print,
                viewer_files: bool = False, uncertainty: bool = False,
                review_threshold: float | None = None, shard: tuple[int, int] | None = None) -> list[Path]:
    """Predict every case into ``out_dir/<case_id>.nii.gz`` (`medseg.data.inputs.run_batch`:
    inputs checked first, an interrupted batch continued), its volumetry into its
    ``predictions.json`` record and ``volumes.csv``, and with `viewer_files` the
    ITK-SNAP and Slicer label files beside it; with `uncertainty`,
    ``<case_id>_uncertainty.nii.gz`` beside the mask and the case's ``uncertainty``
    record (scores, review flag at `review_threshold`); returns the mask paths."""
    out_dir = Path(out_dir)
    targets = [[out_dir / f"{c.case_id}.nii.gz"]
               + ([out_dir / "probabilities" / f"{c.case_id}.nii.gz"] if probabilities else [])
               + ([out_dir / f"{c.case_id}_uncertainty.nii.gz"] if uncertainty else [])
               + dicom_seg_path(out_dir, c)
               + (viewer_paths(out_dir, c.case_id) if viewer_files else [])
               for c in cases]
    check_modalities(cases, predictor.meta, ", ".join(predictor.checkpoints))
    conv, why = output_convention(cases, convention, predictor.meta["label_convention"])
    print_fn(f"labels: {conv} (from {why})")
    post = describe_postprocessing(predictor.min_component_ml, predictor.et_min_ml)
    run = {"label_convention": conv, "convention_source": why, "engine": "torch",
           "model": predictor.checkpoints, "model_label_convention": predictor.meta["label_convention"],
           "mirror_tta": predictor.mirror, "probabilities": probabilities, "postprocessing": post,
           "min_component_ml": predictor.min_component_ml, "et_min_ml": predictor.et_min_ml,
           "uncertainty": STATISTIC if uncertainty else None, "review_threshold": review_threshold}

    def one(case: InputCase, outs: list[Path]) -> dict:
        extra = {}
        if uncertainty:
            labels, extra["uncertainty"] = predict_case_uncertainty(
                predictor, case.images, conv, outs[0], out_dir / f"{case.case_id}_uncertainty.nii.gz",
                case.channels, outs[1] if probabilities else None, review_threshold)
            if extra["uncertainty"]["review"]:
                print_fn(f"{case.case_id}: review (uncertainty {extra['uncertainty']['case_score']:.4g} "
                         f">= {review_threshold:.4g})")
        else:
            labels = predict_case(predictor, case.images, conv, outs[0], case.channels,
                                  outs[1] if probabilities else None)
        affine = load_header(outs[0]).affine        # the grid as viewers read the mask
        if viewer_files:
            write_viewer_files(labels, affine, conv, outs[-2:])
        return {"volumes": case_volumetry(labels, affine, conv, str(outs[0])), **extra}

    described = f"{predictor.meta['network']['name']}, {len(predictor.checkpoints)} checkpoint(s)"
    res = run_batch(cases, out_dir, input_root, targets, overwrite, run,
                    with_dicom(one, out_dir, conv, described, "torch"), print_fn, shard=shard)
    if shard is None:       # a shard's volumes: in its manifest; the gathering run writes the CSV
        write_batch_volumes(out_dir, [(c.case_id, t[0]) for c, t in zip(cases, targets)], conv)
    skipped = f" ({res['skipped']} already there)" if res["skipped"] else ""
    if uncertainty:
        print_fn(f"uncertainty ({STATISTIC}, {predictor.members()} members): <case>_uncertainty.nii.gz; "
                 "scores and review flags in predictions.json")
    print_fn(f"{res['predicted']} masks in {res['seconds']:.1f} s{skipped}; labels {conv}, "
             f"{len(predictor.models)} model(s){', mirror TTA' if predictor.mirror else ''}; "
             f"post-processing: {post}")
    print_fn(f"volumes: {out_dir / VOLUMES_CSV}" + ("; viewer files: <case>.seg.nrrd (3D Slicer), "
                                                    "<case>.itksnap.txt (ITK-SNAP)" if viewer_files else ""))
    return [t[0] for t in targets]


def predict_input(predictor: Predictor, input: str | Path, out_dir: str | Path,
                  data_root: str | Path | None = None, convention: str | None = None,
                  overwrite: bool = False, probabilities: bool = False,
                  print_fn: Callable[[str], None] = print, viewer_files: bool = False) -> list[Path]:
    """Every case of a data folder (any supported layout) or of a datalist (paths
    relative to `data_root`) → masks in `out_dir` (the bundle's ``inferring``)."""
    cases, root = cases_from_input(input, data_root)
    return predict_all(predictor, cases, out_dir, root, convention, overwrite, probabilities, print_fn,
                       viewer_files)
