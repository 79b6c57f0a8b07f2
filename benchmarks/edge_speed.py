"""Edge speed end to end on one BraTS-size case: four NIfTI files → mask file.

The full-preset fold ensemble, the demo teacher and the distilled student (torch
fp32, ONNX fp32, ONNX INT8) in one run, each arm in its own process.

    make demo && medseg distill ...              # runs/distill/{teacher,student_kd}
    python benchmarks/edge_speed.py [--teacher RUN] [--student RUN_OR_CKPT] [--arms ...]
                                    [--threads 2] [--json runs/edge_speed.json] [--keep DIR]

The case is one synthetic BraTS-size case (4 × 240 × 240 × 155, 1 mm, RAS,
brats2023 labels, `_common.brats_size_cases`), written once per run. Arms:

- **full_ensemble**: `--full-folds` (5) full-preset `unet3d` checkpoints (1 mm,
  128³ windows), torch engine, no TTA. No full-preset weights are trained on a
  CPU machine: this script writes *untrained* checkpoints (seeded initialisation)
  in medseg's real checkpoint format (`model`, `meta` from
  `medseg.train._checkpoint_meta`, `config`, `epoch`), so the timing is real and
  the masks are meaningless (their agreement columns say n/a).
- **full_ensemble_tta**: the same with mirror TTA (8 flips per model). Not in
  the default `--arms`: on 2 CPU cores it takes hours.
- **full_single**: one of those checkpoints.
- **teacher**: `--teacher`, a `medseg cv` folder (its trained fold ensemble, the
  cv's post-processing), torch engine, no TTA: the reference every mask
  agreement is measured against.
- **student_torch**: `--student` (a train folder or checkpoint: the distilled
  student), torch engine, fp32 (autocast off).
- **student_onnx_fp32**, **student_onnx_int8**: the student exported by this
  script before the arms run (`medseg.export.export_onnx`, as `medseg export`
  does; INT8 calibrated on `--calibration`; export seconds reported apart, not
  part of the arm), run by the torch-free ONNX engine (`medseg.edge`,
  onnxruntime CPU provider, `--threads` intra-op threads) in a process where
  importing torch, MONAI or torchvision fails; the arm records that.

A missing teacher or student skips its arms with the reason printed; the
full-preset arms still run. Each arm runs in a fresh interpreter
(`_common.run_arm`) with `--threads` threads (torch.set_num_threads; onnxruntime
intra-op threads; OMP_NUM_THREADS for the children). Per arm: **load s** (engine
construction: checkpoints read and networks built, or the ONNX session),
**predict s** (wall clock from the start of reading the four NIfTI files to the
mask file written: `Engine.predict_case`, one cold call, as `medseg predict` runs
a case), **peak RSS** (the arm process's VmHWM), and per region (TC, WT, ET) the
Dice of its mask against the teacher arm's mask, and the mean Dice against the
synthetic ground truth. Then each arm's speed-up over `full_ensemble` and
`teacher`, and the INT8 student's speed-up over the full fold ensemble. The
table (markdown) is printed and saved next to `--json` (same name, ``.md``).

The issue this serves asks the INT8 student for ≤ 10 s end to end, ≥ 20× the
speed of the 5-fold full ensemble measured in the same run, and ≤ 1.5 GB peak
RSS, on 2 CPU cores. Nothing is asserted here: it measures.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, brats_size_cases, peak_rss_mb, run_arm  # noqa: E402  (benchmarks/ is the script's folder)

ARMS = ("full_ensemble", "full_ensemble_tta", "full_single", "teacher", "student_torch",
        "student_onnx_fp32", "student_onnx_int8")
#: Every arm but the full ensemble with mirror TTA (hours on 2 cores).
DEFAULT_ARMS = tuple(a for a in ARMS if a != "full_ensemble_tta")
FULL_ARMS = ("full_ensemble", "full_ensemble_tta", "full_single")
STUDENT_ARMS = ("student_torch", "student_onnx_fp32", "student_onnx_int8")
ONNX_ARMS = {"student_onnx_fp32": "fp32", "student_onnx_int8": "int8"}
#: What the ONNX arms must run without.
BLOCKED = ("torch", "monai", "torchvision")
REGIONS = ("TC", "WT", "ET")          # medseg.labels.REGIONS (not imported: the ONNX arm stays light)
UNTRAINED = "n/a (untrained weights)"


# ----------------------------------------------------------------------------- one arm (child)
class _Block(importlib.abc.MetaPathFinder):
    """Makes every import of torch, MONAI or torchvision (and their submodules) fail."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name}: blocked in the ONNX arm of benchmarks/edge_speed.py")
        return None


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def _arm(spec: dict) -> dict:
    """Run one arm in this process: build its engine, predict the case once, write its mask."""
    threads = int(spec["threads"])
    t = time.perf_counter()
    if spec["engine"] == "onnx":
        sys.meta_path.insert(0, _Block())          # before anything imports medseg
        import onnxruntime
        importlib.import_module("onnx")         # EdgePredictor imports it: an import, not load time

        from medseg.edge import EdgePredictor
        import_s = time.perf_counter() - t
        t = time.perf_counter()
        engine = EdgePredictor(spec["model"][0], threads=threads, provider="cpu")
        load_s = time.perf_counter() - t
        precision = str(engine.meta.get("precision", "fp32"))
        extra = {"provider": engine.provider, "onnxruntime": onnxruntime.__version__,
                 "intra_op_threads": threads}
    else:
        import torch
        torch.set_num_threads(threads)
        from medseg.infer import cpu_bf16_native
        from medseg.predict import open_engine
        import_s = time.perf_counter() - t
        t = time.perf_counter()
        engine = open_engine(spec["model"], engine="torch", device="cpu", amp=spec.get("amp"),
                             mirror=bool(spec["mirror"]))
        load_s = time.perf_counter() - t
        precision = "bf16" if engine.amp and cpu_bf16_native() else "fp32"
        extra = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    engine.predict_case(spec["images"], spec["mask"], spec["convention"], spec["channels"])
    predict_s = time.perf_counter() - t
    if not Path(spec["mask"]).is_file():
        raise SystemExit(f"{spec['arm']}: no mask written at {spec['mask']}")
    if spec["engine"] == "onnx":
        extra["torch_importable"] = _importable("torch")
        extra["monai_importable"] = _importable("monai")
        extra["torch_or_monai_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    return {"arm": spec["arm"], "engine": engine.engine, "precision": precision,
            "network": engine.meta["network"]["name"], "models": engine.n_models,
            "flips": engine.members() // engine.n_models, "members": engine.members(),
            "roi": list(engine.spec.roi), "spacing": list(engine.spec.spacing),
            "postprocessing": engine.postprocessing(), "import_s": import_s, "load_s": load_s,
            "predict_s": predict_s, "peak_rss_mb": peak_rss_mb(), "threads": threads, **extra}


