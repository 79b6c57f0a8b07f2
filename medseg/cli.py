"""`medseg` command line: parse, call one function, print.

Exit status: 0 success, 1 the data check found errors, 2 bad input or usage
(the message says what and how to fix it; no traceback).
"""

from __future__ import annotations

import argparse
import json
import time
import sys
from collections import Counter
from pathlib import Path

from medseg import __version__
from medseg.errors import MedsegError

__all__ = ["main", "build_parser", "LAYOUT_NAMES"]

#: The data layouts `medseg data synth` writes (medseg.data.discover.LAYOUTS).
LAYOUT_NAMES = ("brats2021", "brats2023", "msd")


def _progress(label: str):
    """A one-line progress display on a terminal; silent otherwise (logs, CI)."""
    if not sys.stderr.isatty():
        return None

    def show(i: int, n: int, what: str) -> None:
        end = "\n" if i == n else ""
        print(f"\r{label} {i}/{n} {what:<30}", end=end, file=sys.stderr, flush=True)
    return show


def _cmd_synth(a) -> int:
    from medseg.data.synth import synthesize
    ids = synthesize(a.out, a.cases, a.layout, a.seed, tuple(a.shape), a.test_cases,
                     not a.uniform_geometry, a.preview, progress=_progress("synth"), task=a.task)
    print(f"wrote {len(ids)} {a.layout} {a.task} cases ({a.cases} labelled, {a.test_cases} unlabelled) "
          f"to {a.out}" + (f"; preview {a.preview}" if a.preview else ""))
    return 0


def _cmd_index(a) -> int:
    from medseg.data.discover import discover, resolve_convention
    ds = discover(a.root)
    conv, _ = resolve_convention(ds, a.convention, a.jobs)
    if a.json:
        print(json.dumps({
            "root": str(ds.root), "layout": ds.layout.name, "label_convention": conv.name,
            "task": _dataset_task(ds, conv, a.task)[0].name,
            "channels": list(ds.layout.channels),
            "cases": [{"id": c.case_id, "patient": c.patient_id,
                       "images": [str(p) for p in c.images],
                       "label": str(c.label) if c.label else None,
                       "missing": list(c.missing)} for c in ds.cases],
            "ignored": [str(p) for p in ds.ignored]}, indent=2))
        return 0
    patients = len({c.patient_id for c in ds.training})
    print(f"root        {ds.root}")
    print(f"layout      {ds.layout.name} (channels {', '.join(ds.layout.channels)})")
    print(f"labels      {conv.name}: {conv.description}")
    task, why = _dataset_task(ds, conv, a.task)
    print(f"task        {task.name}: {task.description} ({why})")
    print(f"training    {len(ds.training)} cases with labels ({patients} patients)")
    print(f"testing     {len(ds.testing)} cases without labels")
    incomplete = [c.case_id for c in ds.cases if c.missing]
    if incomplete:
        print(f"incomplete  {len(incomplete)} cases miss files: {', '.join(incomplete[:5])}"
              " (run `medseg data check`)")
    if ds.ignored:
        print(f"ignored     {len(ds.ignored)} NIfTI files that fit no case, e.g. {ds.ignored[0]}")
    return 0


def _cmd_check(a) -> int:
    from medseg.data.validate import check_dataset
    from medseg.data.io import AFFINE_TOL
    rep = check_dataset(a.root, a.convention, a.jobs, AFFINE_TOL if a.affine_tol is None else a.affine_tol,
                        progress=_progress("check"))
    for f in rep.errors:
        print(f)
    warns = rep.warnings
    if a.verbose:
        for f in warns:
            print(f)
    elif warns:
        kinds = Counter(f.kind for f in warns)
        for kind, n in kinds.items():
            print(f"WARNING {n} cases: {kind} (handled by medseg; --verbose lists them)")
    ds = rep.dataset
    conv = rep.convention.name if rep.convention else "unknown"
    status = "OK" if rep.ok else "FAILED"
    print(f"{status}: {len(ds.cases)} cases ({len(ds.training)} labelled) in {ds.layout.name} "
          f"layout, labels {conv}: {len(rep.errors)} errors, {len(warns)} warnings")
    return 0 if rep.ok else 1


def _cmd_split(a) -> int:
    from medseg.data.discover import discover, resolve_convention
    from medseg.data.folds import build_datalist, write_datalist
    ds = discover(a.root)
    conv, scans = resolve_convention(ds, a.convention, a.jobs)
    name = a.name or Path(a.out).stem
    dl = build_datalist(ds, conv, scans, a.folds, a.seed, name)
    task, why = _dataset_task(ds, conv, a.task)
    if a.task:
        dl["task"], dl["regions"] = task.name, list(task.outputs)
    written = write_datalist(dl, a.out, a.overwrite)
    sizes = [sum(1 for e in dl["training"] if e["fold"] == k) for k in range(a.folds)]
    print(f"{'wrote' if written else 'unchanged'} {a.out}: {len(dl['training'])} cases in "
          f"{a.folds} folds {sizes} (seed {a.seed}, patient-grouped), {len(dl['testing'])} testing, "
          f"labels {conv.name}, task {task.name} ({why})")
    return 0


def _dataset_task(ds, conv, task: str | None):
    """(task, why) of a discovered dataset: `task` (--task, checked against its labels),
    else detected from its convention and the cohorts its case ids name."""
    from medseg.labels import resolve_task
    return resolve_task(conv, [c.case_id for c in ds.training or ds.cases], task, source=str(ds.root))


