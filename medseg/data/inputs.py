"""Inputs of prediction (torch-free, shared by the PyTorch and ONNX engines): cases
from a data folder, a datalist, four explicit files or DICOM series folders
(`medseg.data.dicom`), and the output-safety rules (never inside the input
folder, never overwrite without asking)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medseg.data.cases import InputCase
from medseg.data.discover import LAYOUTS, discover
from medseg.data.folds import load_datalist
from medseg.data.io import is_nifti, load_array, load_header, nifti_stem, same_grid, write_json
from medseg.data.validate import constant_value, describe_blank
from medseg.errors import DataError, MedsegError
from medseg.labels import CHANNELS, get_convention


__all__ = ["InputCase", "cases_from_input", "single_case", "check_modalities", "output_convention", "write_manifest",
           "read_manifest", "parse_shard", "shard_cases", "SHARD_MANIFEST",
           "case_headers", "check_inputs", "run_batch", "MANIFEST", "dicom_seg_path", "with_dicom"]


def dicom_seg_path(out_dir: Path, case: InputCase) -> list[Path]:
    """``[out_dir/<case id>_seg.dcm]``, the DICOM Segmentation of a case read from
    DICOM series; ``[]`` for NIfTI input."""
    return [Path(out_dir) / f"{case.case_id}_seg.dcm"] if case.dicom is not None else []


def with_dicom(predict_one: Callable[[InputCase, Sequence[Path]], dict | None], out_dir: Path,
               convention: str, model: str, engine: str) -> Callable[[InputCase, Sequence[Path]], dict | None]:
    """`predict_one` (a `run_batch` step whose first output is the NIfTI mask) made to
    take DICOM cases too: their series are copied to NIfTI in a temporary folder
    (removed afterwards) and predicted as NIfTI, then the mask, on the reference
    series' grid, is also written as the DICOM Segmentation `dicom_seg_path`
    (`medseg.data.dicom.write_seg`: `model`, `engine`, `convention` recorded);
    the case's record says which series it references."""
    def one(case: InputCase, outs: Sequence[Path]) -> dict | None:
        if case.dicom is None or case.space is not None:   # raw studies predict their atlas case
            record = predict_one(case, outs)
            if case.dicom is None:
                return record
        else:
            with tempfile.TemporaryDirectory(prefix="medseg-dicom-") as tmp:
                record = predict_one(replace(case, images=case.dicom.to_nifti(Path(tmp))), outs)
        from medseg.data.dicom import write_seg
        seg = dicom_seg_path(out_dir, case)[0]
        write_seg(load_array(outs[0], dtype=np.uint8), case.dicom, convention, seg, model, engine)
        ref = case.dicom.reference
        return {**(record or {}), "dicom_seg": {"file": seg.name, "references": str(ref.folder),
                                               "series_instance_uid": ref.uid}}
    return one