# ----------------------------------------------------------------------------- models (parent)
def write_untrained(cfg: dict, path: Path, fold: int, convention: str = "brats2023") -> Path:
    """An untrained checkpoint of `cfg`'s network (seeded from the config's seed and
    `fold`) in the format `medseg train` writes to final.pt: {model (no
    deep-supervision heads), meta (`medseg.train._checkpoint_meta`), config, epoch}."""
    from types import SimpleNamespace

    import torch

    from medseg.train import _checkpoint_meta, build_network
    torch.manual_seed(int(cfg["seed"]) * 1000 + fold)
    net = build_network(cfg, training=False)
    run = SimpleNamespace(cfg=cfg, run_cfg=cfg,
                          data=SimpleNamespace(convention=convention,
                                               datalist="(untrained: benchmarks/edge_speed.py)"))
    meta = _checkpoint_meta(run, fold)
    meta["loss"] = dict(cfg["train"]["loss"], class_weights_applied=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "meta": meta, "config": cfg, "epoch": 0}, path)
    return path


def _models(args, arms: list[str], work: Path, convention: str, skipped: dict) -> tuple[dict, dict]:
    """→ ({arm: (checkpoint or ONNX paths, extra spec)}, what was made: {name: record});
    arms that cannot run go into `skipped` with the reason."""
    from medseg.errors import MedsegError
    from medseg.predict import default_postprocessing, resolve_checkpoints
    plan, made = {}, {}
    if any(a in FULL_ARMS for a in arms):
        from medseg.config import resolve_config
        cfg = resolve_config("full", args.full_set)
        t = time.perf_counter()
        ckpts = [write_untrained(cfg, work / "full" / f"fold_{k}" / "checkpoints" / "final.pt", k, convention)
                 for k in range(args.full_folds)]
        made["full"] = {"checkpoints": [str(c) for c in ckpts], "network": cfg["model"],
                        "spacing": cfg["data"]["spacing"], "roi": cfg["train"]["patch"],
                        "overrides": list(args.full_set), "write_s": time.perf_counter() - t,
                        "weights": "untrained (seeded initialisation)"}
        for arm in FULL_ARMS:
            if arm in arms:
                plan[arm] = ([str(c) for c in (ckpts[:1] if arm == "full_single" else ckpts)],
                             {"engine": "torch", "mirror": arm == "full_ensemble_tta", "amp": None})
    if "teacher" in arms:
        try:
            found = resolve_checkpoints([args.teacher])
            if not Path(args.teacher).is_dir():
                raise MedsegError(f"{args.teacher}: expected a `medseg cv` folder")
            made["teacher"] = {"run": str(args.teacher), "folds": len(found),
                               "finished": (Path(args.teacher) / "cv_summary.json").is_file(),
                               "postprocessing": default_postprocessing([args.teacher])}
            if not made["teacher"]["finished"]:
                print(f"note: {args.teacher} has no cv_summary.json (cv not finished?): using the "
                      f"{len(found)} fold(s) found")
            plan["teacher"] = ([str(args.teacher)], {"engine": "torch", "mirror": False, "amp": None})
        except MedsegError as exc:
            skipped["teacher"] = f"teacher {args.teacher} not usable: {exc}"
    wanted = [a for a in STUDENT_ARMS if a in arms]
    if wanted:
        try:
            ckpts = resolve_checkpoints([args.student])
        except MedsegError as exc:
            for a in wanted:
                skipped[a] = f"student {args.student} not usable: {exc}"
            return plan, made
        made["student"] = {"run": str(args.student), "checkpoints": [str(c) for c in ckpts]}
        if "student_torch" in wanted:
            plan["student_torch"] = ([str(args.student)], {"engine": "torch", "mirror": False, "amp": False})
        from medseg.export import export_onnx
        model_dir = Path(args.student) if Path(args.student).is_dir() else None
        et_min = default_postprocessing([args.student]).get("et_min_ml", 0.0)
        calib = args.calibration if Path(args.calibration).is_dir() else None
        if "student_onnx_int8" in wanted and calib is None:
            print(f"note: --calibration {args.calibration} not found: INT8 calibrated on synthetic brain patches")
        for arm in (a for a in wanted if a in ONNX_ARMS):
            prec = ONNX_ARMS[arm]
            out = work / "onnx" / f"student_{prec}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            level = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)     # onnxruntime.quantization's per-tensor warnings
            try:
                report = export_onnx(ckpts, out, model_dir=model_dir, et_min_ml=et_min, min_component_ml=0.0,
                                     precision=prec, calibration=calib if prec == "int8" else None,
                                     print_fn=lambda s: print("export:", s, flush=True))
            except MedsegError as exc:
                skipped[arm] = f"{prec} export failed: {exc}"
                continue
            finally:
                logging.getLogger().setLevel(level)
            made[f"export_{prec}"] = {"file": str(out), "seconds": time.perf_counter() - t,
                                      "bytes": out.stat().st_size, "verification": report,
                                      "calibration": (str(calib) if calib else "synthetic brain patches")
                                      if prec == "int8" else None}
            plan[arm] = ([str(out)], {"engine": "onnx", "mirror": False})
    return plan, made


