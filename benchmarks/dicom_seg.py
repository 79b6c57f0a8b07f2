"""DICOM in and out: the seconds a BraTS-size case spends on its DICOM steps in
`medseg predict`, next to the prediction itself.

    make demo                                  # trains runs/demo_cpu (default weights)
    python benchmarks/dicom_seg.py [--checkpoint PATH] [--cases 2]

Synthetic BraTS-size cases (4 × 240×240×155, 1 mm) are written as four DICOM MR
series each (155 single-frame images per series). Per case it times the steps
`medseg predict` adds for DICOM input: reading and checking the four series
(every file, pixel data decoded, before anything is written), copying them to
NIfTI for the engines, and writing the DICOM Segmentation (the written mask read
back, then the Segmentation); and, for scale, the prediction itself (torch, the
checkpoint's settings) and whole `medseg predict` runs on the NIfTI and on the
DICOM copy of the same cases.
Nothing is asserted.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import brats_size_cases, case_benchmark_args  # (benchmarks/ is the script's folder)


def _seconds(fn, *args, repeat: int = 3):
    """(median seconds of `repeat` calls `fn(*args)`, the last result)."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _segmentation(mask: Path, case, target: Path) -> Path:
    """As `medseg predict` does after a DICOM case's mask: read it back, write the SEG."""
    import numpy as np

    from medseg.data.dicom import write_seg
    from medseg.data.io import load_array
    return write_seg(load_array(mask, dtype=np.uint8), case, "brats2023", target, "unet3d, 1 checkpoint(s)",
                     "torch")


def main() -> int:
    args = case_benchmark_args(__doc__.split("\n")[0], ())
    import nibabel as nib
    from pydicom.uid import generate_uid

    from medseg.cli import main as medseg
    from medseg.data.dicom import dicom_cases, write_series
    from medseg.data.io import write_label_map
    from medseg.infer import Predictor

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases, _ = brats_size_cases(tmp, args.cases)
        for c in cases:
            uids = {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
            for name, f in zip(("t1", "t1ce", "t2", "flair"), c.images):
                write_series(nib.load(f), tmp / "dicom" / c.case_id / name, name.upper(), uids)
        pred = Predictor([args.checkpoint])
        for c in cases:
            check, (found, _) = _seconds(dicom_cases, tmp / "dicom" / c.case_id)
            dcase = found[0].dicom
            (tmp / "nii" / c.case_id).mkdir(parents=True)
            convert, files = _seconds(dcase.to_nifti, tmp / "nii" / c.case_id)
            predict, (labels, ref) = _seconds(pred.labels, files, "brats2023", repeat=1)
            mask, seg = tmp / "seg" / f"{c.case_id}.nii.gz", tmp / "seg" / f"{c.case_id}_seg.dcm"
            write_label_map(labels, ref, mask, "brats2023")
            write, _ = _seconds(_segmentation, mask, dcase, seg)
            rows.append({"check": check, "convert": convert, "predict": predict, "seg": write,
                         "seg_mb": seg.stat().st_size / 1e6, "tumour_ml": float((labels > 0).sum()) / 1000})
        whole = {}
        for kind in ("data", "dicom"):
            t = time.perf_counter()
            rc = medseg(["predict", "--model", args.checkpoint, "--input", str(tmp / kind),
                         "--out", str(tmp / f"out_{kind}")])
            whole[kind] = (time.perf_counter() - t) / len(cases) if rc == 0 else float("nan")

    print(f"{len(rows)} BraTS-size case(s), 4 series × 155 slices each; seconds per case (median of 3):")
    print("case  check 4 series  to NIfTI  predict (torch)  write SEG  SEG MB  tumour mL")
    for i, r in enumerate(rows):
        print(f"{i:>4}  {r['check']:>14.2f}  {r['convert']:>8.2f}  {r['predict']:>15.2f}  {r['seg']:>9.2f}  "
              f"{r['seg_mb']:>6.2f}  {r['tumour_ml']:>9.1f}")
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("check", "convert", "predict", "seg")}
    print(f"mean  {mean['check']:>14.2f}  {mean['convert']:>8.2f}  {mean['predict']:>15.2f}  {mean['seg']:>9.2f}")
    print(f"DICOM-SEG output adds {mean['seg']:.2f} s per case; DICOM input (check + NIfTI copy) "
          f"{mean['check'] + mean['convert']:.2f} s")
    print(f"`medseg predict` per case, model loading included: NIfTI input {whole['data']:.2f} s, "
          f"DICOM input with SEG output {whole['dicom']:.2f} s (+{whole['dicom'] - whole['data']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
