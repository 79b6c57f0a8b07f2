"""`medseg report`: quality-control pages for radiologists.

For each predicted case: a PNG with axial, coronal and sagittal FLAIR and T1ce
slices through the tumour's centre, the mask overlaid (medseg's colour table,
`medseg.labels.CLASS_COLOURS`, with a legend: edema green, necrosis/NET red,
enhancing yellow) and, with references, a second
row showing the reference. An ``index.html`` shows the colour legend and lists
every case with its volumes (mL) per label and per region, lesion counts and the
largest lesion's size (`medseg.volumetry`, measured from the mask), the
uncertainty score and review flag that `medseg predict` recorded in
``predictions.json`` ("–" when absent; flagged rows stand out) and, with
references, Dice, IoU (per region and the case's mean over TC, WT, ET; voxel-wise,
with the rule set's Dice conventions for empty masks) and HD95. A raw scanner study (`medseg predict --raw`, its
``raw`` record in ``predictions.json``) also gets a column with its QC picture
(``<pred>/qc/<case>.png``, copied to ``<out>/qc/`` so the report folder stands
alone and linked from its row), its review state with the reasons, and the brain
extractor and atlas that ran; its mask lies on a native series' grid, so its
picture shows that series (``atlas_space/<case>/native/``) when the ``--images``
(the atlas-space cases) are on the atlas grid. Needs matplotlib (the ``viz`` extra).
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from urllib.parse import quote

import nibabel as nib
import numpy as np

from medseg.data.discover import discover
from medseg.data.inputs import read_manifest
from medseg.data.io import atomic_path, load_array, load_header
from medseg.errors import MedsegError
from medseg.evaluate import evaluate_case, references
from medseg.labels import CLASS_COLOURS, CLASS_NAMES, REGIONS, detect_task, get_convention, get_task
from medseg.metrics import mean_iou
from medseg.scoring import DEFAULT_RULES, get_rules
from medseg.volumetry import case_volumetry

__all__ = ["make_report", "REGION_COLOURS", "legend"]

#: RGBA overlay colour of each class (edema, necrosis/NET, enhancing tumour, resection
#: cavity, cystic component): medseg's one colour table, half transparent.
REGION_COLOURS = {k: (*(c / 255 for c in v), 0.55) for k, v in CLASS_COLOURS.items()}


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


def _overlay(labels: np.ndarray, conv) -> np.ndarray:
    """`(X, Y)` label slice in `conv` → `(X, Y, 4)` RGBA, each class in its colour."""
    rgba = np.zeros((*labels.shape, 4), np.float32)
    for v, cls in conv.classes().items():
        rgba[labels == v] = REGION_COLOURS[cls]
    return rgba


def _slices(vol: np.ndarray, c: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through `c`, oriented for display (anterior up)."""
    if vol.ndim == 4:
        return [np.stack([_slices(v, c)[i] for v in vol]) for i in range(3)]
    return [np.rot90(vol[:, :, c[2]]), np.rot90(vol[:, c[1], :]), np.rot90(vol[c[0], :, :])]