# ----------------------------------------------------------------------------- report (parent)
def _environment(threads: int) -> dict:
    import numpy
    import onnxruntime
    import torch

    import medseg
    from medseg.infer import cpu_bf16_native
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"cpu": cpu, "cores_available": len(os.sched_getaffinity(0)), "threads": threads,
            "cpu_bf16_native": cpu_bf16_native(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "medseg": medseg.__version__,
            "python": platform.python_version()}


def _agreement(results: dict, masks: dict, truth, ref_arm: str = "teacher") -> None:
    """Adds to each result its Dice vs the teacher arm's mask (per region) and vs the truth."""
    import nibabel as nib
    import numpy as np

    from medseg.labels import labels_to_regions
    from medseg.metrics import dice
    conv = truth[1]
    truth_r = labels_to_regions(np.asarray(nib.load(truth[0]).dataobj), conv)
    regions = {a: labels_to_regions(np.asarray(nib.load(m).dataobj), conv) for a, m in masks.items()}
    ref = regions.get(ref_arm)
    for arm, r in results.items():
        if arm in FULL_ARMS:
            r["dice_vs_teacher"] = r["dice_vs_truth"] = None
            r["untrained"] = True
            continue
        r["dice_vs_teacher"] = ({k: dice(regions[arm][j], ref[j]) for j, k in enumerate(REGIONS)}
                                if ref is not None else None)
        r["dice_vs_truth"] = {k: dice(regions[arm][j], truth_r[j]) for j, k in enumerate(REGIONS)}


