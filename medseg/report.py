"""`medseg report`: quality-control pages for radiologists.

For each predicted case: a PNG with axial, coronal and sagittal FLAIR and T1ce
slices through the tumour's centre, the mask overlaid (medseg's colour table,
`medseg.labels.CLASS_COLOURS`, with a legend: edema green, necrosis/NET red,
enhancing yellow) and, with references, a second
row showing the reference. An ``index.html`` lists every case with its region
volumes (mL) and, with references, Dice and HD95. Needs matplotlib (the
``viz`` extra).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.discover import discover
from medseg.data.io import atomic_path, load_array, load_header
from medseg.errors import MedsegError
from medseg.evaluate import evaluate_case, references
from medseg.labels import CLASS_COLOURS, CLASS_NAMES, REGIONS, labels_to_regions
from medseg.scoring import DEFAULT_RULES, get_rules

__all__ = ["make_report", "REGION_COLOURS", "legend"]

#: RGBA overlay colours of edema (WT only), necrosis/NET (TC without ET) and
#: enhancing tumour (ET): medseg's one colour table, half transparent.
REGION_COLOURS = {k: (*(c / 255 for c in CLASS_COLOURS[k]), 0.55) for k in ("ED", "NCR", "ET")}


def legend(fig, classes=("NCR", "ED", "ET")) -> None:
    """A legend naming each overlay colour, below the pictures."""
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color=tuple(c / 255 for c in CLASS_COLOURS[k]), label=CLASS_NAMES[k])
                        for k in classes], loc="lower center", ncol=len(classes), fontsize=8,
               frameon=False)


def _canonical(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel array → RAS storage order for display."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(("R", "A", "S")))
    return nib.orientations.apply_orientation(arr, ornt)


def _overlay(regions: np.ndarray) -> np.ndarray:
    """`(3, X, Y)` TC/WT/ET slice → `(X, Y, 4)` RGBA."""
    tc, wt, et = regions
    rgba = np.zeros((*tc.shape, 4), np.float32)
    rgba[wt & ~tc] = REGION_COLOURS["ED"]
    rgba[tc & ~et] = REGION_COLOURS["NCR"]
    rgba[et] = REGION_COLOURS["ET"]
    return rgba


def _slices(vol: np.ndarray, c: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through `c`, oriented for display (anterior up)."""
    if vol.ndim == 4:
        return [np.stack([_slices(v, c)[i] for v in vol]) for i in range(3)]
    return [np.rot90(vol[:, :, c[2]]), np.rot90(vol[:, c[1], :]), np.rot90(vol[c[0], :, :])]


def _case_png(images: dict[str, np.ndarray], rows: list[tuple[str, np.ndarray]], target: Path,
              title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wt = rows[0][1][1]
    c = tuple(int(v) for v in np.argwhere(wt).mean(0)) if wt.any() else \
        tuple(s // 2 for s in wt.shape)
    names = list(images)
    fig, axes = plt.subplots(len(rows) * len(names), 3, figsize=(9, 3 * len(rows) * len(names)),
                             squeeze=False)
    for r, (label, regions) in enumerate(rows):
        ov = _slices(regions, c)
        for m, name in enumerate(names):
            img = images[name]
            lo, hi = np.percentile(img[img > 0], (1, 99.5)) if (img > 0).any() else (0, 1)
            for j, (sl, view) in enumerate(zip(_slices(img, c), ("axial", "coronal", "sagittal"))):
                ax = axes[r * len(names) + m, j]
                ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi)
                ax.imshow(_overlay(ov[j]))
                ax.set_title(f"{label}: {name} {view}", fontsize=8)
                ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    legend(fig)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)


