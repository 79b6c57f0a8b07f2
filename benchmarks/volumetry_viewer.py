"""Seconds that `medseg predict` adds per case for its volumetry (always on) and
for `--viewer-files` (3D Slicer .seg.nrrd + ITK-SNAP label file), on BraTS-size
masks (240×240×155, 1 mm).

    python benchmarks/volumetry_viewer.py [--cases 3] [--repeats 5]

The masks are the synthetic generator's ground truth (tumours of every size).
Per case, each step is timed `--repeats` times on a mask already in memory, as
the engines call them right after writing the mask; the median is printed, and
the NIfTI mask write (`write_label_map`) beside them for scale. Then the batch's
``volumes.csv`` (from predictions.json records, once per batch). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from medseg.data.discover import discover
    from medseg.data.inputs import write_manifest
    from medseg.data.io import load_array, load_header, write_label_map
    from medseg.data.synth import synthesize
    from medseg.viewer import viewer_paths, write_itksnap_labels, write_seg_nrrd
    from medseg.volumetry import case_volumetry, write_batch_volumes

    conv = "brats2023"
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "data", Path(tmp) / "out"
        synthesize(root, args.cases, conv, 7, (240, 240, 155), geometry_variation=False)
        cases = discover(root).cases
        rows, records = [], {}
        for case in cases:
            ref = load_header(case.label)
            labels = load_array(case.label, ref, np.uint8)
            mask = out / f"{case.case_id}.nii.gz"
            seg, itk = viewer_paths(out, case.case_id)
            t_mask = _median_seconds(lambda: write_label_map(labels, ref, mask, conv), args.repeats)
            t_head = _median_seconds(lambda: load_header(mask).affine, args.repeats)
            affine = load_header(mask).affine
            t_vol = _median_seconds(lambda: case_volumetry(labels, affine, conv), args.repeats)
            t_seg = _median_seconds(lambda: write_seg_nrrd(labels, affine, conv, seg), args.repeats)
            t_itk = _median_seconds(lambda: write_itksnap_labels(conv, itk), args.repeats)
            vol = case_volumetry(labels, affine, conv)
            records[case.case_id] = {"volumes": vol}
            rows.append((case.case_id, vol["regions"]["WT"], sum(vol["lesions"].values()), t_mask,
                         t_head + t_vol, t_seg + t_itk, seg.stat().st_size / 1024, mask.stat().st_size / 1024))
        write_manifest(out, [out / f"{c.case_id}.nii.gz" for c in cases], "complete",
                       {"label_convention": conv}, cases=records)
        pairs = [(c.case_id, out / f"{c.case_id}.nii.gz") for c in cases]
        t_csv = _median_seconds(lambda: write_batch_volumes(out, pairs, conv), args.repeats)

    print(f"{'case':<22}{'WT mL':>8}{'lesions':>9}{'mask .nii.gz s':>16}{'volumetry s':>13}"
          f"{'viewer files s':>16}{'.seg.nrrd KB':>14}{'.nii.gz KB':>12}")
    for cid, wt, les, tm, tv, tw, kb_seg, kb_nii in rows:
        print(f"{cid:<22}{wt:>8.1f}{les:>9d}{tm:>16.3f}{tv:>13.3f}{tw:>16.3f}{kb_seg:>14.0f}{kb_nii:>12.0f}")
    print(f"volumes.csv for the batch ({len(rows)} cases, from predictions.json): {t_csv:.4f} s")
    print(f"added per case: volumetry {max(r[4] for r in rows):.3f} s at most "
          f"(median {statistics.median(r[4] for r in rows):.3f}); --viewer-files "
          f"{max(r[5] for r in rows):.3f} s at most (median {statistics.median(r[5] for r in rows):.3f})")


if __name__ == "__main__":
    main()