def _cmd_preprocess(a) -> int:
    from medseg.train import fold_data, prepare_store
    cfg = _config(a)
    data = fold_data(a.datalist, a.data_root, None)
    t0 = time.perf_counter()
    store = prepare_store(cfg, data, Path(a.out), _say, jobs=a.jobs)
    n = len(data.train)
    size = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    print(f"{store.path}: {n} cases, {size / 1e9:.2f} GB ({size / max(1, n) / 1e6:.1f} MB per case), "
          f"checked/built in {time.perf_counter() - t0:.1f} s; train/cv with --cache-dir {a.out} "
          "(cv: --out of which this is OUT/preprocessed) read it")
    return 0


def _cmd_verify(a) -> int:
    """`medseg data verify`: the deep check (CRC-32 of every byte) of every entry of
    the store(s) at --root, which training start skips; exit 1 when one is corrupt."""
    from medseg.data.preprocessed import Store, find_stores, remove_entry, verify_store
    bad = 0
    for store in find_stores(a.root):
        t0 = time.perf_counter()
        problems = verify_store(store, a.jobs)
        n = len(Store(store).case_ids())
        corrupt = [(cid, why) for cid, why in problems if not why.startswith("stale")]
        for cid, why in problems:
            stale = why.startswith("stale")
            fix = ("the next train/cv/`medseg data preprocess` rebuilds it" if stale else
                   "removed: the next train/cv/`medseg data preprocess` rebuilds it" if a.remove_bad else
                   "run again with --remove-bad, then `medseg data preprocess` (or the train/cv command) "
                   "rebuilds it")
            print(f"{'note' if stale else 'error'}: {store / cid}: case {cid}: {why}; {fix}", flush=True)
            if a.remove_bad and not stale:
                remove_entry(store, cid)
        print(f"{store}: {n} entries verified in {time.perf_counter() - t0:.1f} s: {len(corrupt)} corrupt, "
              f"{len(problems) - len(corrupt)} stale", flush=True)
        bad += len(corrupt)
    return 1 if bad and not a.remove_bad else 0


def _cmd_demo(a) -> int:
    from medseg.demo import run_demo
    from medseg.demo import demo_paths
    out, datalist, run = demo_paths(a.task, a.out, a.datalist, a.run)
    return run_demo(out, datalist, None if a.no_cv else run, a.set, print_fn=_say, task=a.task)


def _say(text: str) -> None:
    """Print and flush: progress of long runs must reach a log file as it happens."""
    print(text, flush=True)


def _config(a) -> dict:
    from medseg.config import apply_overrides, bundle_files, load_config, resolve_config
    sets = list(a.set) + ([f"data.task={a.task}"] if getattr(a, "task", None) else [])
    if a.config:
        cfg = apply_overrides(load_config(a.config, a.bundle), sets)
        source = f"{a.config}"
    else:
        cfg = resolve_config(a.preset, sets, a.bundle)
        source = " + ".join(str(f) for f in bundle_files(a.preset, a.bundle))
    _say(f"experiment: {source}" + (f" with {len(a.set)} override(s)" if a.set else ""))
    return cfg


def _cmd_train(a) -> int:
    from medseg.train import train_fold
    cfg = _config(a)
    s = train_fold(cfg, a.datalist, a.data_root, a.fold, a.out, resume=a.resume, device=a.device,
                   cache_dir=a.cache_dir, print_fn=_say)
    best = s["best_dice_mean"]
    print(f"finished fold {a.fold}: {s['epochs']} epochs in {s['seconds'] / 60:.1f} min"
          + (f"; best validation mean Dice {best:.3f}" if best >= 0 else "")
          + f"; checkpoints in {Path(a.out) / 'checkpoints'}")
    return 0


def _cmd_cv(a) -> int:
    from medseg.cv import format_summary, run_cv
    cfg = _config(a)
    out = a.out or f"runs/{Path(a.datalist).stem}_{cfg['preset']}"
    devices = a.devices.split(",") if a.devices else None
    summary = run_cv(cfg, a.datalist, a.data_root, out, a.folds, a.fold, devices, a.device,
                     print_fn=_say, rules=a.rules)
    print(format_summary(summary))
    print(f"results in {out}: cv_summary.json, cv_metrics.csv, fold_*/predictions/")
    return 0


def _cmd_distill(a) -> int:
    from medseg.distill import format_comparison, run_distill, student_config
    args = {}
    for text in a.student_arg:
        if "=" not in text:
            raise MedsegError(f"--student-arg {text!r}: expected KEY=VALUE, e.g. width=1.0")
        k, v = text.split("=", 1)
        try:
            args[k] = json.loads(v)
        except json.JSONDecodeError:
            args[k] = v
    cfg = student_config(a.teacher, a.student, args, a.weight, a.teacher_tta, a.set)
    summary = run_distill(a.teacher, a.out, cfg, a.datalist, a.data_root, a.fold, not a.no_final,
                          a.device, a.rules, print_fn=_say)
    print(format_comparison(summary))
    print(f"results in {a.out}: distill.json, cv_summary.json, fold_*/"
          + (f"; deployable student: {summary['final']}" if summary["final"] else ""))
    return 0


def _crf_params(a):
    """`--crf` / `--crf-params` → `medseg.crf.CRFParams` (said on the terminal), or None."""
    if a.crf_params is not None and not a.crf:
        raise MedsegError("--crf-params sets the dense CRF's parameters: add --crf")
    if not a.crf:
        return None
    from medseg.crf import CRFParams, describe_crf
    params = CRFParams.parse(a.crf_params)
    _say(describe_crf(params))
    return params


