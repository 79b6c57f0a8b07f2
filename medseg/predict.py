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
from typing import TYPE_CHECKING, Callable, Sequence

from medseg.data.cases import InputCase
from medseg.data.inputs import (cases_from_input, check_modalities, dicom_seg_path,
                                output_convention, run_batch, with_dicom)
from medseg.data.io import load_header
from medseg.errors import MedsegError
from medseg.uncertainty import CALIBRATION, STATISTIC, check_calibration
from medseg.viewer import viewer_paths, write_viewer_files
from medseg.volumetry import VOLUMES_CSV, case_volumetry, write_batch_volumes

if TYPE_CHECKING:
    from medseg.crf import CRFParams
    from medseg.engine import Engine

__all__ = ["resolve_checkpoints", "default_postprocessing", "open_engine", "review_calibration",
           "review_threshold", "predict_all", "predict_input"]


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


def open_engine(model: Sequence[str | Path], engine: str = "torch", device: str | None = None,
                overlap: float | None = None, sw_batch_size: int | None = None, amp: bool | None = None,
                mirror: bool = False, min_component_ml: float | None = None,
                et_min_ml: float | None = None, provider: str = "auto",
                trt_cache: str | Path | None = None, crf: "CRFParams | None" = None) -> "Engine":
    """The engine for `--model`: ``torch`` (checkpoints, a train run or a cv folder,
    whose ``postprocessing.json`` gives the default ``et_min_ml``) or ``onnx`` (one
    exported file; torch is never imported; `provider`: ``auto``, ``cpu``, ``cuda``
    or ``tensorrt``, see `medseg.edge.session_providers`). None values keep the
    model's spec. `crf`: dense-CRF settings (`medseg.crf`) for each case's
    probabilities (`Engine.crf`); its package is checked here, before any case."""
    if crf is not None:
        from medseg.crf import require_crf
        require_crf()
    if engine != "onnx" and (provider != "auto" or trt_cache is not None):
        raise MedsegError("--provider and --trt-cache choose the onnxruntime execution provider: they "
                          "take --engine onnx (the torch engine uses --device)")
    if engine == "onnx":
        if len(model) != 1 or not str(model[0]).endswith(".onnx"):
            raise MedsegError("--engine onnx takes one .onnx file as --model (see `medseg export`)")
        if overlap is not None or sw_batch_size is not None or amp is not None or device is not None:
            raise MedsegError("--overlap, --sw-batch-size, --no-amp and --device are torch-engine options; "
                              "the ONNX engine runs the window settings recorded at export")
        from medseg.edge import EdgePredictor
        return _with_crf(EdgePredictor(model[0], min_component_ml=min_component_ml, et_min_ml=et_min_ml,
                                       mirror=mirror, provider=provider, trt_cache=trt_cache), crf)
    if engine != "torch":
        raise MedsegError(f"--engine {engine!r}; expected 'torch' or 'onnx'")
    from medseg.infer import Predictor
    if et_min_ml is None:
        et_min_ml = default_postprocessing(model).get("et_min_ml")
    return _with_crf(Predictor(resolve_checkpoints(model), device=device, overlap=overlap,
                               sw_batch_size=sw_batch_size, amp=amp, mirror=mirror,
                               min_component_ml=min_component_ml, et_min_ml=et_min_ml), crf)


def _with_crf(engine: "Engine", crf: "CRFParams | None") -> "Engine":
    if crf is not None and len(engine.spec.regions) != 3:
        raise MedsegError(f"--crf: the dense CRF models the nested regions TC, WT, ET of the three-region "
                          f"tasks; this model's task {engine.spec.task} outputs {', '.join(engine.spec.regions)}: "
                          "predict it without --crf")
    engine.crf = crf
    return engine