def cases_from_input(path: str | Path, data_root: str | Path | None = None) -> tuple[list[InputCase], Path]:
    """A data folder (any supported layout; labels are ignored) or a datalist JSON
    (all its cases, training and testing) → cases, and the folder they live in."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        if data_root is None:
            raise MedsegError(f"--input {path} is a datalist: pass --data-root, the folder its "
                              "paths are relative to")
        dl = load_datalist(path)
        root = Path(data_root)
        conv = dl["label_convention"]["name"]
        cases = []
        for e in dl["training"] + dl.get("testing", []):
            imgs = e["image"] if isinstance(e["image"], list) else [e["image"]]
            cases.append(InputCase(e["id"], [root / i for i in imgs], list(dl["channels"]), conv,
                                   f"the datalist {path.name}"))
        return cases, root
    if not path.is_dir():
        raise MedsegError(f"--input {path}: not a folder or a datalist .json")
    from medseg.data.dicom import dicom_cases, is_dicom_input
    if is_dicom_input(path):
        return dicom_cases(path)
    ds = discover(path)
    src = f"the {ds.layout.name} file names in {path}"
    cases = []
    for c in ds.cases:
        # MSD: one 4D file holds every modality; BraTS: a file per modality.
        present = [ch for ch in ds.layout.channels if ch not in c.missing]
        if not c.images or (ds.layout.name != "msd" and len(present) != len(c.images)):
            raise DataError(f"{c.folder}: case {c.case_id} has no image file ({', '.join(c.missing)} "
                            "missing); run `medseg data check` on this folder")
        # Missing modalities are allowed here; the engine refuses them for a model
        # trained without modality dropout (`check_modalities`).
        cases.append(InputCase(c.case_id, list(c.images), present, ds.layout.convention, src))
    return cases, path


def single_case(files: dict[str, str | None], case_id: str | None = None) -> InputCase:
    """Four explicit files, keyed t1/t1ce/t2/flair (BraTS 2023 names t1n/t1c/t2w/t2f accepted)."""
    alias = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
    got: dict[str, Path] = {}
    for key, val in files.items():
        if val:
            got[alias.get(key, key)] = Path(val)
    if not got:
        raise MedsegError("single-case prediction needs at least one of --t1 --t1ce --t2 --flair "
                          "(all four unless the model was trained with modality dropout)")
    folders = [ch for ch, p in got.items() if p.is_dir()]
    if folders and len(folders) < len(got):
        raise MedsegError(f"--{folders[0]} {got[folders[0]]} is a folder (a DICOM series) but "
                          f"--{next(c for c in got if c not in folders)} is a file; give four DICOM "
                          "series folders or four NIfTI files")
    if folders:
        from medseg.data.dicom import dicom_case
        return dicom_case(got, case_id)
    for ch, p in got.items():
        if not p.is_file():
            raise DataError(f"--{ch} {p}: file not found")
        if not is_nifti(p):
            raise DataError(f"--{ch} {p}: expected a .nii or .nii.gz file")
    first = got[next(c for c in CHANNELS if c in got)].name
    suffixes = [f"{lay.sep}{lay.keys[c]}{ext}" for c in CHANNELS for lay in (LAYOUTS["brats2021"], LAYOUTS["brats2023"])
                for ext in (".nii.gz", ".nii")]
    for suffix in (*suffixes, ".nii.gz", ".nii"):
        if first.endswith(suffix):
            first = first[: -len(suffix)]
            break
    conv = _convention_from_names(got)
    present = [c for c in CHANNELS if c in got]
    return InputCase(case_id or first, [got[c] for c in present], present, conv,
                     f"the {conv} file names (_t1, _t1ce, … or -t1n, -t1c, …)" if conv else "")


def _convention_from_names(files: dict[str, Path]) -> str | None:
    """BraTS 2018-2021 (`_t1 _t1ce _t2 _flair`) or BraTS 2023+ (`-t1n -t1c -t2w -t2f`)
    names on all four files → that dataset's label convention; anything else → None."""
    for name in ("brats2021", "brats2023"):
        lay = LAYOUTS[name]
        if all(nifti_stem(p).endswith(lay.sep + lay.keys[ch]) for ch, p in files.items()):
            return lay.convention
    return None


def accepts_missing(meta: dict) -> bool:
    """Whether a model (its checkpoint or ONNX metadata `meta`) was trained with
    modality dropout, so it segments a case from any non-empty subset of modalities."""
    return float(meta.get("modality_dropout", 0.0)) > 0