def _fmt_dice(r: dict, key: str, ref_arm: str, arm: str, missing: str) -> str:
    if r.get("untrained"):
        return UNTRAINED
    if key == "dice_vs_teacher" and arm == ref_arm:
        return "reference"
    d = r.get(key)
    if d is None:
        return missing
    if key == "dice_vs_truth":
        return f"{sum(d.values()) / len(d):.3f}"
    return "/".join(f"{d[k]:.3f}" for k in REGIONS)


def _speedup(ref: dict | None, r: dict) -> str:
    return f"{ref['predict_s'] / r['predict_s']:.2f}×" if ref else "n/a"


def _report(env: dict, case: dict, made: dict, results: dict, skipped: dict) -> tuple[str, dict]:
    """→ (markdown report, ratios)."""
    lines = ["# Edge speed: one BraTS-size case end to end (4 NIfTI files → mask file)", "",
             f"- CPU: {env['cpu']}; {env['cores_available']} core(s) available; {env['threads']} thread(s) "
             f"per arm; native bf16: {'yes' if env['cpu_bf16_native'] else 'no'}",
             f"- torch {env['torch']}, onnxruntime {env['onnxruntime']}, numpy {env['numpy']}, "
             f"medseg {env['medseg']}, Python {env['python']}",
             f"- case: synthetic {case['shape']} at 1 mm, labels {case['convention']} ({case['id']})"]
    if "full" in made:
        f = made["full"]
        lines.append(f"- full preset: {len(f['checkpoints'])} untrained {f['network']['name']} "
                     f"{f['network']['args']} checkpoints, {f['spacing']} mm, windows {f['roi']}"
                     + (f", overrides {f['overrides']}" if f["overrides"] else ""))
    if "teacher" in made:
        t = made["teacher"]
        lines.append(f"- teacher: {t['run']} ({t['folds']} fold(s)"
                     + ("" if t["finished"] else ", cv not finished") + ")")
    if "student" in made:
        lines.append(f"- student: {made['student']['run']}")
    for prec in ("fp32", "int8"):
        e = made.get(f"export_{prec}")
        if e:
            lines.append(f"- ONNX {prec} export: {e['seconds']:.1f} s (not part of the arm), "
                         f"{e['bytes'] / 1e6:.1f} MB" + (f", calibration {e['calibration']}" if e["calibration"]
                                                         else ""))
    for arm, why in skipped.items():
        lines.append(f"- **{arm} skipped**: {why}")
    ref_arm = "teacher"
    no_ref = "n/a (no teacher arm)"
    lines += ["", "| arm | engine | precision | models×flips | load s | predict s | peak RSS MB "
              "| Dice vs teacher TC/WT/ET | Dice vs truth (mean) |",
              "|---|---|---|---|---:|---:|---:|---|---:|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {r['engine']} | {r['precision']} | {r['models']}×{r['flips']} "
                     f"| {r['load_s']:.2f} | {r['predict_s']:.2f} | {r['peak_rss_mb']:.0f} "
                     f"| {_fmt_dice(r, 'dice_vs_teacher', ref_arm, arm, no_ref)} "
                     f"| {_fmt_dice(r, 'dice_vs_truth', ref_arm, arm, 'n/a')} |")
    full, teacher = results.get("full_ensemble"), results.get("teacher")
    ratios = {arm: {"vs_full_ensemble": full["predict_s"] / r["predict_s"] if full else None,
                    "vs_teacher": teacher["predict_s"] / r["predict_s"] if teacher else None}
              for arm, r in results.items()}
    lines += ["", "Speed-up of each arm (reference predict s / arm predict s):", "",
              "| arm | predict s | vs full_ensemble | vs teacher |", "|---|---:|---:|---:|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {r['predict_s']:.2f} | {_speedup(full, r)} | {_speedup(teacher, r)} |")
    onnx = [a for a in ONNX_ARMS if a in results]
    if onnx:
        loaded = {a: results[a]["torch_or_monai_loaded"] for a in onnx}
        importable = {a: results[a]["torch_importable"] for a in onnx}
        lines += ["", "ONNX arms: torch importable in the arm's process: "
                  + ", ".join(f"{a} {importable[a]}" for a in onnx) + "; torch/MONAI modules loaded: "
                  + ", ".join(f"{a} {loaded[a] or 'none'}" for a in onnx)]
    int8 = results.get("student_onnx_int8")
    lines.append("")
    if int8 and full:
        lines.append(f"INT8 student: {int8['predict_s']:.2f} s end to end ({int8['load_s']:.2f} s load), "
                     f"{full['predict_s'] / int8['predict_s']:.1f}× faster than the {full['models']}-model "
                     f"full-preset ensemble ({full['predict_s']:.1f} s) in this run; peak RSS "
                     f"{int8['peak_rss_mb']:.0f} MB.")
    elif int8:
        lines.append(f"INT8 student: {int8['predict_s']:.2f} s end to end, peak RSS {int8['peak_rss_mb']:.0f} MB "
                     "(no full_ensemble arm in this run: no speed-up over it).")
    else:
        lines.append("INT8 student: not measured in this run.")
    lines.append("Nothing is asserted: this measures.")
    return "\n".join(lines) + "\n", ratios