def _case_png(images: dict[str, np.ndarray], rows: list[tuple[str, np.ndarray]], target: Path,
              title: str, conv) -> None:
    """Slices of `images` through the lesion's centre with each row's `(X, Y, Z)` label
    map (prediction, reference) drawn over them in the class colours of `conv`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    wt = rows[0][1] > 0
    c = tuple(int(v) for v in np.argwhere(wt).mean(0)) if wt.any() else \
        tuple(s // 2 for s in wt.shape)
    names = list(images)
    fig, axes = plt.subplots(len(rows) * len(names), 3, figsize=(9, 3 * len(rows) * len(names)),
                             squeeze=False)
    for r, (label, labels) in enumerate(rows):
        ov = _slices(labels, c)
        for m, name in enumerate(names):
            img = images[name]
            lo, hi = np.percentile(img[img > 0], (1, 99.5)) if (img > 0).any() else (0, 1)
            for j, (sl, view) in enumerate(zip(_slices(img, c), ("axial", "coronal", "sagittal"))):
                ax = axes[r * len(names) + m, j]
                ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi)
                ax.imshow(_overlay(ov[j], conv))
                ax.set_title(f"{label}: {name} {view}", fontsize=8)
                ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    legend(fig, tuple(dict.fromkeys(conv.classes().values())))
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)


def make_report(pred: str | Path, images: str | Path, out: str | Path,
                ref: str | Path | None = None, convention: str | None = None,
                rules: str | None = None, task: str | None = None) -> Path:
    """Write ``out/index.html`` and one PNG per predicted case (Dice, IoU with the
    case's mean IoU, and HD95 scored under the rule set `rules`, named on the page) on
    the regions of `task` (default: the model's, recorded in ``predictions.json``, else
    the task the labels detect; `rules` None: the task's); returns the HTML path."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MedsegError("medseg report needs matplotlib: pip install 'medseg[viz]'") from None
    pred, out = Path(pred), Path(out)
    ds = discover(images)
    refs, conv = references(Path(ref), convention) if ref else ({}, convention)
    manifest = read_manifest(pred)
    # The masks' own convention, as `medseg predict` recorded it (it may differ from
    # the folder's when predicted with --convention).
    conv = conv or manifest.get("label_convention")
    if conv is None:
        from medseg.data.discover import resolve_convention
        conv = resolve_convention(ds)[0].name if ds.training else \
            {"brats2021": "brats2021", "msd": "msd"}.get(ds.layout.name, "brats2023")
    task = task or (manifest.get("run") or {}).get("task") or detect_task(conv)[0].name
    t = get_task(task)
    rules = rules or t.rules
    get_rules(rules)
    cv = get_convention(conv)
    chans = list(ds.layout.channels)
    cases = [c for c in ds.cases if (pred / f"{c.case_id}.nii.gz").is_file()]
    missing = dict(manifest.get("missing_modalities") or {})
    records = manifest.get("cases") or {}
    if not cases:
        raise MedsegError(f"--pred {pred}: no <case_id>.nii.gz matches a case of --images {images}")
    table = []
    for case in cases:
        mask_path = pred / f"{case.case_id}.nii.gz"
        mimg = load_header(mask_path)
        labels = load_array(mask_path, mimg)
        volumes = case_volumetry(labels, mimg.affine, conv, str(mask_path), task=t)
        record = records.get(case.case_id) or {}
        raw = record.get("raw") if isinstance(record, dict) and isinstance(record.get("raw"), dict) else None
        shown = {}
        # FLAIR and T1ce, or the modalities the case has when one of them is missing.
        present = [c for c in chans if c not in case.missing]
        for name in [c for c in ("flair", "t1ce", "t2", "t1") if c in present][:2]:
            if len(case.images) == 1:       # MSD: one 4D file
                path, arr = case.images[0], load_array(case.images[0])[..., chans.index(name)]
            else:
                path = case.images[present.index(name)]
                arr = load_array(path)
            if arr.shape != labels.shape:
                # A raw study's mask lies on its reference series' native grid, not
                # on the atlas grid of its atlas-space case: show that series.
                native = _native_reference(raw, pred, case.case_id, labels.shape) if raw else None
                if native is None:
                    raise MedsegError(f"{mask_path}: grid {labels.shape} does not match the image "
                                      f"{path} {arr.shape}")
                shown = {native[0]: _canonical(native[1], mimg.affine)}
                break
            shown[name.upper()] = _canonical(arr, mimg.affine)
        rows = [("prediction", _canonical(labels, mimg.affine))]
        metrics = None
        if case.case_id in refs:
            rlab = load_array(refs[case.case_id], dtype=np.int16)
            rows.append(("reference", _canonical(rlab, mimg.affine)))
            metrics = evaluate_case(mask_path, refs[case.case_id], conv, rules, t)
        png = out / f"{case.case_id}.png"
        _case_png(shown, rows, png, case.case_id, cv)
        table.append({"id": case.case_id, "volumes": volumes, "metrics": metrics, "png": png.name,
                      "missing": missing.get(case.case_id, []),
                      "uncertainty": record.get("uncertainty") if isinstance(record, dict) else None,
                      "raw": _raw_entry(raw, pred, out, case.case_id) if raw else None})
    return _write_html(table, out, conv, bool(refs), rules, t)


def _native_reference(raw: dict, pred: Path, case_id: str,
                      shape: tuple[int, ...]) -> tuple[str, np.ndarray] | None:
    """A raw study's reference series on its native grid (the mask's grid), written by
    `medseg predict --raw` beside its atlas-space case → (its name, its voxels); None
    when it is not there or not on a grid of `shape`."""
    role = raw.get("reference") if isinstance(raw.get("reference"), str) else "t1ce"
    folders = [Path(raw["atlas_case"])] if isinstance(raw.get("atlas_case"), str) else []
    folders.append(pred / "atlas_space" / case_id)
    for folder in folders:
        path = folder / "native" / f"series_{role}_grid.nii.gz"
        if path.is_file():
            arr = load_array(path)
            if arr.shape == tuple(shape):
                return f"{role.upper()} (native series)", arr
    return None


def _raw_entry(raw: dict, pred: Path, out: Path, case_id: str) -> dict:
    """What the report shows of a raw study: its QC picture (copied from
    ``<pred>/qc/<case>.png`` into ``<out>/qc/``; None when there is none), review
    state and reasons, brain extractor and atlas."""
    qc = raw.get("qc") if isinstance(raw.get("qc"), dict) else {}
    reasons = raw.get("review_reasons")
    if not isinstance(reasons, list):
        reasons = qc.get("review_reasons") if isinstance(qc.get("review_reasons"), list) else []
    review = raw.get("review")
    src, picture = pred / "qc" / f"{case_id}.png", None
    if src.is_file():
        dst = out / "qc" / src.name
        if not (dst.exists() and dst.resolve() == src.resolve()):
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        picture = f"qc/{src.name}"
    return {"picture": picture, "review": review if isinstance(review, bool) else bool(reasons),
            "reasons": [str(r) for r in reasons], "extractor": raw.get("brain_extractor"),
            "atlas": raw.get("atlas")}


def _qc_link(e: dict) -> str:
    """Below a raw study's picture: the link to its QC picture ("" for other cases)."""
    r = e.get("raw")
    if not (r and r["picture"]):
        return ""
    return f"<p><a class='qc' href='{html.escape(quote(r['picture']))}'>raw study QC picture</a></p>"


def _raw_cell(r: dict | None) -> str:
    """The raw-study cell: QC picture link, review state (reasons), extractor and atlas."""
    if r is None:
        return "<td>–</td>"
    link = (f"<a class='qc' href='{html.escape(quote(r['picture']))}'>QC picture</a>" if r["picture"]
            else "no QC picture")
    if r["review"]:
        state = ("<span class='flag' title='accepted with --accept-review'>REVIEW</span>"
                 + "".join(f"<div class='reason'>{html.escape(x)}</div>" for x in r["reasons"]))
    else:
        state = "<span class='ok'>QC passed</span>"
    info = " · ".join(f"{k} {html.escape(str(r[key]))}" for k, key in
                      (("brain extractor", "extractor"), ("atlas", "atlas")) if r.get(key))
    return f"<td class='raw'>{link} {state}<div class='sub'>{info}</div></td>"


_CSS = ("body{font-family:system-ui,sans-serif;margin:20px;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:12px 0}"
        "th,td{padding:3px 7px;text-align:right;border-bottom:1px solid #ddd}"
        "th{background:#f2f2f2;text-align:center;font-weight:600}"
        "td:first-child,th:first-child{text-align:left}td:first-child,tr.cols th{white-space:nowrap}"
        "tr.flagged td{background:#fde7e7}"
        ".flag{background:#c62828;color:#fff;font-weight:700;padding:1px 7px;border-radius:3px}"
        ".ok{color:#2e7d32}"
        ".sw{display:inline-block;width:12px;height:12px;margin-right:4px;border:1px solid #444;"
        "vertical-align:-1px}"
        ".sub{font-size:11px;color:#666;white-space:nowrap}"
        "ul.legend{list-style:none;padding:0;margin:6px 0}ul.legend li{display:inline-block;margin-right:20px}"
        "img{max-width:100%}"
        "td.raw{text-align:left}.reason{font-size:11px;color:#8e0000;white-space:normal;max-width:28em}")


def _swatch(cls: str) -> str:
    r, g, b = CLASS_COLOURS[cls]
    return f"<span class='sw' style='background:rgb({r},{g},{b})'></span>"


def _legend_html(conv: str) -> str:
    """The overlay colours with the convention's names and values (the colours of
    the `--viewer-files` too)."""
    c = get_convention(conv)
    items = [f"<li>{_swatch(cls)}<b>{html.escape(c.names[v])}</b> (label {v}): "
             f"{html.escape(CLASS_NAMES[cls])}</li>"
             for v, cls in c.classes().items()]
    return f"<ul class='legend'>{''.join(items)}</ul>"


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fmt(x, spec: str) -> str:
    v = _num(x)
    return "–" if v is None else format(v, spec)


def _uncertainty_cells(u) -> tuple[str, bool]:
    """The uncertainty and review cells of a case's record ``{"score": {TC, WT, ET},
    "case_score", "review", "threshold"}`` ("–" when absent), and whether it is flagged."""
    if not isinstance(u, dict):
        return "<td>–</td><td>–</td>", False
    per = u.get("score") if isinstance(u.get("score"), dict) else {}
    detail = " · ".join(f"{r} {_fmt(v, '.3f')}" for r, v in per.items())
    cell = f"<td>{_fmt(u.get('case_score'), '.3f')}<div class='sub'>{detail}</div></td>"
    thr = _num(u.get("threshold"))
    title = f" title='review when the case score is ≥ {thr:.3f}'" if thr is not None else ""
    if u.get("review") is True:
        return cell + f"<td{title}><span class='flag'>REVIEW</span></td>", True
    if u.get("review") is False and thr is not None:
        return cell + f"<td{title}><span class='ok'>no</span></td>", False
    # Scored without a review threshold: nothing could be flagged.
    return cell + "<td title='no review threshold'>–</td>", False


def _review(e: dict) -> bool:
    """Whether a case stands out for review: flagged by its uncertainty, or a raw
    study that failed QC (predicted with --accept-review)."""
    return _uncertainty_cells(e["uncertainty"])[1] or bool((e.get("raw") or {}).get("review"))


def _row(e: dict, names: list[str], with_ref: bool, with_raw: bool = False, task=None) -> str:
    vol, m = e["volumes"], e["metrics"]
    outputs, scored = (task.outputs, task.scored) if task is not None else (REGIONS, REGIONS)
    big = vol["largest"]["WT"]
    cells = "".join(f"<td>{vol['labels'][n]:.2f}</td>" for n in names)
    cells += "".join(f"<td>{vol['regions'][r]:.2f}</td>" for r in outputs)
    cells += "".join(f"<td>{vol['lesions'][r]}</td>" for r in outputs)
    cells += ("<td>–</td>" if big is None else
              "<td>" + " × ".join(f"{v:.0f}" for v in big["extent_mm"]) + "</td>")
    unc, _ = _uncertainty_cells(e["uncertainty"])
    cells += unc
    if with_ref:
        cells += "".join(f"<td>{_fmt(m[r]['dice'], '.3f')}</td>" if m else "<td>–</td>" for r in scored)
        cells += "".join(f"<td>{_fmt(m[r]['iou'], '.3f')}</td>" if m else "<td>–</td>" for r in scored)
        cells += f"<td>{_fmt(mean_iou(m), '.3f')}</td>" if m else "<td>–</td>"
        cells += "".join(f"<td>{_fmt(m[r]['hd95'], '.1f')}</td>" if m else "<td>–</td>" for r in scored)
    cells += f"<td>{html.escape(', '.join(e['missing'])) or '–'}</td>"
    if with_raw:
        cells += _raw_cell(e.get("raw"))
    cid = html.escape(e["id"])
    return f"<tr{' class=flagged' if _review(e) else ''}><td><a href='#{cid}'>{cid}</a></td>{cells}</tr>"


def _write_html(table: list[dict], out: Path, conv: str, with_ref: bool, rules: str = DEFAULT_RULES,
                task=None) -> Path:
    c = get_convention(conv)
    task = task if task is not None else detect_task(conv)[0]
    no, ns = len(task.outputs), len(task.scored)
    names = [c.names[v] for v in c.classes()]
    raws = [e["raw"] for e in table if e.get("raw")]
    groups = [("volume per label, mL", len(names)), ("volume per region, mL", no),
              ("lesions (26-connected)", no), ("largest WT lesion, mm", 1), ("uncertainty", 1),
              ("review", 1)] + ([("Dice", ns), ("IoU", ns + 1), ("HD95, mm", ns)] if with_ref else []) \
        + [("predicted without", 1)] \
        + ([("raw study", 1)] if raws else [])
    top = "<th rowspan=2>case</th>" + "".join(f"<th colspan={n}>{g}</th>" for g, n in groups)
    sub = "".join(f"<th>{_swatch(cls)}{html.escape(c.names[v])}</th>" for v, cls in c.classes().items())
    sub += "".join(f"<th>{r}</th>" for r in task.outputs) * 2
    sub += "<th>RL × AP × SI</th><th>case score</th><th>flag</th>"
    if with_ref:
        sub += ("".join(f"<th>{r}</th>" for r in task.scored) * 2 + "<th>mean</th>"
                + "".join(f"<th>{r}</th>" for r in task.scored))
    sub += "<th>modalities</th>"
    sub += "<th>QC, review, brain extractor, atlas</th>" if raws else ""
    flagged = sum(_uncertainty_cells(e["uncertainty"])[1] for e in table)
    scored = sum(isinstance(e["uncertainty"], dict) for e in table)
    thresholds = sorted({f"{t:.3f}" for e in table if isinstance(e["uncertainty"], dict)
                         for t in [_num(e["uncertainty"].get("threshold"))] if t is not None})
    review = (f"<b>{flagged} of {scored}</b> scored case(s) flagged for review (uncertainty case score ≥ "
              f"the threshold chosen on cross-validation: {', '.join(thresholds)})." if thresholds else
              f"{scored} case(s) scored for uncertainty, without a review threshold: none flagged." if scored
              else "No uncertainty in predictions.json: uncertainty and review show –.")
    if raws:
        review += (f" {len(raws)} raw scanner stud{'y' if len(raws) == 1 else 'ies'} (medseg predict --raw): "
                   "the raw study column links each one's QC picture (registration edges, brain outline, "
                   f"mask on the native series); <b>{sum(r['review'] for r in raws)}</b> failed QC "
                   "(predicted with --accept-review: REVIEW, with the reasons).")
    rows = "".join(_row(e, names, with_ref, bool(raws), task) for e in table)
    figs = "".join(f"<h3 id='{html.escape(e['id'])}'>{html.escape(e['id'])}"
                   f"{' <span class=flag>REVIEW</span>' if _review(e) else ''}"
                   f"</h3><img src='{html.escape(e['png'])}'>{_qc_link(e)}" for e in table)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>medseg report</title>"
            f"<style>{_CSS}</style></head><body>"
            f"<h1>medseg report</h1><p>{len(table)} cases; labels {html.escape(conv)}. {review} "
            "Volumes: voxels × voxel volume; lesions: connected components of each region (voxels "
            "touching by a face, edge or corner); largest lesion: its extent along the scanner axes "
            "(right–left, anterior–posterior, superior–inferior). Cases predicted without some "
            "modalities say which. Scoring rules "
            f"<b>{html.escape(rules)}</b>: {html.escape(get_rules(rules).description)}."
            + (" IoU (Jaccard, |P∩R|/|P∪R|), which the rule sets do not define: voxel-wise over the "
               "whole image, with the rule set's Dice conventions for empty masks; mean: the case's "
               "mean over TC, WT and ET." if with_ref else "") + "</p>"
            f"{_legend_html(conv)}"
            f"<table><tr>{top}</tr><tr class=cols>{sub}</tr>{rows}"
            f"</table>{figs}</body></html>")
    target = out / "index.html"
    with atomic_path(target) as tmp:
        tmp.write_text(page)
    return target