def check_modalities(cases: Sequence[InputCase], meta: dict, model: str) -> dict[str, list[str]]:
    """{case id: missing modalities} of the cases that lack some; an error naming the
    first such case when the model (its checkpoint or ONNX metadata `meta`) was
    trained without modality dropout. Each case is told the model's rule
    (`InputCase.accepts_missing`), so that `check_inputs`, which reads the voxels,
    treats a blank modality file like a missing one."""
    for c in cases:
        c.accepts_missing, c.predicted_by = accepts_missing(meta), model
    missing = {c.case_id: c.missing for c in cases if c.missing}
    if missing and not accepts_missing(meta):
        cid, miss = next(iter(missing.items()))
        raise MedsegError(
            f"case {cid} has no {', '.join(miss)} ({len(missing)} case(s) miss modalities); the model "
            f"{model} was trained on all four modalities only (train.modality_dropout = 0): a blank "
            "channel it never saw in training would give an unreliable mask. Supply the missing "
            f"file(s) (loose files: {' '.join('--' + m for m in miss)}), or use a model trained with modality dropout (medseg cv ... --set "
            "train.modality_dropout=0.5), which accepts any non-empty subset")
    return missing


def output_convention(cases: Sequence[InputCase], override: str | None,
                      model_convention: str, task: str | None = None) -> tuple[str, str]:
    """The label convention of the masks, and why: `override` (``--convention``), else
    the input's own (detected for its folder, recorded in its datalist, or read from
    the file names), else — only when the input does not tell — the model's training
    data's, said so in the returned reason. A convention that cannot hold every label
    the model's `task` predicts (RC of gli2024 in a brats2023 folder) is an error
    naming what would be lost."""
    from medseg.labels import conversion_problem, legacy_task
    task = task or legacy_task(model_convention).name
    if override:
        conv, why = get_convention(override).name, "--convention"
    else:
        found = {(c.convention, c.convention_source) for c in cases if c.convention}
        if len({conv for conv, _ in found}) > 1:
            raise MedsegError(f"the input cases use several label conventions ({sorted(found)}); "
                              "predict one dataset at a time or pass --convention")
        if found:
            conv, why = next(iter(found))
        else:
            conv, why = model_convention, ("the model's training data: the input's file names do not "
                                           "tell; pass --convention to choose")
    problem = conversion_problem(task, conv)
    if problem:
        raise MedsegError(f"labels {conv} (from {why}): {problem} (--convention {model_convention})")
    return conv, why


def write_manifest(out_dir: Path, masks: Sequence[Path], status: str, run: dict,
                   missing: dict[str, list[str]] | None = None,
                   cases: dict[str, dict] | None = None, name: str | None = None) -> Path:
    """``out_dir/predictions.json``, written atomically: the run's settings `run`
    (label convention and why, model, engine, post-processing …), the label values
    of its convention, its status ("running" or "complete"), its masks, the
    modalities each case was predicted without and, in ``cases``, what each
    case's prediction reported beside its mask ({case id: {name: value}}). A shard
    of a batch writes its own file (`name`, see `shard_cases`)."""
    out = Path(out_dir) / (name or MANIFEST)
    write_json({"status": status, "label_convention": run["label_convention"],
                "labels": get_convention(run["label_convention"]).to_dict(), "run": run,
                "masks": [Path(t).name for t in masks], "missing_modalities": missing or {},
                "cases": cases or {}}, out)
    return out