def _case(work: Path) -> tuple:
    """The BraTS-size case under `work`/data (written once; reused from a --keep folder)."""
    from medseg.data.discover import discover
    root = work / "data"
    ds = discover(root) if root.is_dir() and any(root.iterdir()) else None
    if ds is None or not ds.training:
        t = time.perf_counter()
        brats_size_cases(work, 1)
        print(f"synthesized one BraTS-size case in {time.perf_counter() - t:.1f} s", flush=True)
        ds = discover(root)
    return ds, ds.training[0]


def _run(args, arms: list[str], work: Path) -> int:
    import nibabel as nib
    import torch
    torch.set_num_threads(args.threads)
    env = _environment(args.threads)
    print(f"CPU {env['cpu']}, {args.threads} thread(s); torch {env['torch']}, onnxruntime {env['onnxruntime']}",
          flush=True)
    ds, c = _case(work)
    conv = ds.layout.convention
    case = {"id": c.case_id, "images": [str(f) for f in c.images], "label": str(c.label),
            "shape": list(nib.load(c.images[0]).shape[:3]), "convention": conv,
            "channels": list(ds.layout.channels)}
    skipped: dict = {}
    plan, made = _models(args, arms, work, conv, skipped)
    for arm, why in skipped.items():
        print(f"{arm}: skipped: {why}", flush=True)
    masks_dir = work / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    results, masks = {}, {}
    out = {"env": env, "case": case, "made": made, "arms": results, "skipped": skipped}
    for arm in arms:
        if arm not in plan:
            continue
        model, extra = plan[arm]
        mask = masks_dir / f"{arm}.nii.gz"
        mask.unlink(missing_ok=True)
        spec = {"arm": arm, "threads": args.threads, "images": case["images"], "channels": case["channels"],
                "convention": conv, "mask": str(mask), "model": model, **extra}
        print(f"{arm}: running …", flush=True)
        r = run_arm(__file__, arm, "--spec", json.dumps(spec))
        if r is None:
            skipped[arm] = "the arm's process failed (its stderr is printed above)"
            continue
        results[arm], masks[arm] = r, str(mask)
        print(f"{arm}: load {r['load_s']:.2f} s, predict {r['predict_s']:.2f} s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB ({r['engine']} {r['precision']}, {r['models']}×{r['flips']})", flush=True)
        _write(args.json, out)          # a partial record after each arm (a long run keeps what it measured)
    _agreement(results, masks, (case["label"], conv))
    table, ratios = _report(env, case, made, results, skipped)
    out["ratios"] = ratios
    print()
    print(table, end="")
    _write(args.json, out)
    md = Path(args.json).with_suffix(".md")
    md.write_text(table)
    print(f"\nwrote {args.json} and {md}" + (f"; case, checkpoints, ONNX files and masks kept in {work}"
                                            if args.keep else ""))
    return 0