def make_report(pred: str | Path, images: str | Path, out: str | Path,
                ref: str | Path | None = None, convention: str | None = None,
                rules: str = DEFAULT_RULES) -> Path:
    """Write ``out/index.html`` and one PNG per predicted case (Dice and HD95 scored
    under the rule set `rules`, named on the page); returns the HTML path."""
    get_rules(rules)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MedsegError("medseg report needs matplotlib: pip install 'medseg[viz]'") from None
    pred, out = Path(pred), Path(out)
    ds = discover(images)
    refs, conv = references(Path(ref), convention) if ref else ({}, convention)
    if conv is None:
        from medseg.data.discover import resolve_convention
        conv = resolve_convention(ds)[0].name if ds.training else \
            {"brats2021": "brats2021", "msd": "msd"}.get(ds.layout.name, "brats2023")
    chans = list(ds.layout.channels)
    cases = [c for c in ds.cases if (pred / f"{c.case_id}.nii.gz").is_file()]
    missing = _missing_modalities(pred)
    if not cases:
        raise MedsegError(f"--pred {pred}: no <case_id>.nii.gz matches a case of --images {images}")
    table = []
    for case in cases:
        mask_path = pred / f"{case.case_id}.nii.gz"
        mimg = load_header(mask_path)
        zooms = mimg.header.get_zooms()[:3]
        voxel_ml = float(np.prod(zooms)) / 1000.0
        regions = labels_to_regions(load_array(mask_path, mimg, np.int16), conv)
        shown = {}
        # FLAIR and T1ce, or the modalities the case has when one of them is missing.
        present = [c for c in chans if c not in case.missing]
        for name in [c for c in ("flair", "t1ce", "t2", "t1") if c in present][:2]:
            if len(case.images) == 1:       # MSD: one 4D file
                path, arr = case.images[0], load_array(case.images[0])[..., chans.index(name)]
            else:
                path = case.images[present.index(name)]
                arr = load_array(path)
            if arr.shape != regions.shape[1:]:
                raise MedsegError(f"{mask_path}: grid {regions.shape[1:]} does not match the image "
                                  f"{path} {arr.shape}")
            shown[name.upper()] = _canonical(arr, mimg.affine)
        rows = [("prediction", np.stack([_canonical(r, mimg.affine) for r in regions]))]
        metrics = None
        if case.case_id in refs:
            rreg = labels_to_regions(load_array(refs[case.case_id], dtype=np.int16), conv)
            rows.append(("reference", np.stack([_canonical(r, mimg.affine) for r in rreg])))
            metrics = evaluate_case(mask_path, refs[case.case_id], conv, rules)
        png = out / f"{case.case_id}.png"
        _case_png(shown, rows, png, case.case_id)
        table.append((case.case_id, {r: float(regions[i].sum() * voxel_ml) for i, r in enumerate(REGIONS)},
                      metrics, png.name, missing.get(case.case_id, [])))
    return _write_html(table, out, conv, bool(refs), rules)


def _missing_modalities(pred: Path) -> dict[str, list[str]]:
    """{case id: modalities it was predicted without}, from the ``predictions.json``
    `medseg predict` writes beside its masks (empty when there is none)."""
    try:
        return dict(json.loads((pred / "predictions.json").read_text()).get("missing_modalities", {}))
    except (OSError, ValueError):
        return {}


def _write_html(table, out: Path, conv: str, with_ref: bool, rules: str = DEFAULT_RULES) -> Path:
    head = "".join(f"<th>{r} mL</th>" for r in REGIONS)
    if with_ref:
        head += "".join(f"<th>{r} Dice</th><th>{r} HD95 mm</th>" for r in REGIONS)
    head += "<th>predicted without</th>"
    body = []
    for case_id, vols, metrics, png, miss in table:
        cells = "".join(f"<td>{vols[r]:.2f}</td>" for r in REGIONS)
        if with_ref:
            cells += "".join(f"<td>{metrics[r]['dice']:.3f}</td><td>{metrics[r]['hd95']:.1f}</td>"
                             if metrics else "<td>–</td><td>–</td>" for r in REGIONS)
        cells += f"<td>{html.escape(', '.join(miss)) or '–'}</td>"
        cid = html.escape(case_id)
        body.append(f"<tr><td><a href='#{cid}'>{cid}</a></td>{cells}</tr>")
    figs = "".join(f"<h3 id='{html.escape(c)}'>{html.escape(c)}</h3><img src='{html.escape(p)}'>"
                   for c, _, _, p, _ in table)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>medseg report</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
            "td:first-child{text-align:left}</style></head><body>"
            f"<h1>medseg report</h1><p>{len(table)} cases; labels {html.escape(conv)}. Overlay: "
            "edema green, necrosis/non-enhancing red, enhancing yellow. Cases predicted without some "
            "modalities say which. Scoring rules "
            f"<b>{html.escape(rules)}</b>: {html.escape(get_rules(rules).description)}.</p>"
            f"<table><tr><th>case</th>{head}</tr>{''.join(body)}</table>{figs}</body></html>")
    target = out / "index.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page)
    return target