def _read_json(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def read_manifest(out_dir: Path) -> dict:
    """The ``predictions.json`` of `out_dir` merged with the manifests of the shards
    that predicted into it (``predictions.shard-K-of-N.json``: their masks, cases and
    missing modalities); {} when there is none (or it is unreadable)."""
    out_dir = Path(out_dir)
    merged = _read_json(out_dir / MANIFEST)
    for part in sorted(out_dir.glob(SHARD_MANIFEST.format(k="*", n="*"))):
        m = _read_json(part)
        if not m:
            continue
        if not merged:
            merged = {**m, "masks": [], "cases": {}, "missing_modalities": {}}
        merged["masks"] = sorted(set(merged.get("masks", [])) | set(m.get("masks", [])))
        merged["cases"] = {**m.get("cases", {}), **merged.get("cases", {})}
        merged["missing_modalities"] = {**m.get("missing_modalities", {}), **merged.get("missing_modalities", {})}
    return merged


#: The manifest a shard of a batch writes (`medseg predict --shard K/N`).
SHARD_MANIFEST = "predictions.shard-{k}-of-{n}.json"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 ≤ K ≤ N) → (K, N); None → None; anything else is a clear error."""
    if text is None:
        return None
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        k, n = 0, 0
    if not 1 <= k <= n:
        raise MedsegError(f"--shard {text}: expected K/N with 1 <= K <= N, e.g. --shard 3/8 "
                          "(in a Slurm array: --shard $SLURM_ARRAY_TASK_ID/8 with --array=1-8)")
    return k, n


def shard_cases(cases: Sequence[InputCase], shard: tuple[int, int] | None) -> list[InputCase]:
    """Shard K of N of a batch: the cases at positions K-1, K-1+N, … of the batch in
    case-id order, so the N shards partition it exactly whatever order the input
    listed them in."""
    if shard is None:
        return list(cases)
    k, n = shard
    return sorted(cases, key=lambda c: c.case_id)[k - 1::n]


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _check_not_inside(out_dir: Path, cases: Sequence[InputCase], input_root: Path | None) -> None:
    roots = {input_root} if input_root else {c.images[0].parent for c in cases}
    for r in roots:
        if _inside(out_dir, r):
            raise MedsegError(f"--out {out_dir} lies inside the input folder {r}; medseg never "
                              "writes into its inputs: choose an output folder elsewhere")


MANIFEST = "predictions.json"


def _changed_settings(run: dict, before: dict) -> list[tuple[str, object, object]]:
    """(setting, value in `run`, value in `before`) for each setting of this run
    that an earlier manifest's ``run`` records otherwise. Compared as JSON, the
    form a manifest keeps (a tuple here is a list there)."""
    here = json.loads(json.dumps(run))
    return [(k, v, before.get(k)) for k, v in here.items() if before.get(k) != v]


def _shard_manifests(out_dir: Path) -> list[Path]:
    """The shard manifests (``predictions.shard-K-of-N.json``) in `out_dir`."""
    return sorted(Path(out_dir).glob(SHARD_MANIFEST.format(k="*", n="*")))


def _check_shard_settings(out_dir: Path, run: dict) -> None:
    """The gathering run (no --shard) adopts every shard's masks and records its own
    settings `run` for all of them, so every shard manifest in `out_dir` must record
    the same settings: otherwise an error naming the manifest, each setting that
    differs and the fix."""
    for part in _shard_manifests(out_dir):
        old = _read_json(part)
        if not isinstance(old.get("run"), dict):
            raise MedsegError(
                f"{part}: unreadable or without the run settings of shard {part.name}, so the masks it "
                f"lists cannot be gathered into {out_dir / MANIFEST}; re-run that shard with the options "
                "of this run, or delete its masks and this file (this run then predicts them), or pass "
                "--overwrite to predict the whole batch again")
        changed = _changed_settings(run, old["run"])
        if changed:
            what = "; ".join(f"{k}: {here!r} in this run, {there!r} in the shard" for k, here, there in changed)
            raise MedsegError(
                f"{part}: this shard of the batch was predicted with other settings than this gathering "
                f"run ({what}); its masks cannot be recorded in {MANIFEST} as this run's. Re-run that "
                f"shard with the same options as this run (--shard {_shard_text(part)}), or delete the "
                f"masks it lists and {part.name} (this run then predicts them), or pass --overwrite to "
                "predict the whole batch again")


def _remove_superseded_shards(out_dir: Path, masks: Sequence[Path], print_fn: Callable[[str], None]) -> None:
    """After a complete --overwrite run of the whole batch: the shard manifests whose
    masks it has all replaced are removed. They record settings no mask has any
    more, and a later run would refuse to gather them (`_check_shard_settings`)."""
    names = {Path(m).name for m in masks}
    for part in _shard_manifests(out_dir):
        listed = _read_json(part).get("masks")
        if isinstance(listed, list) and set(listed) <= names:
            part.unlink(missing_ok=True)
            print_fn(f"removed {part.name}: --overwrite replaced every mask of that shard")


def _shard_text(manifest: Path) -> str:
    """``"K/N"`` of a shard manifest's name (``predictions.shard-K-of-N.json``)."""
    parts = manifest.name.split(".")[1].split("-")      # ["shard", K, "of", N]
    return f"{parts[1]}/{parts[3]}" if len(parts) == 4 else "K/N"