def _write(path: str, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(p)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(REPO / "runs/distill/teacher"),
                   help="a `medseg cv` folder (fold_*/checkpoints/final.pt): the reference ensemble "
                   "(default: runs/distill/teacher, the demo-scale cpu-preset teacher)")
    p.add_argument("--student", default=str(REPO / "runs/distill/student_kd/final"),
                   help="the distilled student: a train folder (checkpoints/final.pt) or a checkpoint "
                   "(default: runs/distill/student_kd/final)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS),
                   help="arms to run (default: all but full_ensemble_tta, which takes hours on 2 cores)")
    p.add_argument("--full-folds", type=int, default=5, help="checkpoints of the full-preset ensemble (5)")
    p.add_argument("--full-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a full-preset value for the untrained full checkpoints (default: none, "
                   "the full preset as it is; e.g. for a quick look: data.spacing=[4,4,4])")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per arm (2)")
    p.add_argument("--calibration", default=str(REPO / "demo_data/brats2023"),
                   help="INT8 calibration data folder (default: demo_data/brats2023)")
    p.add_argument("--json", default=str(REPO / "runs/edge_speed.json"),
                   help="results (default: runs/edge_speed.json; the table goes next to it as .md)")
    p.add_argument("--keep", help="keep the case, checkpoints, ONNX files and masks in this folder "
                   "(a case already there is reused); default: a temporary folder, removed")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.arm:
        print(json.dumps(_arm(json.loads(args.spec))))
        return 0
    if args.full_folds < 1 or args.threads < 1:
        raise SystemExit("--full-folds and --threads must be at least 1")
    arms = [a for a in ARMS if a in args.arms]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)      # before torch is imported; the arms inherit it
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="medseg_edge_speed_"))
    try:
        return _run(args, arms, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