def _cmd_predict_raw(a) -> int:
    """`medseg predict --raw`: raw studies → atlas-space cases → masks on the native series."""
    from medseg.data.inputs import accepts_missing
    from medseg.raw.run import manual_study, prepare_studies, raw_studies
    from medseg.raw.study import parse_overrides
    files = {ch: getattr(a, ch) or getattr(a, alias) for ch, alias in
             (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f"))}
    if a.input and any(files.values()):
        raise MedsegError("--raw: give either --input (a folder of studies) or the series (--t1ce …), not both")
    if a.shard:
        raise MedsegError("--raw does not take --shard: split the studies into folders instead")
    studies = (raw_studies(a.input) if a.input else [manual_study(files, a.case_id)] if any(files.values())
               else None)
    if not studies:
        raise MedsegError("nothing to predict: pass --raw --input DIR (one folder per study) or --raw --t1ce …")
    from medseg.predict import open_engine, predict_all, review_threshold
    engine = open_engine(a.model, a.engine, a.device, a.overlap, a.sw_batch_size, False if a.no_amp else None,
                         a.tta or a.uncertainty, a.min_component_ml, a.et_min_ml, provider=a.provider,
                         trt_cache=a.trt_cache, crf=_crf_params(a))
    review = review_threshold(engine, a.review_threshold, _say) if a.uncertainty else None
    missing_ok = ("t1", "t2", "flair") if accepts_missing(engine.meta) else ()
    cases, failed = prepare_studies(studies, a.out, reference=a.reference, overrides=parse_overrides(a.series),
                                    missing_ok=missing_ok, atlas=a.atlas, extractor=a.brain_extractor,
                                    atlas_mm=a.atlas_spacing,
                                    accept_review=a.accept_review, overwrite=a.overwrite, print_fn=_say)
    if cases:
        predict_all(engine, cases, a.out, Path(a.input) if a.input else None, a.convention, a.overwrite,
                    a.probabilities, print_fn=_say, viewer_files=a.viewer_files, uncertainty=a.uncertainty,
                    review_threshold=review,
                    raw={"atlas": a.atlas, "brain_extractor": a.brain_extractor, "reference": a.reference,
                         "atlas_spacing": a.atlas_spacing})
        from medseg.raw.run import write_qc_pictures
        write_qc_pictures(cases, a.out, _say)
    if failed:
        _say(f"{len(failed)} of {len(studies)} studies got no mask (see {Path(a.out) / 'raw_failed.json'}): "
             + ", ".join(failed))
        return 1
    return 0


def _cmd_predict(a) -> int:
    from medseg.data.inputs import cases_from_input, parse_shard, shard_cases, single_case
    if a.raw:
        return _cmd_predict_raw(a)
    if a.series or a.accept_review:
        raise MedsegError("--series and --accept-review belong to raw studies: add --raw")
    shard = parse_shard(a.shard)
    files = {k: getattr(a, k) for k in ("t1", "t1ce", "t2", "flair", "t1n", "t1c", "t2w", "t2f")}
    if a.input and any(files.values()):
        raise MedsegError("give either --input (a folder or datalist) or the four files "
                          "(--t1 --t1ce --t2 --flair), not both")
    if a.input:
        cases, root = cases_from_input(a.input, a.data_root)
    elif any(files.values()):
        cases, root = [single_case(files, a.case_id)], None
    else:
        raise MedsegError("nothing to predict: pass --input DIR|DATALIST or --t1 --t1ce --t2 --flair")
    if shard:
        n_all = len(cases)
        cases = shard_cases(cases, shard)
        _say(f"shard {shard[0]}/{shard[1]}: {len(cases)} of {n_all} cases")
    if a.review_threshold is not None and not a.uncertainty:
        raise MedsegError("--review-threshold flags cases by their uncertainty score: add --uncertainty")
    from medseg.predict import open_engine, predict_all, review_threshold
    engine = open_engine(a.model, a.engine, a.device, a.overlap, a.sw_batch_size, False if a.no_amp else None,
                         a.tta or a.uncertainty, a.min_component_ml, a.et_min_ml, provider=a.provider,
                         trt_cache=a.trt_cache, crf=_crf_params(a))
    review = review_threshold(engine, a.review_threshold, _say) if a.uncertainty else None
    predict_all(engine, cases, a.out, root, a.convention, a.overwrite, a.probabilities, print_fn=_say,
                viewer_files=a.viewer_files, uncertainty=a.uncertainty, review_threshold=review,
                shard=shard)
    return 0


def _cmd_study(a) -> int:
    """`medseg study`: list each study's series and the T1/T1ce/T2/FLAIR chosen (no torch)."""
    from medseg.raw.study import parse_overrides, study_report
    text, ok = study_report(a.dir, parse_overrides(a.series), a.json)
    print(text, flush=True)
    return 0 if ok else 2


def _cmd_evaluate(a) -> int:
    from medseg.evaluate import evaluate_folder, format_table
    summary = evaluate_folder(a.pred, a.ref, a.out, a.convention, a.rules, a.task)
    _say(f"task {summary['task']} ({summary['task_source']}): scored on {', '.join(summary['regions'])}")
    print(format_table(summary["overall"], rules=summary["rules"]))
    print(f"per-case metrics: {Path(a.out) / 'metrics.csv'}; summary: {Path(a.out) / 'summary.json'}")
    return 0


def _cmd_export(a) -> int:
    from medseg.export import export_onnx
    from medseg.predict import default_postprocessing, resolve_checkpoints
    ckpts = resolve_checkpoints(a.model)
    model_dir = Path(a.model[0]) if len(a.model) == 1 and Path(a.model[0]).is_dir() else None
    et_min = a.et_min_ml if a.et_min_ml is not None else default_postprocessing(a.model).get("et_min_ml", 0.0)
    export_onnx(ckpts, a.out, a.opset, model_dir, et_min, a.min_component_ml, precision=a.precision,
                calibration=a.calibration, overlap=a.overlap, print_fn=_say)
    print(f"wrote {a.out}: {len(ckpts)} fold(s) in one graph, opset {a.opset}, {a.precision}")
    return 0


def _cmd_report(a) -> int:
    from medseg.report import make_report
    page = make_report(a.pred, a.images, a.out, a.ref, a.convention, task=a.task)
    print(f"report: {page}")
    return 0


def _experiment_args(c: argparse.ArgumentParser) -> None:
    from medseg.labels import TASKS
    c.add_argument("--datalist", required=True, help="datalist JSON from `medseg data split`")
    c.add_argument("--data-root", required=True, help="folder the datalist paths are relative to")
    c.add_argument("--bundle", help="MONAI bundle folder that defines the experiment "
                   "(default: the brats_unet3d bundle shipped with medseg)")
    c.add_argument("--preset", default="full",
                   help="bundle preset (default: full, the nnU-Net-size GPU recipe: 1 mm, 128³ "
                   "patches, 300 epochs × 250 iterations, about a day per fold on one GPU); cpu: "
                   "a small model at 2.5 mm that trains in minutes on a laptop")
    c.add_argument("--config", help="a config.json written by an earlier run (instead of --preset)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=50 (repeatable)")
    c.add_argument("--task", choices=list(TASKS),
                   help="BraTS task (default: the datalist's, detected from its labels and case ids; "
                   "the same as --set data.task=NAME)")
    c.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def _rules_arg(c: argparse.ArgumentParser) -> None:
    from medseg.scoring import DEFAULT_RULES, RULE_SETS
    c.add_argument("--rules", choices=list(RULE_SETS), default=None,
                   help=f"scoring rule set (default: the task's: {DEFAULT_RULES} for gli2021/gli2023, "
                   "brats-eval for gli2024/ped2024, brats23-men/-met/-ssa for men2023/met2023/ssa2023); "
                   "brats23[-ssa|-ped|-men|-met]: "
                   "BraTS 2023/2024 lesion-wise; brats-eval: the official BraTS-evaluation "
                   "package (README: 'Scoring rules')")


#: What each command is for, and examples, shown by `medseg COMMAND --help`.
_ABOUT = {
    "": ("medseg: 3D brain-tumour segmentation of multi-modal MRI (BraTS T1, T1ce, T2, FLAIR) "
         "with MONAI. Check a dataset, split it, cross-validate a 3D U-Net, predict masks on "
         "each scan's own grid, evaluate, export to ONNX.",
         "typical session:\n"
         "  medseg data check --root /data/BraTS2021\n"
         "  medseg data split --root /data/BraTS2021 --folds 5 --out data_lists/brats2021.json\n"
         "  medseg cv --folds 5 --datalist data_lists/brats2021.json --data-root /data/BraTS2021\n"
         "  medseg predict --model runs/brats2021_full --input /data/new_cases --out masks/\n"
         "try it without data: medseg demo (synthetic BraTS-like cases, cpu preset)"),
    "data": ("Dataset tools: index, check, split, or synthesize a dataset.",
             "examples:\n  medseg data check --root /data/BraTS2021\n"
             "  medseg data split --root /data/BraTS2021 --folds 5 --out data_lists/brats2021.json"),
    "data synth": ("Write a synthetic BraTS-like dataset (brains with gliomas, in any layout).",
                   "examples:\n  medseg data synth --cases 10 --out /tmp/synth --preview /tmp/synth.png\n"
                   "  medseg data synth --cases 2 --layout msd --shape 240 240 155 --out /tmp/full"),
    "data index": ("List the cases under a data root: layout, label convention, counts.",
                   "example:\n  medseg data index --root /data/BraTS2021 --json"),
    "data check": ("Check every file of every case (readable, 4 modalities, one grid, label "
                   "values); nothing is written. Exit 1 when there are errors.",
                   "example:\n  medseg data check --root /data/BraTS2021 --verbose"),
    "data preprocess": ("Orient, resample, brain-crop and z-score every case of a datalist once, into "
                        "a compact memory-mapped dataset (float16 images, uint8 labels, tumour "
                        "locations) keyed by the preprocessing settings. Every fold, `cv --devices` "
                        "process and DDP rank reads the same files. Parallel, resumable, atomic per "
                        "case; corrupt or stale entries are rebuilt. `train`/`cv` run it when needed.",
                        "examples:\n"
                        "  medseg data preprocess --datalist data_lists/brats2021.json --data-root "
                        "/data/BraTS2021 --out runs/brats2021_full/preprocessed\n"
                        "  medseg data preprocess ... --preset cpu --out /scratch/medseg  "
                        "# then: medseg train ... --cache-dir /scratch/medseg"),
    "data verify": ("Read every byte of every entry of the preprocessed dataset(s) at --root and "
                    "compare it with the CRC-32 written with it (training start only checks sizes, "
                    "shapes and source files). Exit 1 when an entry is corrupt; stale entries (source "
                    "files changed) are listed, and rebuilt by the next train/cv/preprocess.",
                    "examples:\n  medseg data verify --root runs/brats2021_full          # a cv --out folder\n"
                    "  medseg data verify --root /scratch/medseg --remove-bad   # a --cache-dir folder"),
    "data split": ("Write a seeded, patient-grouped K-fold datalist (MONAI Decathlon format).",
                   "example:\n  medseg data split --root /data/BraTS2021 --folds 5 --seed 0 "
                   "--out data_lists/brats2021.json"),
    "train": ("Train one fold (or, without --fold, every case). Resumable; under torchrun, "
              "distributed.",
              "examples:\n  medseg train --datalist data_lists/brats2021.json --data-root /data/BraTS2021 "
              "--fold 0 --out runs/exp/fold_0\n"
              "  torchrun --nproc_per_node 4 -m medseg train ... --fold 0 --out runs/ddp"),
    "cv": ("K-fold cross-validation: train every fold, predict its held-out cases on their own "
           "grids, evaluate, summarise. Re-running continues where it stopped.",
           "examples:\n  medseg cv --folds 5 --datalist data_lists/brats2021.json --data-root "
           "/data/BraTS2021 --out runs/brats2021_full\n"
           "  medseg cv ... --preset cpu --fold 0              # one fold of the CPU recipe\n"
           "  medseg cv ... --devices cuda:0,cuda:1            # folds in parallel"),
    "distill": ("Knowledge distillation: a light student network per fold learns from a finished "
                "cross-validation (the teacher) on the teacher's split: student fold k trains on fold k's "
                "training cases against a blend of their labels and teacher fold k's probabilities (computed "
                "once, stored), and is scored on fold k's held-out cases. Then a final student learns every "
                "case from the whole teacher ensemble. Outputs as `medseg cv`, plus distill.json.",
                "examples:\n  medseg distill --teacher runs/brats2021_full --out runs/brats2021_student\n"
                "  medseg distill --teacher runs/demo_cpu --out runs/demo_student --student thin_unet3d\n"
                "  medseg export --model runs/brats2021_student/final --out student_int8.onnx --precision int8 "
                "--calibration /data/BraTS2021"),
    "predict": ("Masks (uint8 NIfTI, on each input's exact grid, in the input's label convention) "
                "from 1..K checkpoints or an exported ONNX file.",
                "examples:\n  medseg predict --model runs/brats2021_full --input /data/new_cases --out masks/\n"
                "  medseg predict --model runs/exp/fold_0 --t1 a_t1.nii.gz --t1ce a_t1ce.nii.gz "
                "--t2 a_t2.nii.gz --flair a_flair.nii.gz --out masks/\n"
                "  medseg predict --engine onnx --model model.onnx --input /data/new_cases --out masks/\n"
                "  medseg predict --model runs/exp --input /dicom/cases --out masks/   # CASE/{t1,t1ce,t2,flair}/ "
                "DICOM series → + <case>_seg.dcm (DICOM Segmentation)\n"
                "  medseg predict --model runs/exp --t1 dcm/t1 --t1ce dcm/t1ce --t2 dcm/t2 --flair dcm/flair "
                "--out masks/\n"
                "  medseg predict ... --viewer-files   # + <case>.seg.nrrd (3D Slicer), <case>.itksnap.txt\n"
                "  medseg predict ... --uncertainty    # + <case>_uncertainty.nii.gz; scores, review flags "
                "in predictions.json\n"
                "every run also writes OUT/volumes.csv (mL per label and region, lesion counts, "
                "largest lesion's size in mm) and records it per case in OUT/predictions.json;\n"
                "an interrupted batch continues when run again with the same settings"),
    "study": ("List the series of raw scanner MRI studies (DICOM files in any folders, or NIfTI + "
              "dcm2niix JSON sidecars) and which are the T1, T1ce, T2 and FLAIR, with the scored "
              "reasons and the runner-up of each choice. DIR is one study when it holds image files "
              "directly or all its DICOM files share one StudyInstanceUID; otherwise each subfolder is "
              "a study. Exit 2 when a study cannot be identified (ambiguous, missing series, …).",
              "examples:\n  medseg study /dicom/patient01\n"
              "  medseg study /dicom/studies --json > series.json\n"
              "  medseg study /dicom/patient01 --series t1ce=12 --series flair=7   # force choices\n"
              "  medseg study /dicom/studies --series patient01:t2=1.2.840.1234   # one study only"),
    "evaluate": ("Dice, HD95, Hausdorff, sensitivity, specificity and volumes per case and region.",
                 "example:\n  medseg evaluate --pred masks/ --ref /data/BraTS2021 --out eval/"),
    "export": ("Checkpoints → one verified ONNX file that describes itself (fold ensemble in one "
               "graph).",
               "examples:\n  medseg export --model runs/brats2021_full --out brats.onnx\n"
               "  medseg export --model runs/exp/fold_0 --out m_int8.onnx --precision int8 "
               "--calibration /data/BraTS2021"),
    "report": ("Quality-control pictures (PNG per case, one colour table with a legend) and an "
               "HTML page with volumes and metrics.",
               "example:\n  medseg report --pred masks/ --images /data/new_cases --ref /data/new_cases "
               "--out report/"),
    "demo": ("The README demo: synthetic BraTS 2023-layout data → check → split → 5-fold cv with "
             "the cpu preset (about 20 minutes on 2 CPU cores).",
             "example:\n  medseg demo --no-cv        # stop after the split"),
}


def _describe(parser: argparse.ArgumentParser, key: str) -> None:
    import textwrap
    text, parser.epilog = _ABOUT[key]
    parser.description = textwrap.fill(text, 78)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    # Choices come from their definitions where those are light to import (labels):
    # the layouts' module reads NIfTI, so their names are listed once here (a test
    # holds them equal to medseg.data.discover.LAYOUTS).
    from medseg.labels import CONVENTIONS, TASKS
    p = argparse.ArgumentParser(prog="medseg")
    p.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="index, check, split or synthesize a dataset")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    s = dsub.add_parser("synth", help="write a synthetic BraTS-like dataset")
    s.add_argument("--cases", type=int, required=True, help="number of labelled cases")
    s.add_argument("--out", required=True, help="new (or empty) output folder")
    s.add_argument("--layout", choices=list(LAYOUT_NAMES), default="brats2023")
    s.add_argument("--task", choices=list(TASKS), default="gli2023",
                   help="pathology and labels: gli2021/gli2023 glioma (default), gli2024 post-treatment "
                   "(resection cavity, brats2024 labels), ped2024 paediatric (cysts, brats2024-ped "
                   "labels), men2023 meningioma, met2023 metastases, ssa2023")
    s.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                   help="grid over a 240x240x155 mm field of view (240 240 155 = BraTS 1 mm)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-cases", type=int, default=0, help="extra cases without labels")
    s.add_argument("--uniform-geometry", action="store_true",
                   help="all cases RAS and isotropic (default: some LPS/PIR or thick-slice cases)")
    s.add_argument("--preview", help="write a PNG montage of the first cases")
    s.set_defaults(func=_cmd_synth)

    for name, func, help_ in (("index", _cmd_index, "list the cases under a data root"),
                              ("check", _cmd_check, "validate every case; exit 1 on errors"),
                              ("split", _cmd_split, "write a K-fold datalist")):
        c = dsub.add_parser(name, help=help_)
        c.add_argument("--root", required=True, help="data root (BraTS 2021, BraTS 2023+ or MSD Task01)")
        c.add_argument("--convention", choices=list(CONVENTIONS),
                       help="label convention (default: detected from file names and label values)")
        c.add_argument("--jobs", type=int, default=None, help="reader threads (default: CPU count)")
        if name in ("index", "split"):
            c.add_argument("--task", choices=list(TASKS),
                           help="BraTS task (default: detected from the labels and the cohorts the case "
                           "ids name)" + ("; recorded in the datalist" if name == "split" else ""))
        c.set_defaults(func=func)
        if name == "index":
            c.add_argument("--json", action="store_true", help="print the case list as JSON")
        if name == "check":
            c.add_argument("--affine-tol", type=float, default=None,
                           help="largest affine difference between a case's files (default 1e-3)")
            c.add_argument("--verbose", "-v", action="store_true", help="list every warning")
        if name == "split":
            c.add_argument("--folds", type=int, default=5, help="number of folds, at least 2 (default 5)")
            c.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
            c.add_argument("--out", required=True, help="datalist JSON, e.g. data_lists/NAME.json")
            c.add_argument("--name", default="", help="datalist name (default: file name)")
            c.add_argument("--overwrite", action="store_true", help="replace a different existing datalist")

    pp = dsub.add_parser("preprocess", help="build (or repair) the preprocessed dataset train/cv read")
    _experiment_args(pp)
    pp.add_argument("--out", required=True,
                    help="folder of preprocessed datasets: cv's OUT/preprocessed, or train's --cache-dir")
    pp.add_argument("--jobs", type=int, default=None, help="processes (default: CPU count, at most 8)")
    pp.set_defaults(func=_cmd_preprocess)
    _describe(pp, "data preprocess")

    vf = dsub.add_parser("verify", help="CRC-check every entry of a preprocessed dataset; exit 1 on corruption")
    vf.add_argument("--root", required=True, help="a store (pp_*), a folder of stores (preprocess --out, "
                    "train --cache-dir, cv's OUT/preprocessed) or a cv --out folder")
    vf.add_argument("--jobs", type=int, default=None, help="reader threads (default: CPU count, at most 8)")
    vf.add_argument("--remove-bad", action="store_true",
                    help="delete corrupt entries, so the next preprocess/train/cv rebuilds them")
    vf.set_defaults(func=_cmd_verify)

    t = sub.add_parser("train", help="train one fold (resumable; torchrun for several processes)")
    _experiment_args(t)
    t.add_argument("--fold", type=int, help="validation fold (default: train on all cases)")
    t.add_argument("--out", required=True, help="run folder, e.g. runs/exp/fold_0")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    t.add_argument("--cache-dir", help="folder of the preprocessed datasets (data.cache=preprocessed; default: "
                   "preprocessed/ beside OUT, shared by runs with the same preprocessing) or of the "
                   "data.cache=disk cache (default: OUT/cache)")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("cv", help="K-fold cross-validation: train, predict held-out cases, evaluate")
    _experiment_args(c)
    c.add_argument("--folds", type=int, help="number of folds (must match the datalist)")
    c.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable)")
    c.add_argument("--out", help="experiment folder (default: runs/<datalist>_<preset>)")
    c.add_argument("--devices", help="comma-separated devices to train folds in parallel, "
                   "e.g. cuda:0,cuda:1")
    _rules_arg(c)
    c.set_defaults(func=_cmd_cv)

    di = sub.add_parser("distill", help="train a light student per fold on a cv teacher's outputs")
    di.add_argument("--teacher", required=True, metavar="RUN", help="the --out folder of a finished `medseg cv`")
    di.add_argument("--out", required=True, metavar="RUN_STUDENT", help="the student's experiment folder")
    di.add_argument("--student", default="mobilenet_unet3d",
                    help="registry network of the student (default: mobilenet_unet3d)")
    di.add_argument("--student-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="an argument of the student network (repeatable)")
    di.add_argument("--weight", type=float, default=0.5,
                    help="the teacher's share of each voxel's target (default 0.5: half labels, half teacher)")
    di.add_argument("--teacher-tta", action="store_true", help="the teacher predicts with mirror TTA")
    di.add_argument("--datalist", help="default: the teacher's")
    di.add_argument("--data-root", help="default: the teacher's")
    di.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the student's config (the teacher's recipe), e.g. "
                    "--set train.epochs=60")
    di.add_argument("--fold", type=int, action="append", help="run only this fold (repeatable)")
    di.add_argument("--no-final", action="store_true", help="skip the final student trained on every case")
    di.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    _rules_arg(di)
    di.set_defaults(func=_cmd_distill)

    pr = sub.add_parser("predict", help="masks on each input's own grid from 1..K checkpoints")
    pr.add_argument("--model", nargs="+", required=True, metavar="RUN_OR_CHECKPOINT",
                    help="cv folder (fold ensemble), train folder, or .pt files")
    pr.add_argument("--input", help="data folder (any supported layout), datalist JSON, or DICOM folder "
                    "(a case with t1/ t1ce/ t2/ flair/ series folders, or a folder of such cases)")
    pr.add_argument("--data-root", help="with a datalist --input: the folder its paths are relative to")
    for ch, alias in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f")):
        pr.add_argument(f"--{ch}", help=f"single case: the {ch.upper()} file or DICOM series folder")
        pr.add_argument(f"--{alias}", help=argparse.SUPPRESS)
    pr.add_argument("--case-id", help="single case: output name (default: from the T1 file name; DICOM: "
                    "the folder holding the series folders)")
    pr.add_argument("--out", required=True, help="output folder (never inside the input folder)")
    pr.add_argument("--convention", choices=list(CONVENTIONS),
                    help="label values of the masks (default: the input's own: detected from its "
                    "layout or file names, or recorded in its datalist)")
    pr.add_argument("--overlap", type=float, help="sliding-window overlap (default: the checkpoint's)")
    pr.add_argument("--sw-batch-size", type=int, help="windows per forward pass")
    pr.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 flips)")
    pr.add_argument("--no-amp", action="store_true", help="fp32 inference (default: bf16 autocast)")
    pr.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    pr.add_argument("--min-component-ml", type=float,
                    help="remove connected components smaller than this (mL) from each region "
                    "(default: 0; with --engine onnx, the value in the model's metadata)")
    pr.add_argument("--et-min-ml", type=float,
                    help="a predicted ET smaller than this (mL) becomes necrosis (default: the value "
                    "`medseg cv` chose, when --model is a cv folder; with --engine onnx, the value "
                    "in the model's metadata; else 0)")
    pr.add_argument("--crf", action="store_true",
                    help="refine the probabilities with a 3D dense CRF over the four modalities (on the "
                    "model grid, before the threshold): boundaries move to the image's edges. Needs "
                    "pip install 'medseg[crf]'; its parameters are recorded in predictions.json")
    pr.add_argument("--crf-params", metavar="KEY=VALUE,...",
                    help="with --crf: parameters other than the defaults, e.g. "
                    "bilateral_weight=4,iterations=10 (keys: bilateral_weight, bilateral_sigma_mm, "
                    "bilateral_sigma_z, gaussian_weight, gaussian_sigma_mm, iterations, label_model "
                    "regions|classes, box_probability, margin_mm)")
    pr.add_argument("--probabilities", action="store_true",
                    help="also write OUT/probabilities/<case_id>.nii.gz: TC/WT/ET float maps (X, Y, Z, 3)")
    pr.add_argument("--viewer-files", action="store_true",
                    help="also write beside each mask <case_id>.seg.nrrd (3D Slicer segmentation) and "
                    "<case_id>.itksnap.txt (ITK-SNAP label descriptions): label names and the "
                    "report's colours")
    pr.add_argument("--uncertainty", action="store_true",
                    help="also write beside each mask <case_id>_uncertainty.nii.gz: per-voxel uncertainty "
                    "of TC/WT/ET (X, Y, Z, 3 float32: standard deviation of the probabilities of the "
                    "members, every model × 8 mirror flips, so it turns on --tta), and per case and lesion "
                    "scores and a review flag in predictions.json (README: Uncertainty)")
    pr.add_argument("--review-threshold", type=float,
                    help="with --uncertainty: flag a case for review when its score is at least this "
                    "(default: the threshold chosen on cross-validation, uncertainty.json of the cv "
                    "folder or the ONNX metadata; none: no flags)")
    pr.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                    help="onnx: run an exported .onnx with onnxruntime only (no torch, no MONAI)")
    pr.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], default="auto",
                    help="with --engine onnx: the onnxruntime execution provider (auto: CUDA when "
                    "onnxruntime-gpu and a GPU are present, else the CPU; tensorrt: fp16 TensorRT, the "
                    "engine built on the first run and cached, see --trt-cache)")
    pr.add_argument("--trt-cache", metavar="DIR",
                    help="with --provider tensorrt: where built engines are kept (default "
                    "$MEDSEG_TRT_CACHE or ~/.cache/medseg/tensorrt), one folder per model file")
    pr.add_argument("--overwrite", action="store_true", help="replace existing masks in --out")
    pr.add_argument("--shard", metavar="K/N",
                    help="predict only shard K of N of the batch (cases in id order, every N-th from "
                         "the K-th): N jobs with the same --out split a large batch, each resumable; "
                         "a final run without --shard writes predictions.json and volumes.csv")
    raw = pr.add_argument_group("raw scanner studies (--raw; README: Raw studies)")
    raw.add_argument("--raw", action="store_true",
                     help="--input holds raw studies (one folder per study: the scanner's DICOM files in "
                          "any nesting, or NIfTI + JSON sidecars), or --t1ce … name series on their own "
                          "grids: identify, N4, co-register, skull-strip, register to the atlas, predict, "
                          "and map the mask back onto the reference series' native grid")
    raw.add_argument("--series", action="append", default=[], metavar="[CASE:]ROLE=ID",
                     help="force a series choice: ROLE t1|t1ce|t2|flair, ID a SeriesNumber, "
                          "SeriesInstanceUID or NIfTI file name (repeatable)")
    raw.add_argument("--reference", default="t1ce", choices=["t1ce", "flair", "t1", "t2"],
                     help="the native series whose grid the mask is written on (default t1ce)")
    raw.add_argument("--atlas", default="mni152",
                     help="atlas: mni152 (ICBM 2009c, shipped by nilearn) or a skull-stripped T1 atlas "
                          "NIfTI file (e.g. SRI24 for models trained on BraTS <= 2023 data)")
    raw.add_argument("--atlas-spacing", type=float, metavar="MM",
                     help="atlas-space voxel size in mm (default: the atlas's, 1 mm; coarser is faster)")
    raw.add_argument("--brain-extractor", default="builtin", choices=["builtin", "hd-bet", "synthstrip"],
                     help="builtin (no download, no GPU), or HD-BET / SynthStrip when installed")
    raw.add_argument("--accept-review", action="store_true",
                     help="write masks of studies whose registration or brain mask QC flags as "
                          "implausible (recorded as review: true) instead of refusing them")
    pr.set_defaults(func=_cmd_predict)

    st = sub.add_parser("study", help="identify the T1/T1ce/T2/FLAIR series of raw scanner studies")
    st.add_argument("dir", metavar="DIR", help="a study folder, or a folder of study folders")
    st.add_argument("--series", action="append", default=[], metavar="[CASE:]ROLE=ID",
                    help="force a choice: ROLE t1, t1ce, t2 or flair, ID a SeriesNumber or SeriesInstanceUID "
                    "(NIfTI: the file name); CASE: only for that study (repeatable)")
    st.add_argument("--json", action="store_true", help="print the series and choices as JSON")
    st.set_defaults(func=_cmd_study)

    ev = sub.add_parser("evaluate", help="Dice, HD95, … per case and region against references")
    ev.add_argument("--pred", required=True, help="folder of <case_id>.nii.gz masks")
    ev.add_argument("--ref", required=True, help="data root with labels, or a folder of <case_id>.nii.gz")
    ev.add_argument("--out", required=True, help="folder for metrics.csv and summary.json")
    ev.add_argument("--convention", choices=list(CONVENTIONS),
                    help="label convention of both (default: detected from the reference data root)")
    ev.add_argument("--task", choices=list(TASKS),
                    help="BraTS task whose regions are scored (default: the model's, from --pred's "
                    "predictions.json, else detected from the references)")
    _rules_arg(ev)
    ev.set_defaults(func=_cmd_evaluate)

    ex = sub.add_parser("export", help="checkpoints → one verified, self-describing ONNX file")
    ex.add_argument("--model", nargs="+", required=True, metavar="RUN_OR_CHECKPOINT",
                    help="cv folder (all folds in one graph), train folder, or .pt files")
    ex.add_argument("--out", required=True, help="output .onnx file")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                    help="fp16: half weights/compute; int8: static quantization (calibrated)")
    ex.add_argument("--calibration", help="int8: data folder (e.g. the training data) whose cases "
                    "calibrate the quantization (default: synthetic brain patches)")
    ex.add_argument("--et-min-ml", type=float, help="post-processing stored in the metadata "
                    "(default: the value `medseg cv` chose)")
    ex.add_argument("--min-component-ml", type=float, default=0.0,
                    help="post-processing stored in the metadata: components smaller than this "
                    "(mL) are removed from each region (default: 0)")
    ex.add_argument("--overlap", type=float,
                    help="sliding-window overlap stored in the model's spec (default: the value chosen by "
                    "benchmarks/student_inference.py when the model folder holds inference_choice.json, "
                    "else the checkpoint's)")
    ex.set_defaults(func=_cmd_export)

    rp = sub.add_parser("report", help="PNG overlays and an HTML page for quality control")
    rp.add_argument("--pred", required=True, help="folder of <case_id>.nii.gz masks")
    rp.add_argument("--images", required=True, help="the data folder the masks were predicted from")
    rp.add_argument("--ref", help="optional: data root with labels, or folder of reference masks")
    rp.add_argument("--out", required=True, help="folder for index.html and the PNGs")
    rp.add_argument("--convention", choices=list(CONVENTIONS))
    rp.add_argument("--task", choices=list(TASKS),
                    help="BraTS task (default: the model's, from --pred's predictions.json)")
    rp.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo", help="synthetic data → check → split → 5-fold CV (cpu preset)")
    d.add_argument("--task", choices=list(TASKS), default="gli2023",
                   help="BraTS task of the synthetic cases (default gli2023: adult glioma; gli2024: "
                   "post-treatment with resection cavities; ped2024, men2023, met2023, ssa2023, gli2021)")
    d.add_argument("--out", help="synthetic data folder (default demo_data/brats2023; other tasks "
                   "demo_data/<task>)")
    d.add_argument("--datalist", help="default data_lists/demo_brats2023.json (other tasks "
                   "data_lists/demo_<task>.json)")
    d.add_argument("--run", help="cross-validation folder (default runs/demo_cpu; other tasks "
                   "runs/demo_<task>_cpu)")
    d.add_argument("--no-cv", action="store_true", help="stop after the split")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a cpu-preset value, e.g. --set train.epochs=10")
    d.set_defaults(func=_cmd_demo)
    _describe(p, "")
    for name, parser in sub.choices.items():
        _describe(parser, name)
    for name, parser in dsub.choices.items():
        _describe(parser, f"data {name}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MedsegError as exc:
        print(f"medseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130
