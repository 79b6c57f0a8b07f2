"""`medseg distill`: a light student learns from a cross-validated teacher.

    OUT/config.json, OUT/fold_<k>/..., OUT/cv_metrics.csv, OUT/cv_summary.json
        the student's cross-validation, exactly as `medseg cv` writes it: student
        fold k trains on fold k's training cases against a blend of their labels
        and teacher fold k's probabilities on them (``train.distill``), and is
        scored on fold k's held-out cases, which neither it nor its teacher saw
    OUT/final/checkpoints/final.pt
        the deployable student: every case, against the mean of every teacher fold
    OUT/final/oof_summary.json
        the out-of-fold scores of the recipe that trained it (the cv above)
    OUT/distill.json
        teacher, student, their out-of-fold scores side by side
    OUT/preprocessed/teacher_outputs/
        the teacher's stored outputs (`medseg.teacher`), computed once per case

The student keeps the teacher's preprocessing (spacing, channels, labels) and
training recipe (schedule, patch, augmentation, seed), with its own network; any
value can be changed with ``--set``. Re-running continues like `medseg cv`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from medseg.config import apply_overrides, experiment, load_config
from medseg.cv import run_cv
from medseg.data.io import write_json
from medseg.errors import MedsegError
from medseg.scoring import DEFAULT_RULES
from medseg.teacher import check_distill, open_teacher
from medseg.train import CHECKPOINT_DIR, DEFAULT_STORE, train_fold

__all__ = ["DEFAULT_STUDENT", "student_config", "run_distill", "format_comparison"]

#: The registry network a student is by default.
DEFAULT_STUDENT = "mobilenet_unet3d"


def _teacher_inputs(teacher_dir: Path, datalist, data_root) -> tuple[str, str]:
    """The datalist and data root of the student: given, or the teacher's."""
    summary = teacher_dir / "cv_summary.json"
    known = json.loads(summary.read_text()) if summary.is_file() else {}
    datalist = datalist or known.get("datalist")
    data_root = data_root or known.get("data_root")
    if not datalist or not data_root:
        raise MedsegError(f"teacher {teacher_dir}: its cv_summary.json does not name its "
                          f"{'datalist' if not datalist else 'data root'}; pass --datalist and --data-root "
                          "as given to the teacher's `medseg cv`")
    return str(datalist), str(data_root)


def student_config(teacher_dir: str | Path, student: str = DEFAULT_STUDENT, student_args: dict | None = None,
                   weight: float = 0.5, teacher_tta: bool = False, overrides: Sequence[str] = ()) -> dict:
    """The teacher's experiment with the student's network and ``train.distill`` set;
    then `overrides` (``KEY=VALUE``)."""
    teacher_dir = Path(teacher_dir).resolve()
    cfg = load_config(teacher_dir / "config.json")
    if cfg["train"]["distill"]["teacher"] is not None:
        raise MedsegError(f"teacher {teacher_dir} is itself a distilled student; distil from the cross-"
                          "validation of a model trained on labels")
    cfg["model"] = {"name": student, "args": dict(student_args or {})}
    cfg["train"]["deep_supervision"] = cfg["train"]["deep_supervision"] and student == "unet3d"
    cfg["train"]["grad_checkpoint"] = cfg["train"]["grad_checkpoint"] and student == "unet3d"
    cfg["train"]["init_from"] = None
    cfg["train"]["distill"] = {"teacher": str(teacher_dir), "weight": weight, "teacher_tta": bool(teacher_tta)}
    cfg = experiment(**apply_overrides(cfg, overrides))
    check_distill(cfg["train"]["distill"])
    return cfg


def _scores(summary: dict) -> dict:
    out = {}
    for r in summary["overall"]:
        block = summary["overall"][r]
        out[r] = {m: block[m]["mean"] for m in ("dice", "hd95", "iou") if m in block}
    return out


def run_distill(teacher_dir: str | Path, out_dir: str | Path, cfg: dict, datalist=None, data_root=None,
                folds: Sequence[int] | None = None, final: bool = True, device: str | None = None,
                rules: str = DEFAULT_RULES, print_fn: Callable[[str], None] = print) -> dict:
    """The student's cross-validation (and, with `final`, the deployable student) →
    the comparison written to ``distill.json``."""
    teacher_dir, out_dir = Path(teacher_dir).resolve(), Path(out_dir)
    teacher = open_teacher(teacher_dir)          # every fold present, before any work
    if Path(cfg["train"]["distill"]["teacher"] or "").resolve() != teacher_dir:
        raise MedsegError(f"the student config's train.distill.teacher ({cfg['train']['distill']['teacher']}) "
                          f"is not {teacher_dir}; build it with medseg.distill.student_config")
    datalist, data_root = _teacher_inputs(teacher_dir, datalist, data_root)
    print_fn(f"distilling {teacher_dir.name} ({teacher.metas[0]['network']['name']}, {len(teacher.checkpoints)} "
             f"folds) into {cfg['model']['name']} {cfg['model']['args']}: target = "
             f"{1 - cfg['train']['distill']['weight']:.2f} x labels + {cfg['train']['distill']['weight']:.2f} x teacher")
    summary = run_cv(cfg, datalist, data_root, out_dir, folds=folds, device=device, print_fn=print_fn,
                     rules=rules)
    t_summary = teacher_dir / "cv_summary.json"
    teacher_scores = _scores(json.loads(t_summary.read_text())) if t_summary.is_file() else None
    result = {"teacher": {"run": str(teacher_dir), "network": teacher.metas[0]["network"],
                          "folds": sorted(teacher.checkpoints), "cv_scores": teacher_scores},
              "student": {"network": cfg["model"], "distill": cfg["train"]["distill"],
                          "cv_scores": _scores(summary), "folds": summary["folds"]},
              "rules": summary["rules"], "final": None}
    if final:
        final_dir = out_dir / "final"
        if not (final_dir / "train_summary.json").exists():
            resume = (final_dir / CHECKPOINT_DIR / "last.pt").exists()
            print_fn("final student: every case, against the mean of every teacher fold")
            train_fold(cfg, datalist, data_root, None, final_dir, resume=resume, device=device,
                       print_fn=print_fn, cache_dir=out_dir / DEFAULT_STORE)
        write_json({**summary, "note": "out-of-fold scores of the cross-validation that used this recipe "
                    "(the fold students); this final student trained on every case, so it has no held-out "
                    "cases of its own"}, final_dir / "oof_summary.json")
        result["final"] = str(final_dir / CHECKPOINT_DIR / "final.pt")
    write_json(result, out_dir / "distill.json")
    return result


def format_comparison(result: dict) -> str:
    """Teacher vs student out-of-fold Dice / HD95, one line per region."""
    lines = [f"out-of-fold ({result['rules']})      Dice teacher  student   HD95 teacher  student"]
    t = result["teacher"]["cv_scores"] or {}
    s = result["student"]["cv_scores"]
    for r in s:
        td, sd = (t.get(r) or {}).get("dice"), s[r].get("dice")
        th, sh = (t.get(r) or {}).get("hd95"), s[r].get("hd95")
        f = (lambda v: "   n/a" if v is None else f"{v:6.3f}")
        lines.append(f"{r:<26}{f(td):>12}{f(sd):>9}{f(th):>13}{f(sh):>9}")
    return "\n".join(lines)