def _finished(out_dir: Path, targets: Sequence[Sequence[Path]], overwrite: bool, run: dict,
              shard: tuple[int, int] | None = None) -> set[int]:
    """Indices of cases whose outputs all exist from an earlier run of the same
    settings (`run`, compared with ``predictions.json``, or for a `shard` with that
    shard's own manifest when it has one): a re-run continues the batch. Outputs
    of other settings are an error unless `overwrite`."""
    done = {i for i, ts in enumerate(targets) if all(t.exists() for t in ts)}
    some = [t for ts in targets for t in ts if t.exists()]
    if overwrite or not some:
        return set()
    own = Path(out_dir) / SHARD_MANIFEST.format(k=shard[0], n=shard[1]) if shard else None
    if own is not None and own.is_file():
        # A shard continues only its own work: another shard's settings do not say
        # how this one's masks were made (the gathering run compares them all).
        old, source = _read_json(own) or None, own.name
    else:
        old, source = read_manifest(out_dir) or None, MANIFEST
    before = old.get("run", {}) if isinstance(old, dict) else {}
    changed = _changed_settings(run, before) if old is not None else []
    if old is None or changed:
        was = ", ".join(f"{k} was {there!r}, now {here!r}" for k, here, there in changed[:3])
        why = (f"no {source} there says which run wrote it" if old is None else
               f"{source} says it was written with other settings ({was})")
        raise MedsegError(f"{some[0]} already exists ({len(some)} outputs in {out_dir}) and {why}; "
                          "pass --overwrite to replace them, re-run with the same options, or choose "
                          "another --out")
    return done


def _read_case(case: InputCase) -> list[tuple[str, Path, float]]:
    """Read every file of `case` once (headers, grids and voxel data: a truncated
    ``.nii.gz`` shows only when decoded) → its blank modalities (`constant_value`):
    (channel, file or series folder, the value)."""
    if case.dicom is not None and case.space is None:   # headers were checked when the case was made; the pixels here
        vols = ((ch, s.folder, s.volume()) for ch, s in case.dicom.series.items())
        return [(ch, f, v) for ch, f, vol in vols if (v := constant_value(vol)) is not None]
    blank = []
    for ch, path, head in zip(case.channels, case.images, case_headers(case.images)):
        data = load_array(path, head)
        if data.ndim == 4:       # one 4D file: its channels are `case.channels`, in order
            blank += [(name, path, v) for i, name in enumerate(case.channels)
                      if (v := constant_value(data[..., i])) is not None]
        elif (v := constant_value(data)) is not None:
            blank.append((ch, path, v))
    return blank


