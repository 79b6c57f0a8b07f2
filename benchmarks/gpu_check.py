"""GPU readiness check (run by benchmarks/gpu_check.sh on a machine with a GPU).

1. N synthetic BraTS-size cases (240×240×155, 1 mm) → the preprocessed dataset;
   augmentation of a 128³ sample in a loader worker (1 CPU thread) against the
   batch augmented on the GPU (`data.augment=auto`; the worker only reads).
2. A short training of the full preset (1 mm, 128³ patches, the nnU-Net-size
   U-Net, bf16 where the GPU has it): iterations per second after the first
   epoch, peak GPU memory, the fraction of the loop spent waiting for batches.
3. One BraTS-size case predicted through the real prediction path with 1 and
   5 models (the trained weights five times: the cost of a 5-fold ensemble),
   without and with mirror TTA: seconds per case.
4. The ONNX export of those weights run by onnxruntime with the CUDA provider
   when onnxruntime-gpu is installed (else: which providers there are), then
   with `--provider tensorrt` (fp16): the first run (engine build) and a second
   run from the engine cache; where TensorRT is missing, the reason medseg gives.

Prints one line per figure and writes them as JSON. Nothing is asserted.
`--device cpu --shape 64 64 40 --iters 2 --model-preset cpu --ensemble 2` runs
the same steps on a CPU in a few minutes (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/medseg_gpu_check")
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    ap.add_argument("--iters", type=int, default=40, help="iterations per epoch (2 epochs)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model-preset", default="full", choices=["full", "cpu"])
    ap.add_argument("--ensemble", type=int, default=5, help="models in the ensemble timing (default 5)")
    a = ap.parse_args()
    import torch
    from medseg.cli import main as medseg
    from medseg.data.synth import synthesize
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"torch": torch.__version__, "device": a.device, "work": str(work)}
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to torch: install a CUDA build of torch")
        res |= {"gpu": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(),
                "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30}
    print(json.dumps(res), flush=True)

    root = work / "data"
    if not root.exists():
        t0 = time.perf_counter()
        synthesize(root, a.cases, "brats2023", 3, tuple(a.shape), geometry_variation=False)
        print(f"synthesized {a.cases} cases {a.shape} in {time.perf_counter() - t0:.0f} s", flush=True)
    dl = work / "split.json"
    if not dl.exists():
        assert medseg(["data", "split", "--root", str(root), "--folds", "2", "--out", str(dl)]) == 0
    sets = [f"train.epochs=2", f"train.iters_per_epoch={a.iters}", "train.val_every=2", "train.val_max_cases=1"]
    if a.model_preset != "full":
        sets.append(f"model.args.preset={a.model_preset}")
    run = work / "run"
    t0 = time.perf_counter()
    assert medseg(["data", "preprocess", "--datalist", str(dl), "--data-root", str(root), "--preset", "full",
                   "--out", str(work / "preprocessed")]) == 0
    res["preprocess_s"] = time.perf_counter() - t0
    # augmentation per 128³ sample: whole in a loader worker (1 CPU thread) against
    # read-only workers + the batch augmented on the device (data.augment=auto on a GPU)
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import augmentation_costs
    from medseg.config import resolve_config
    from medseg.data.preprocessed import Store
    store = Store(next((work / "preprocessed").glob("pp_*")))
    ids = sorted(p.name for p in store.path.iterdir() if (p / "entry.json").is_file())
    aug = augmentation_costs(store, ids[:2], resolve_config("full")["train"]["patch"], 16, a.device)
    res |= {"aug_worker_s_per_sample": aug["worker_s"], "aug_worker_raw_s_per_sample": aug["worker_raw_s"],
            "aug_device_s_per_sample": aug["device_s"]}
    print(f"augmentation per 128³ sample: in a loader worker {aug['worker_s']:.3f} s of one core; with "
          f"augmentation on {a.device}: the worker reads {aug['worker_raw_s']:.3f} s, the device augments "
          f"{aug['device_s'] * 1e3:.1f} ms", flush=True)
    if not (run / "train_summary.json").exists():
        import shutil
        shutil.rmtree(run, ignore_errors=True)
        assert medseg(["train", "--datalist", str(dl), "--data-root", str(root), "--fold", "0", "--out", str(run),
                       "--preset", "full", "--device", a.device, "--cache-dir", str(work / "preprocessed"),
                       *[f"--set={s}" for s in sets]]) == 0
    rows = list(csv.DictReader(open(run / "log.csv")))
    second = rows[-1]
    train_s = float(second["seconds"])
    res |= {"iters_per_s_epoch2": a.iters / train_s, "epoch2_s_incl_validation_of_1_case": train_s,
            "data_wait_epoch2": float(second["data_wait"]),
            "gpu_mem_gb": float(second["gpu_mem_gb"]) if second.get("gpu_mem_gb") else None,
            "loader_workers": json.loads((run / "config.json").read_text())["data"]["num_workers"],
            "cpu_count": os.cpu_count()}
    save(res)
    print(f"training: {res['iters_per_s_epoch2']:.2f} it/s (batch 2, 128³, epoch 2 incl. 1-case validation), "
          f"data wait {res['data_wait_epoch2']:.1%}, peak GPU memory {res['gpu_mem_gb']} GB", flush=True)

    ckpt = run / "checkpoints" / "final.pt"
    from medseg.data.discover import discover
    case = discover(root).cases[-1]
    files = dict(zip(["--t1", "--t1ce", "--t2", "--flair"], map(str, case.images)))
    for n_models in sorted({1, a.ensemble}):
        for tta in (False, True):
            out = work / f"pred_{n_models}_{int(tta)}"
            args = ["predict", "--model", *[str(ckpt)] * n_models, *sum(([k, v] for k, v in files.items()), []),
                    "--out", str(out), "--overwrite", "--device", a.device] + (["--tta"] if tta else [])
            medseg(args)                       # warm-up (cudnn autotune, model load)
            t0 = time.perf_counter()
            assert medseg(args) == 0
            key = f"predict_s_{n_models}model{'_tta' if tta else ''}"
            res[key] = time.perf_counter() - t0
            print(f"predict one {a.shape} case, {n_models} model(s){' + TTA' if tta else ''}: {res[key]:.1f} s",
                  flush=True)

    save(res)

    import onnxruntime as ort
    res["onnx_providers"] = ort.get_available_providers()
    onnx = work / "model.onnx"
    # a few iterations leave a barely trained network, whose export can miss the
    # verification's tolerance: report it and keep the figures measured so far
    if medseg(["export", "--model", str(ckpt), "--out", str(onnx)]) != 0:
        res["onnx_export"] = "failed verification (see above); no ONNX timing"
        print(res["onnx_export"], flush=True)
        save(res)
        return
    out = work / "pred_onnx"
    args = ["predict", "--engine", "onnx", "--model", str(onnx), *sum(([k, v] for k, v in files.items()), []),
            "--out", str(out), "--overwrite"]
    medseg(args)
    t0 = time.perf_counter()
    assert medseg(args) == 0
    res["onnx_predict_s"] = time.perf_counter() - t0
    print(f"ONNX ({'CUDA' if 'CUDAExecutionProvider' in res['onnx_providers'] else 'CPU'} provider): "
          f"{res['onnx_predict_s']:.1f} s per case; providers {res['onnx_providers']}", flush=True)
    save(res)

    from medseg.edge import EdgePredictor
    from medseg.errors import MedsegError
    try:
        EdgePredictor(onnx, provider="tensorrt", trt_cache=work / "trt_cache")
    except MedsegError as exc:
        res["tensorrt"] = f"unavailable: {exc}"
        print(f"TensorRT {res['tensorrt']}", flush=True)
        save(res)
        return
    trt = args[:-1] + ["--provider", "tensorrt", "--trt-cache", str(work / "trt_cache"), "--overwrite"]
    trt[trt.index("--out") + 1] = str(work / "pred_trt")
    for key in ("tensorrt_first_s", "tensorrt_cached_s"):       # engine build, then from the cache
        t0 = time.perf_counter()
        assert medseg(trt) == 0
        res[key] = time.perf_counter() - t0
    print(f"ONNX TensorRT fp16: first run (engine build) {res['tensorrt_first_s']:.1f} s, cached "
          f"{res['tensorrt_cached_s']:.1f} s per case", flush=True)
    save(res)


def save(res: dict) -> None:
    """The figures so far → gpu_check.json in $OUT (or the work folder)."""
    target = Path(os.environ.get("OUT", res["work"])) / "gpu_check.json"
    target.write_text(json.dumps(res, indent=2))
    print(f"written {target}", flush=True)


if __name__ == "__main__":
    main()
