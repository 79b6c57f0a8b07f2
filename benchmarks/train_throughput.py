"""Training throughput: medseg vs the MONAI-tutorial way, same model, patch and batch.

    python benchmarks/train_throughput.py            # 8 BraTS-size synthetic cases
    python benchmarks/train_throughput.py --shape 96 96 64 --iters 40

Both arms train the same network (the ``cpu`` preset's `unet3d`, deep
supervision, region Dice+BCE loss) on the same patches and batch size, with the
same augmentation, each in its own process so that peak memory is its own:

- **baseline** (as in MONAI's BraTS tutorials): `monai.data.Dataset` with
  `LoadImaged` and the whole preprocessing every iteration, a `DataLoader`
  with a worker, fp32.
- **medseg**: the trainer's own code: the preprocessed dataset built once
  (memory-mapped, read by patches), bf16 autocast where the CPU has it natively,
  the trainer's `_train_epoch` step.

Printed: steady-state iterations per second after warm-up, the one-off cache
build time, peak resident memory (main process; DataLoader worker apart), and
the ratios. Nothing is asserted: this
measures.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from _common import peak_rss_mb, run_arm  # noqa: E402  (benchmarks/ is the script's folder)


def _worker_peak_mb() -> float:
    """The largest DataLoader worker's `ru_maxrss` (MB); it starts from its parent's
    size at fork, so shared pages are counted again."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def _arm(args) -> dict:
    import torch
    from monai.data import DataLoader, Dataset

    from medseg.config import resolve_config
    from medseg.losses import build_loss
    from medseg.models import build_model
    from medseg.train import _datasets, _train_epoch, fold_data
    from medseg.transforms import IMAGE, LABEL

    from _common import monai_transforms

    cfg = resolve_config(args.preset, args.set)
    tcfg = cfg["train"]
    data = fold_data(args.datalist, args.root, 0)
    torch.manual_seed(0)
    model = build_model(cfg["model"]["name"], **cfg["model"]["args"])
    loss_fn = build_loss(deep_supervision=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = (args.warmup + args.iters) * tcfg["batch_size"]
    order = [i % len(data.train) for i in range(n)]
    t0 = time.perf_counter()
    if args.arm == "medseg":
        train_ds, _ = _datasets(data, cfg, Path(args.root).parent / "preprocessed")
        cache_s = time.perf_counter() - t0
        from medseg.data.patches import EpochSampler
        sampler = EpochSampler(len(train_ds), n, 0, 0, 1)    # (case, seed) keys, as training draws them
        sampler.set_epoch(0)
        loader = DataLoader(train_ds, batch_size=tcfg["batch_size"], sampler=sampler,
                            num_workers=cfg["data"]["num_workers"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        it = iter(loader)
        warm = [next(it) for _ in range(args.warmup)]
        _train_epoch(model, warm, loss_fn, opt, sched, cfg, torch.device("cpu"), True, None)
        rest = _Timed(it)
        _train_epoch(model, rest, loss_fn, opt, sched, cfg, torch.device("cpu"), True, None)
        seconds = rest.seconds
    else:
        ds = Dataset(data.train, monai_transforms(data.channels, data.convention, cfg["data"]["spacing"],
                                                  tcfg["patch"]))
        cache_s = 0.0
        loader = DataLoader(ds, batch_size=tcfg["batch_size"], sampler=order,
                            num_workers=args.baseline_workers)
        model.train()
        seconds, done = 0.0, 0
        t = time.perf_counter()
        for batch in loader:
            x, y = torch.as_tensor(batch[IMAGE]), torch.as_tensor(batch[LABEL])
            loss = loss_fn(list(torch.unbind(model(x), 1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == args.warmup:
                t = time.perf_counter()
        seconds = time.perf_counter() - t
    return {"arm": args.arm, "iters": args.iters, "seconds": seconds,
            "it_per_s": args.iters / seconds, "cache_s": cache_s, "peak_rss_mb": peak_rss_mb(),
            "worker_peak_mb": _worker_peak_mb()}


class _Timed:
    """Iterates the loader and times everything from the first batch on
    (data loading included)."""

    def __init__(self, it):
        self.it, self.seconds = it, 0.0

    def __iter__(self):
        t = time.perf_counter()
        for batch in self.it:
            yield batch
        self.seconds = time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per arm")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline-workers", type=int, default=1)
    p.add_argument("--arm", choices=["medseg", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--datalist", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(_arm(args)))
        return 0

    from medseg.data.discover import discover, resolve_convention
    from medseg.data.folds import build_datalist, write_datalist
    from medseg.data.synth import synthesize
    with tempfile.TemporaryDirectory() as tmp:
        root, dl = Path(tmp) / "data", Path(tmp) / "split.json"
        t = time.perf_counter()
        synthesize(root, args.cases, "brats2023", 0, tuple(args.shape))
        ds = discover(root)
        conv, scans = resolve_convention(ds)
        write_datalist(build_datalist(ds, conv, scans, 2, 0, "bench"), dl)
        print(f"data: {args.cases} synthetic cases {tuple(args.shape)} .nii.gz "
              f"({time.perf_counter() - t:.0f} s to write); preset {args.preset} {args.set}")
        res = {}
        for arm in ("baseline", "medseg"):
            res[arm] = run_arm(__file__, arm, "--datalist", str(dl), "--root", str(root),
                               "--preset", args.preset, "--iters", str(args.iters),
                               "--warmup", str(args.warmup),
                               "--baseline-workers", str(args.baseline_workers),
                               *[f"--set={s}" for s in args.set])
            if res[arm] is None:
                return 1
    b, m = res["baseline"], res["medseg"]
    print(f"{'':10}{'it/s':>8}{'s/it':>8}{'cache s':>9}{'peak RSS MB':>13}{'worker MB':>11}")
    for name, r in (("baseline", b), ("medseg", m)):
        print(f"{name:10}{r['it_per_s']:8.2f}{1 / r['it_per_s']:8.2f}{r['cache_s']:9.1f}"
              f"{r['peak_rss_mb']:13.0f}{r['worker_peak_mb']:11.0f}")
    fold_iters = 40 * 16   # one fold of the cpu preset
    amort = (fold_iters / b["it_per_s"]) / (m["cache_s"] + fold_iters / m["it_per_s"])
    print(f"speed-up (steady state): {m['it_per_s'] / b['it_per_s']:.2f}x; over one cpu-preset fold "
          f"({fold_iters} iterations, cache build included): {amort:.2f}x; peak memory (main "
          f"process) medseg/baseline: {m['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
