"""The README's demo: synthetic BraTS-like data → check → 5-fold split →
`medseg cv --folds 5` with the ``cpu`` preset (about 12 minutes on 2 cores).

The demo dataset is fixed (`DEMO`), so its split is committed under
``data_lists/`` and the demo verifies that regenerating the data reproduces it.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from medseg.config import resolve_config
from medseg.cv import format_summary, run_cv
from medseg.data.discover import discover, resolve_convention
from medseg.data.folds import build_datalist, write_datalist
from medseg.data.synth import DEMO_SHAPE, synthesize
from medseg.data.validate import check_dataset

__all__ = ["DEMO", "DEFAULT_TASK", "demo_layout", "demo_paths", "make_demo_data", "demo_datalist", "run_demo"]

#: The built-in demo dataset: 40 labelled BraTS 2023-layout cases on the 96×96×64 grid.
DEMO = {"cases": 40, "layout": "brats2023", "seed": 0, "shape": DEMO_SHAPE, "folds": 5}


#: The demo's task when none is named (its data, datalist and run keep their names).
DEFAULT_TASK = "gli2023"


def demo_layout(task: str) -> str:
    """The layout of a task's demo data: BraTS 2021 names for gli2021, else BraTS 2023+."""
    return "brats2021" if task == "gli2021" else DEMO["layout"]


def demo_paths(task: str = DEFAULT_TASK, out=None, datalist=None, run=None) -> tuple[str, str, str]:
    """(data folder, datalist, cross-validation folder) of a task's demo; given values win."""
    if task == DEFAULT_TASK:
        defaults = ("demo_data/brats2023", "data_lists/demo_brats2023.json", "runs/demo_cpu")
    else:
        defaults = (f"demo_data/{task}", f"data_lists/demo_{task}.json", f"runs/demo_{task}_cpu")
    return tuple(str(v) if v else d for v, d in zip((out, datalist, run), defaults))


def make_demo_data(out: str | Path, task: str = DEFAULT_TASK) -> Path:
    """Write the demo dataset of `task` to `out` unless it is already there (idempotent)."""
    out = Path(out)
    if not (out.exists() and any(out.iterdir())):
        synthesize(out, DEMO["cases"], demo_layout(task), DEMO["seed"], DEMO["shape"],
                   preview=out.parent / f"{out.name}_preview.png",
                   **({} if task == DEFAULT_TASK else {"task": task}))
    return out


def demo_datalist(root: str | Path, task: str = DEFAULT_TASK) -> dict:
    """The demo split of the data at `root`, as `medseg data split` writes it."""
    ds = discover(root)
    conv, scans = resolve_convention(ds)
    name = "demo_brats2023" if task == DEFAULT_TASK else f"demo_{task}"
    return build_datalist(ds, conv, scans, DEMO["folds"], DEMO["seed"], name)


def run_demo(out: str | Path, datalist: str | Path, run_dir: str | Path | None = None,
             overrides: list[str] | None = None, print_fn=print, task: str = DEFAULT_TASK) -> int:
    """Synthesize → check → split → (with `run_dir`) 5-fold cross-validation of `task`."""
    t0 = time.perf_counter()
    root = make_demo_data(out, task)
    steps = 4 if run_dir else 3
    print_fn(f"[1/{steps}] synthetic data: {root} ({DEMO['cases']} {task} cases, {demo_layout(task)} layout, "
             f"grid {DEMO['shape']}; preview {root.parent / (root.name + '_preview.png')})")
    rep = check_dataset(root)
    kinds = Counter(f.kind for f in rep.warnings)
    detail = "; ".join(f"{n} cases: {kind}" for kind, n in kinds.items())
    print_fn(f"[2/{steps}] check: {len(rep.errors)} errors, {len(rep.warnings)} warnings"
             + (f" ({detail}; medseg resamples and reorients)" if detail else ""))
    if not rep.ok:
        for f in rep.errors:
            print_fn(str(f))
        return 1
    dl = demo_datalist(root, task)
    written = write_datalist(dl, datalist)
    sizes = [sum(e["fold"] == k for e in dl["training"]) for k in range(DEMO["folds"])]
    print_fn(f"[3/{steps}] split: {datalist} {'written' if written else 'matches the committed split'}; "
             f"fold sizes {sizes}")
    if run_dir:
        cfg = resolve_config("cpu", overrides or [])
        print_fn(f"[4/4] medseg cv --folds {DEMO['folds']} --preset cpu → {run_dir}")
        summary = run_cv(cfg, datalist, root, run_dir, n_folds=DEMO["folds"], print_fn=print_fn)
        print_fn(format_summary(summary))
    print_fn(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0
