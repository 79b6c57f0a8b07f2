"""Gradient checkpointing (``train.grad_checkpoint``): memory and time of one
training step of the ``full`` preset's network, with and without.

    python benchmarks/grad_checkpoint.py                   # full preset: 128³, batch 2
    python benchmarks/grad_checkpoint.py --patch 64 --steps 3

Each arm runs in its own process (its peak memory is its own): the trainer's
network (`unet3d` ``full``, 32…320 filters, deep supervision heads), loss
(`build_criterion`) and autocast setting, one SGD step per iteration on the same
seeded input and target. Printed per arm: the loss of the first step (must be
equal), seconds per step (the last one, after a warm-up), and the memory above what the process
held before the first step: held at the end of its forward pass (the
activations kept for backward, and the outputs), the peak of that forward pass,
and the peak of the whole step (the backward pass included: with
checkpointing, a block's activations are recomputed there, one block at a
time), measured as

- CPU: peak resident memory (VmHWM) during the steps minus the resident memory
  before them (weights, optimiser state and input already allocated);
- GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the
  steps (torch's own statistics).

Then the ratios. Nothing is asserted: this measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, run_arm  # noqa: E402


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _arm(args) -> dict:
    import torch

    from medseg.config import resolve_config
    from medseg.infer import autocast, cpu_bf16_native
    from medseg.train import build_criterion, build_network
    from medseg.grad_checkpoint import enable_grad_checkpoint

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = resolve_config(args.preset, [f"train.patch=[{args.patch},{args.patch},{args.patch}]",
                                       f"train.batch_size={args.batch}"])
    amp = cfg["train"]["amp"] and (dev.type == "cuda" or cpu_bf16_native())
    torch.manual_seed(0)
    net = build_network(cfg, training=True).to(dev).train()
    if args.arm == "checkpoint":
        enable_grad_checkpoint(net)
    loss_fn = build_criterion(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, 4, args.patch, args.patch, args.patch)
    x = torch.randn(shape, generator=g).to(dev)
    y = (torch.rand((args.batch, 3, *shape[2:]), generator=g) > 0.8).float().to(dev)
    losses, seconds = [], []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    base_rss = _rss_mb()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        with autocast(dev, amp, cfg["train"]["amp_dtype"]):
            out = net(x)
            heads = list(torch.unbind(out, 1)) if out.ndim == 6 else out
        loss = loss_fn(heads, y)
        if not losses:       # what the forward pass keeps for backward, and its own peak
            held, fwd_peak = _rss_mb() - base_rss, peak_rss_mb() - base_rss
            if dev.type == "cuda":
                held_gpu = (torch.cuda.memory_allocated(dev) - base) / 2 ** 20
                fwd_gpu = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
        del out, heads
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    res = {"arm": args.arm, "device": str(dev), "amp": bool(amp), "losses": losses, "seconds": seconds,
           "step_peak_rss_mb": peak_rss_mb() - base_rss, "base_rss_mb": base_rss,
           "forward_held_rss_mb": held, "forward_peak_rss_mb": fwd_peak,
           "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    if dev.type == "cuda":
        res["step_peak_gpu_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
        res["forward_held_gpu_mb"], res["forward_peak_gpu_mb"] = held_gpu, fwd_gpu
    return res


def _key(col: str) -> str:
    """"rss_forward_held" → "forward_held_rss_mb"."""
    kind, metric = col.split("_", 1)
    return f"{metric}_{kind}_mb"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="full")
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps per arm; the last one is timed")
    p.add_argument("--device", default=None)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--arm", choices=["plain", "checkpoint"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print(json.dumps(_arm(args)))
        return
    common = ["--preset", args.preset, "--patch", str(args.patch), "--batch", str(args.batch),
              "--steps", str(args.steps)] + (["--device", args.device] if args.device else [])
    res = {arm: run_arm(__file__, arm, *common) for arm in ("plain", "checkpoint")}
    if not all(res.values()):
        sys.exit(1)
    a, b = res["plain"], res["checkpoint"]
    print(f"{args.preset} preset, {args.patch}³ patch, batch {args.batch}, {a['device']}, "
          f"{'autocast' if a['amp'] else 'float32'}, {a['params_m']:.1f} M parameters")
    kinds = ["rss"] + (["gpu"] if "step_peak_gpu_mb" in a else [])
    cols = [(f"{k}_{m}", f"{m.replace('_', ' ')} {k.upper()} MB") for k in kinds
            for m in ("forward_held", "forward_peak", "step_peak")]
    print(f"{'arm':<12}{'first loss':>14}{'s/step':>9}" + "".join(f"{h:>24}" for _, h in cols))
    for r in (a, b):
        print(f"{r['arm']:<12}{r['losses'][0]:>14.7f}{r['seconds'][-1]:>9.2f}"
              + "".join(f"{r[_key(c)]:>24.0f}" for c, _ in cols))
    rel = abs(a["losses"][0] - b["losses"][0]) / max(abs(a["losses"][0]), 1e-12)
    print("memory (checkpoint / plain): " + ", ".join(f"{h.replace(' MB', '')} {b[_key(c)] / a[_key(c)]:.2f}×"
                                                     for c, h in cols)
          + f"; time {b['seconds'][-1] / a['seconds'][-1]:.2f}×; first-step loss relative difference {rel:.1e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **res}, indent=2))


if __name__ == "__main__":
    main()