def review_calibration(model: Sequence[str | Path], onnx_meta: dict | None = None) -> tuple[dict, str] | None:
    """The review threshold chosen on cross-validation and where it was found, checked
    (`medseg.uncertainty.check_calibration`): for an ONNX model its metadata
    (`onnx_meta`, copied at export); else the cv folder of the checkpoints of `model`
    (``uncertainty.json``, written by ``benchmarks/uncertainty.py``; for one fold, its
    fold folder or cv folder). None when there is none."""
    if onnx_meta is not None:
        cal = onnx_meta.get("uncertainty")
        source = f"the model's metadata ({Path(model[0]).name})"
        return (cal, source) if cal and check_calibration(cal, source) else None
    # a checkpoint fold_k/checkpoints/final.pt → its fold folder; a folder: itself
    folds = {Path(p).parent.parent if Path(p).is_file() else Path(p) for p in model}
    places = sorted(folds) if len(folds) == 1 else []
    places += sorted({f.parent for f in folds if f.name.startswith("fold_")})
    path = next((f / CALIBRATION for f in places if (f / CALIBRATION).is_file()), None)
    if path is None:
        return None
    try:
        cal = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: not a readable review calibration ({type(exc).__name__}: {exc}); re-run "
                          "benchmarks/uncertainty.py --write-calibration, or pass --review-threshold") from None
    check_calibration(cal, str(path))
    return cal, str(path)


def review_threshold(engine: "Engine", override: float | None,
                     print_fn: Callable[[str], None] = print) -> float | None:
    """The case score from which `medseg predict --uncertainty` flags a case for review:
    `override` (``--review-threshold``), else the model's calibration
    (`review_calibration`, checked by `medseg.uncertainty.check_calibration`); None (no
    flags) when there is neither. Says which, and when the calibration's member count
    differs from this prediction's (scores then run on another scale)."""
    if override is not None:
        if not 0 <= override < 1:     # also refuses nan and inf: a case score lies in [0, 1)
            raise MedsegError(f"--review-threshold {override}: expected a number in [0, 1), the range of "
                              "a case's uncertainty score")
        print_fn(f"review threshold {override:g} (--review-threshold)")
        return float(override)
    found = review_calibration(engine.sources, engine.meta if engine.engine == "onnx" else None)
    if found is None:
        print_fn("no review threshold: cases are scored but none is flagged (pass --review-threshold, "
                 f"or give a cv folder with {CALIBRATION}: benchmarks/uncertainty.py --write-calibration)")
        return None
    cal, source = found
    threshold, notes = check_calibration(cal, source, engine.members())
    print_fn(f"review threshold {threshold:.4g} from {source} ({cal.get('chosen_on', 'cross-validation')})")
    for note in notes:
        print_fn(f"note: {note}")
    return threshold


def _targets(case: InputCase, out_dir: Path, probabilities: bool, uncertainty: bool,
             viewer_files: bool) -> list[Path]:
    """A case's outputs: mask first, then probabilities, uncertainty, DICOM-SEG, viewer files."""
    return ([out_dir / f"{case.case_id}.nii.gz"]
            + ([out_dir / "probabilities" / f"{case.case_id}.nii.gz"] if probabilities else [])
            + ([out_dir / f"{case.case_id}_uncertainty.nii.gz"] if uncertainty else [])
            + dicom_seg_path(out_dir, case)
            + (viewer_paths(out_dir, case.case_id) if viewer_files else []))


