"""Light networks for the edge student: parameters, multiply-accumulates per voxel
and the CPU time of one window forward pass, torch and onnxruntime, against
`unet3d`.

    python benchmarks/light_networks.py                           # 128³ and 96³ windows, 2 threads
    python benchmarks/light_networks.py --sizes 96 --repeats 5 --models unet3d_cpu mobilenet_unet3d
    python benchmarks/light_networks.py --json runs/light_networks.json

Rows (registry networks, seeded random weights: the speed does not depend on
training): ``unet3d_cpu`` (the ``cpu`` preset, 16…128 filters, the teacher of
`medseg distill`), ``unet3d_full`` (32…320), ``thin_unet3d``,
``mobilenet_unet3d`` (`medseg.light`, default arguments) and ``deeplabv3plus``
for reference.

- **kMAC/voxel**: `torch.utils.flop_counter.FlopCounterMode` over one forward
  pass of a 64³ window, divided by 2 (it counts 2 FLOPs per multiply-accumulate)
  and by the window's voxels: MACs, not FLOPs. It counts convolutions and
  transposed convolutions only: norms, activations, interpolation and
  concatenation are free to it, though on a CPU they are memory traffic that
  costs time (light networks are limited by it; compare the times).
- **torch**: eval, `torch.no_grad`, float32, `torch.set_num_threads(--threads)`,
  batch 1; median of `--repeats` timed forward passes after 1 warm-up.
- **ort**: the network exported as `medseg export` does (opset 17, dynamic
  batch and spatial axes; one model, no fold stack) to a temporary file,
  onnxruntime's CPU provider with ``intra_op_num_threads=--threads``, the same
  window and protocol.
- **×**: unet3d_cpu's time divided by the row's (a speed-up; when unet3d_cpu is
  among `--models` and ran the same window).
- **peak MB**: peak resident memory (VmHWM) of the arm's process, torch and
  onnxruntime measured in separate processes (`_common.run_arm`), so each is
  its own; the ort process imports no torch.

A window size that is not a multiple of a network's size divisor, or is less
than twice it, is rounded up to one that is for that network (said under the
table): instance norm needs more than one voxel per channel at the bottleneck,
in evaluation as well. Nothing is asserted: this
measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, run_arm  # noqa: E402

#: Row → (registry name, arguments).
NETWORKS: dict[str, tuple[str, dict]] = {
    "unet3d_cpu": ("unet3d", {"preset": "cpu"}),
    "unet3d_full": ("unet3d", {"preset": "full"}),
    "thin_unet3d": ("thin_unet3d", {}),
    "mobilenet_unet3d": ("mobilenet_unet3d", {}),
    "deeplabv3plus": ("deeplabv3plus", {}),
}
BASE = "unet3d_cpu"
FLOP_WINDOW = 64


def _window(row: str, size: int) -> int:
    from medseg.models import size_divisor
    name, args = NETWORKS[row]
    div = size_divisor(name, **args)
    return max(-(-size // div), 2) * div       # instance norm needs a bottleneck of 2³ or more


def _network(row: str):
    import torch

    from medseg.models import network_from_spec
    name, args = NETWORKS[row]
    torch.manual_seed(0)
    return network_from_spec({"name": name, "args": args}).float().eval()   # no deep supervision heads


def _median_seconds(run, repeats: int) -> float:
    run()                                   # warm-up (allocations, oneDNN / ORT kernel selection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _torch_arm(row: str, sizes: list[int], windows: list[int], repeats: int, threads: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    torch.set_num_threads(threads)
    net = _network(row)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 4, FLOP_WINDOW, FLOP_WINDOW, FLOP_WINDOW))
    macs = fc.get_total_flops() / 2 / FLOP_WINDOW ** 3
    seconds = {}
    for s, w in zip(sizes, windows):
        x = torch.randn(1, 4, w, w, w, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            seconds[str(s)] = _median_seconds(lambda: net(x), repeats)
    return {"params": sum(p.numel() for p in net.parameters()), "macs_per_voxel": macs,
            "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def _ort_arm(sizes: list[int], windows: list[int], repeats: int, threads: int, onnx_path: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    seconds = {}
    for s, w in zip(sizes, windows):
        x = np.random.default_rng(0).normal(size=(1, 4, w, w, w)).astype(np.float32)
        seconds[str(s)] = _median_seconds(lambda: sess.run(None, {"image": x}), repeats)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def _export(row: str, path: Path) -> None:
    """ONNX of the row's network, as `medseg export` writes it (opset 17, dynamic axes)."""
    import warnings

    import torch
    net = _network(row)
    x = torch.randn(1, 4, *(_window(row, 32),) * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["logits"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "batch", 2: "d", 3: "h", 4: "w"},
                                        "logits": {0: "batch", 2: "d", 3: "h", 4: "w"}})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 96], help="window edges (default 128 96)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per window, after 1 warm-up (median)")
    p.add_argument("--models", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    p.add_argument("--json", metavar="OUT", help="also write the results here")
    p.add_argument("--arm", help=argparse.SUPPRESS)          # ROW:torch or ROW:ort (a child process)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--windows", type=int, nargs="+", help=argparse.SUPPRESS)   # sizes rounded up (child)
    return p


def _cell(seconds: float | None, base: float | None) -> str:
    if seconds is None:
        return f"{'failed':>8}{'':>7}"
    ratio = f"{base / seconds:6.2f}x" if base else f"{'-':>7}"
    return f"{seconds:8.3f}{ratio}"


def main() -> int:
    a = _parser().parse_args()
    common = ["--sizes", *map(str, a.sizes), "--repeats", str(a.repeats), "--threads", str(a.threads)]
    if a.arm:
        row, runtime = a.arm.split(":")
        res = (_torch_arm(row, a.sizes, a.windows, a.repeats, a.threads) if runtime == "torch"
               else _ort_arm(a.sizes, a.windows, a.repeats, a.threads, a.onnx))
        print(json.dumps(res))
        return 0

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in a.models:
            path = Path(tmp) / f"{row}.onnx"
            print(f"[{row}] torch …", flush=True)
            windows = [_window(row, s) for s in a.sizes]
            arm_args = [*common, "--windows", *map(str, windows)]
            r = {"network": {"name": NETWORKS[row][0], "args": NETWORKS[row][1]},
                 "windows": dict(zip(map(str, a.sizes), windows)),
                 "torch": run_arm(__file__, f"{row}:torch", *arm_args)}
            print(f"[{row}] export, onnxruntime …", flush=True)
            try:
                _export(row, path)
                r["ort"] = run_arm(__file__, f"{row}:ort", *arm_args, "--onnx", str(path))
            except Exception as exc:  # noqa: BLE001 - report the row, go on with the others
                print(f"{row}: ONNX export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                r["ort"] = None
            rows[row] = r

    def sec(row: str, runtime: str, s: int) -> float | None:
        r = rows.get(row, {}).get(runtime)
        return r["seconds"][str(s)] if r else None

    def base(row: str, runtime: str, s: int) -> float | None:
        """The base row's time, when it ran the same window as `row`."""
        same = BASE in rows and rows[BASE]["windows"][str(s)] == rows[row]["windows"][str(s)]
        return sec(BASE, runtime, s) if same else None

    print(f"\nOne window, batch 1, float32, {a.threads} thread(s), median of {a.repeats} after 1 warm-up; "
          f"x = {BASE} time / row time; kMAC/vox: multiply-accumulates (FLOPs / 2) per voxel of a "
          f"{FLOP_WINDOW}³ window, convolutions only")
    head = f"{'model':18}{'params':>10}{'kMAC/vox':>10}"
    for s in a.sizes:
        head += f"{f'torch {s}³':>15}{f'ort {s}³':>15}"
    print(head + f"{'peak MB torch/ort':>20}")
    for row, r in rows.items():
        t = r["torch"]
        size = f"{t['params'] / 1e6:9.2f}M{t['macs_per_voxel'] / 1e3:10.1f}" if t else f"{'-':>10}{'-':>10}"
        line = f"{row:18}{size}"
        for s in a.sizes:
            line += _cell(sec(row, "torch", s), base(row, "torch", s)) + _cell(sec(row, "ort", s), base(row, "ort", s))
        mem = [f"{r[k]['peak_rss_mb']:.0f}" if r[k] else "-" for k in ("torch", "ort")]
        print(line + f"{'/'.join(mem):>20}")
    for row, r in rows.items():
        changed = [f"{k}³ → {v}³" for k, v in r["windows"].items() if int(k) != v]
        if changed:
            print(f"{row}: window rounded up to a multiple of its size divisor (at least 2 ×): " + ", ".join(changed))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"threads": a.threads, "repeats": a.repeats, "sizes": a.sizes,
                                            "flop_window": FLOP_WINDOW, "unit": "MACs per voxel (FLOPs / 2)",
                                            "base": BASE, "rows": rows}, indent=2))
        print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