def _check_blank(case: InputCase, blank: list[tuple[str, Path, float]], n_cases: int) -> None:
    """An error naming the first blank modality of `case` (`_read_case`) unless it
    can be left out: its model was trained on all four modalities, or every
    modality of the case is blank, or the blank one is a channel of a 4D file."""
    ch, path, value = blank[0]
    if not case.accepts_missing:
        raise DataError(
            f"{path}: the {ch} image of case {case.case_id} is {describe_blank(value)}, a blank "
            f"modality ({n_cases} case(s) have one); the model {case.predicted_by} was trained on all "
            "four modalities only (train.modality_dropout = 0): a blank channel it never saw in "
            "training would give an unreliable mask. Replace the file with a correct "
            f"{ch} image (re-export it), or use a model trained with modality dropout (medseg cv ... "
            "--set train.modality_dropout=0.5), which predicts the case without that modality")
    if len(blank) >= len(case.channels):
        files = ", ".join(f"{p.name} ({c}) {describe_blank(v)}" for c, p, v in blank)
        raise DataError(
            f"case {case.case_id}: every modality is blank ({files}); expected at least one MRI "
            "volume with varying intensities: re-export the files, or leave the case out")
    if len(case.images) < len(case.channels):
        raise DataError(
            f"{path}: channel {ch} of this 4D image of case {case.case_id} is {describe_blank(value)}, "
            "a blank modality; one channel of a 4D file cannot be left out. Split the file into one "
            "3D file per modality and leave the blank one out (the model, trained with modality "
            "dropout, predicts without it), or replace the channel with a correct image")


def _drop_blank(case: InputCase, blank: list[tuple[str, Path, float]], print_fn: Callable[[str], None]) -> None:
    """Predict `case` without its blank modalities, as if their files were missing
    (its model accepts missing ones): they leave `case.channels` and `case.images`
    (and its DICOM series), so the engines fill them as missing and the manifest
    records them."""
    gone = {ch for ch, _, _ in blank}
    keep = [i for i, ch in enumerate(case.channels) if ch not in gone]
    case.images = [case.images[i] for i in keep]
    case.channels = [case.channels[i] for i in keep]
    if case.dicom is not None:
        case.dicom = replace(case.dicom, series={ch: s for ch, s in case.dicom.series.items() if ch not in gone})
    for ch, path, value in blank:
        print_fn(f"note: {path} ({ch} of case {case.case_id}) is {describe_blank(value)}: predicted "
                 f"as a missing modality, which the model {case.predicted_by} was trained for")