def predict_all(engine: "Engine", cases: list[InputCase], out_dir: str | Path,
                input_root: Path | None, convention: str | None = None, overwrite: bool = False,
                probabilities: bool = False, print_fn: Callable[[str], None] = print,
                viewer_files: bool = False, uncertainty: bool = False,
                review_threshold: float | None = None, shard: tuple[int, int] | None = None,
                raw: dict | None = None) -> list[Path]:
    """The one batch driver of both engines: every case → ``out_dir/<case_id>.nii.gz``
    (`medseg.data.inputs.run_batch`: inputs checked first, an interrupted batch
    continued, shards), its volumetry into ``predictions.json`` and ``volumes.csv``;
    with `probabilities` the TC/WT/ET probabilities under ``probabilities/``; with
    `viewer_files` the ITK-SNAP and Slicer label files; with `uncertainty`
    ``<case_id>_uncertainty.nii.gz`` and the case's ``uncertainty`` record (review flag
    at `review_threshold`, which the caller resolves with `review_threshold`); DICOM
    input also gets a DICOM Segmentation. `raw`: the raw-study settings (atlas,
    brain extractor, reference series) recorded with the run. Returns the mask paths."""
    out_dir = Path(out_dir)
    if uncertainty and engine.members() < 2:
        raise MedsegError(f"--uncertainty needs at least 2 members per case, this prediction has "
                          f"{engine.members()}: turn on mirror TTA (--tta) or give several fold models")
    targets = [_targets(c, out_dir, probabilities, uncertainty, viewer_files) for c in cases]
    check_modalities(cases, engine.meta, ", ".join(engine.sources))
    conv, why = output_convention(cases, convention, engine.spec.label_convention, engine.spec.task)
    print_fn(f"labels: {conv} (from {why})")
    post = engine.postprocessing()
    run = {"label_convention": conv, "convention_source": why, "task": engine.spec.task,
           "regions": list(engine.spec.regions), "engine": engine.engine,
           "model": engine.sources, "model_label_convention": engine.spec.label_convention,
           "mirror_tta": engine.mirror, "members": engine.members(), "probabilities": probabilities,
           "postprocessing": post, "min_component_ml": engine.spec.min_component_ml,
           "et_min_ml": engine.spec.et_min_ml, "crf": engine.crf.to_dict() if engine.crf else None,
           "uncertainty": STATISTIC if uncertainty else None,
           "review_threshold": review_threshold, **({"raw": raw} if raw else {})}

    def one(case: InputCase, outs: list[Path]) -> dict:
        labels, extra = engine.predict_case(
            case.images, outs[0], conv, case.channels, outs[1] if probabilities else None,
            out_dir / f"{case.case_id}_uncertainty.nii.gz" if uncertainty else None, review_threshold,
            case.space)
        if uncertainty and extra["uncertainty"]["review"]:
            print_fn(f"{case.case_id}: review (uncertainty {extra['uncertainty']['case_score']:.4g} "
                     f">= {review_threshold:.4g})")
        affine = load_header(outs[0]).affine        # the grid as viewers read the mask
        if viewer_files:
            write_viewer_files(labels, affine, conv, outs[-2:])
        return {"volumes": case_volumetry(labels, affine, conv, str(outs[0]), task=engine.spec.task), **extra,
                **(case.record or {})}

    res = run_batch(cases, out_dir, input_root, targets, overwrite, run,
                    with_dicom(one, out_dir, conv, engine.describe(), engine.engine), print_fn, shard=shard)
    skipped = f" ({res['skipped']} already there)" if res["skipped"] else ""
    tta = f", mirror TTA ({engine.members()} members)" if engine.mirror else ""
    print_fn(f"{res['predicted']} masks in {res['seconds']:.1f} s{skipped} with the {engine.engine} engine "
             f"({engine.describe()}){tta}; labels {conv}; post-processing: {post}")
    if uncertainty:
        print_fn(f"uncertainty ({STATISTIC}): <case>_uncertainty.nii.gz; scores and review flags in "
                 "predictions.json")
    viewers = ("; viewer files: <case>.seg.nrrd (3D Slicer), <case>.itksnap.txt (ITK-SNAP)"
               if viewer_files else "")
    if shard is None:       # a shard's volumes: in its manifest; the gathering run writes the CSV
        write_batch_volumes(out_dir, [(c.case_id, t[0]) for c, t in zip(cases, targets)], conv,
                            engine.spec.task)
        print_fn(f"volumes: {out_dir / VOLUMES_CSV}{viewers}")
    else:
        print_fn(f"volumes: in this shard's manifest; the run without --shard gathers them into "
                 f"{out_dir / VOLUMES_CSV}{viewers}")
    return [t[0] for t in targets]


def predict_input(predictor: "Engine", input: str | Path, out_dir: str | Path,
                  data_root: str | Path | None = None, convention: str | None = None,
                  overwrite: bool = False, probabilities: bool = False,
                  print_fn: Callable[[str], None] = print, viewer_files: bool = False) -> list[Path]:
    """Every case of a data folder (any supported layout) or of a datalist (paths
    relative to `data_root`) → masks in `out_dir` (the bundle's ``inferring``)."""
    cases, root = cases_from_input(input, data_root)
    return predict_all(predictor, cases, out_dir, root, convention, overwrite, probabilities, print_fn,
                       viewer_files)