def check_inputs(cases: Sequence[InputCase], jobs: int | None = None,
                 print_fn: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Read every file of every case (headers, grids and voxel data: a truncated
    ``.nii.gz`` shows only when decoded) before any mask is written; the first
    problem is a `DataError` naming the file, what was expected and the fix.

    A blank modality (every voxel one value, `medseg.data.validate.constant_value`,
    the rule of `medseg data check`) is a missing one: a case whose model accepts
    missing modalities (`check_modalities` said so) is predicted without it (the
    case is changed in place, a note printed); for a model trained on all four it
    is an error, like a missing file. Cases no model was checked for are only read.
    Returns {case id: blank modalities left out}. Threads: gzip decoding releases
    the GIL."""
    with ThreadPoolExecutor(max_workers=jobs or min(4, os.cpu_count() or 1)) as pool:
        found = [(c, b) for c, b in zip(cases, pool.map(_read_case, cases)) if b]
    found = [(c, b) for c, b in found if c.accepts_missing is not None]
    for case, blank in found:          # every case first: a refusal changes none of them
        _check_blank(case, blank, len(found))
    for case, blank in found:
        _drop_blank(case, blank, print_fn)
    return {case.case_id: [ch for ch, _, _ in blank] for case, blank in found}


def run_batch(cases: Sequence[InputCase], out_dir: Path, input_root: Path | None,
              targets: Sequence[Sequence[Path]], overwrite: bool, run: dict,
              predict_one: Callable[[InputCase, Sequence[Path]], dict | None],
              print_fn: Callable[[str], None] = print, shard: tuple[int, int] | None = None) -> dict:
    """The batch loop of both engines. Every input is checked before anything is
    written; ``predictions.json`` (the run's settings `run` and its status) is
    written first, so an interrupted batch can be continued: a re-run with the
    same settings skips the cases whose outputs exist (each written atomically,
    so complete) and predicts the rest. `targets[i]` are case i's outputs, the
    mask first. What `predict_one` returns (a dict, or None) is case i's record
    in the manifest's ``cases``, kept for skipped cases. With `shard` (K, N) the
    cases are shard K's (`shard_cases`) and its manifest is its own file; a later
    run without --shard finds every mask there and writes ``predictions.json``
    for the whole batch, after checking that every shard recorded its settings
    `run` (`_check_shard_settings`). A blank modality file is a missing one
    (`check_inputs`). Returns {"predicted": n, "skipped": n, "seconds": s}."""
    out_dir = Path(out_dir)
    _check_not_inside(out_dir, cases, input_root)
    if shard is None and not overwrite:
        _check_shard_settings(out_dir, run)
    done = _finished(out_dir, targets, overwrite, run, shard)
    todo = [i for i in range(len(cases)) if i not in done]
    if done:
        print_fn(f"continuing {out_dir}: {len(done)} of {len(cases)} cases already predicted with the "
                 f"same settings, {len(todo)} to go")
    t0 = time.perf_counter()
    check_inputs([cases[i] for i in todo], print_fn=print_fn)
    if todo:
        print_fn(f"checked {len(todo)} case(s) in {time.perf_counter() - t0:.1f} s")
    masks = [ts[0] for ts in targets]
    before = read_manifest(out_dir) if done else {}
    missing = {c.case_id: c.missing for c in cases if c.missing}
    # A finished case is not read again, so a blank file it was predicted without
    # is known only from the earlier manifest.
    old_missing = before.get("missing_modalities", {})
    missing.update({cases[i].case_id: old_missing[cases[i].case_id] for i in sorted(done)
                    if cases[i].case_id in old_missing})
    old = before.get("cases", {})
    records = {cases[i].case_id: old[cases[i].case_id] for i in sorted(done) if cases[i].case_id in old}
    name = SHARD_MANIFEST.format(k=shard[0], n=shard[1]) if shard else None
    write_manifest(out_dir, masks, status="running", run=run, missing=missing, cases=records, name=name)
    t0 = time.perf_counter()
    for n, i in enumerate(todo, 1):
        t = time.perf_counter()
        record = predict_one(cases[i], targets[i])
        if isinstance(record, dict) and record:
            records[cases[i].case_id] = record
            write_manifest(out_dir, masks, status="running", run=run, missing=missing, cases=records,
                           name=name)
        without = f"; without {', '.join(cases[i].missing)}" if cases[i].missing else ""
        print_fn(f"[{n}/{len(todo)}] {cases[i].case_id} → {masks[i]} ({time.perf_counter() - t:.1f} s{without})")
    seconds = time.perf_counter() - t0
    write_manifest(out_dir, masks, status="complete", run=run, missing=missing, cases=records, name=name)
    if shard is None and overwrite:
        _remove_superseded_shards(out_dir, masks, print_fn)
    return {"predicted": len(todo), "skipped": len(done), "seconds": seconds}


def case_headers(images: Sequence[Path]) -> list:
    """Headers of one case's files, checked: four co-registered 3D files or one 4D
    file with 4 channels; otherwise a `DataError` naming the file and the fix."""
    heads = [load_header(p) for p in images]   # readable NIfTI, else a DataError naming it
    for p, h in zip(images[1:], heads[1:]):
        if not same_grid(h.shape, h.affine, heads[0].shape, heads[0].affine):
            raise DataError(f"{p}: grid {h.shape[:3]} does not match {images[0].name} "
                            f"{heads[0].shape[:3]} (shape or affine differ); all modalities of a "
                            "case must be co-registered on one grid: resample this file onto it")
    files_3d = 1 <= len(images) <= len(CHANNELS) and all(len(h.shape) == 3 for h in heads)
    one_4d = len(images) == 1 and len(heads[0].shape) == 4 and heads[0].shape[3] == len(CHANNELS)
    if not (files_3d or one_4d):
        raise DataError(f"{images[0]}: expected up to four 3D files (one per modality) or one 4D "
                        f"file with 4 channels, found {len(images)} file(s) of shape {heads[0].shape}")
    return heads
