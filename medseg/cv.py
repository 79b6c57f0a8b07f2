"""K-fold cross-validation: train each fold, predict its held-out cases on their
input grids, evaluate, summarise.

    runs/<exp>/config.json                 resolved experiment config
    runs/<exp>/fold_<k>/...                `medseg train` outputs (checkpoints, logs)
    runs/<exp>/fold_<k>/predictions/<case>.nii.gz   out-of-fold masks
    runs/<exp>/fold_<k>/metrics.csv        per case × region (Dice, IoU, HD95, …, mean IoU)
    runs/<exp>/cv_metrics.csv              all folds
    runs/<exp>/cv_summary.json             mean ± std (median) per region, per fold and overall

Re-running continues: a fold with ``train_summary.json`` is not retrained, an
interrupted one resumes from its last checkpoint, a fold with ``metrics.csv``
is not re-predicted. Out-of-fold masks come from the *final* checkpoint, not the
best-on-validation one: choosing a checkpoint on the held-out cases would bias
their scores upwards (nnU-Net does the same).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable, Sequence

import numpy as np

from medseg.config import config_hash, experiment
from medseg.data.folds import datalist_task, load_datalist
from medseg.data.io import write_json
from medseg.errors import MedsegError
from medseg.evaluate import (evaluate_case, format_table, metric_rows, read_rows, rules_of,
                             summarize, write_rows)
from medseg.infer import Predictor
from medseg.labels import get_task
from medseg.scoring import CASE_METRICS, DEFAULT_RULES, describe_rules, get_rules, rule_metrics
from medseg.train import CHECKPOINT_DIR, DEFAULT_STORE, fold_data, prepare_store, train_fold, with_task

__all__ = ["run_cv", "evaluate_fold", "format_summary", "choose_et_threshold"]


#: Seconds a stopped fold's trainer gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
#: Seconds between checks of the running trainers.
POLL_S = 0.5


def _train_command(cfg_path: Path, datalist, data_root, fold: int, fold_dir: Path, device: str,
                   resume: bool) -> list[str]:
    """The `medseg train` command line of one fold (a separate function so tests can
    substitute a cheap child process). Every fold reads the experiment's one
    preprocessed dataset."""
    cmd = [sys.executable, "-m", "medseg", "train", "--config", str(cfg_path),
           "--datalist", str(datalist), "--data-root", str(data_root), "--fold", str(fold),
           "--out", str(fold_dir), "--device", device,
           "--cache-dir", str(fold_dir.parent / DEFAULT_STORE)]
    return cmd + ["--resume"] if resume else cmd


def _stop_children(children: list[tuple[subprocess.Popen, IO]], grace_s: float = STOP_GRACE_S) -> None:
    """Terminate (SIGTERM), wait up to `grace_s`, then SIGKILL what is left; reap every
    child and close its log. A second Ctrl-C during the wait skips to SIGKILL."""
    try:
        for proc, _ in children:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc, _ in children:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc, log in children:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()


def _train_folds_parallel(folds: list[int], devices: Sequence[str], cfg_path: Path, datalist, data_root,
                          out_dir: Path, print_fn) -> None:
    """One `medseg train` process per fold, at most one per entry of `devices` at a
    time (list a device twice to train two folds on it at once).

    When a fold fails, or on Ctrl-C or any other error, the other trainers are stopped
    (SIGTERM, then SIGKILL after STOP_GRACE_S) and reaped before the error propagates:
    none is left running to collide with a rerun in the same fold folder.
    """
    pending = list(folds)
    running: dict[int, tuple[int, subprocess.Popen, IO]] = {}   # slot → (fold, process, log)
    try:
        while pending or running:
            for slot, dev in enumerate(devices):
                if slot not in running and pending:
                    k = pending.pop(0)
                    fold_dir = out_dir / f"fold_{k}"
                    cmd = _train_command(cfg_path, datalist, data_root, k, fold_dir, dev,
                                         resume=(fold_dir / CHECKPOINT_DIR / "last.pt").exists())
                    fold_dir.mkdir(parents=True, exist_ok=True)
                    log = open(fold_dir / "train.log", "a")
                    try:
                        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
                    except BaseException:
                        log.close()
                        raise
                    running[slot] = (k, proc, log)
                    print_fn(f"fold {k}: training on {dev} (log {fold_dir / 'train.log'})")
            time.sleep(POLL_S)
            for slot, (k, proc, log) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    log.close()
                    if proc.returncode != 0:
                        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                               else f"exit {proc.returncode}")
                        raise MedsegError(
                            f"fold {k} training failed on {devices[slot]} ({how}); see "
                            f"{out_dir / f'fold_{k}' / 'train.log'}; any other fold still training was "
                            "stopped: fix the cause and rerun the same command to resume")
    except BaseException:
        _stop_children([(proc, log) for _, proc, log in running.values()])
        raise


def evaluate_fold(fold: int, datalist: str | Path, data_root: str | Path, fold_dir: str | Path,
                  checkpoint: str | Path | None = None, device: str | None = None,
                  print_fn: Callable[[str], None] = print, rules: str | None = None) -> list[dict]:
    """Predict the held-out cases of `fold` with `checkpoint` (default: the fold's
    ``checkpoints/final.pt``) onto their own grids and score them on the regions the
    model's task scores, under the rule set `rules` (None: the task's): writes ``predictions/<case>.nii.gz``, ``metrics.csv`` and ``summary.json``
    in `fold_dir`; returns the metric rows. Results newer than the checkpoint are
    reused (a resumed cross-validation) when they were scored under the same rules
    and have every column those rules write; a newer checkpoint is evaluated afresh,
    other rules (or rows written before a column existed, e.g. ``iou``) re-score the
    masks."""
    fold_dir = Path(fold_dir)
    ckpt = Path(checkpoint) if checkpoint else fold_dir / CHECKPOINT_DIR / "final.pt"
    if not ckpt.is_file():
        raise MedsegError(f"fold {fold}: no checkpoint {ckpt}; train the fold first (`medseg train "
                          f"--fold {fold}` or the bundle's `run training --fold {fold}`)")
    predictor = Predictor([ckpt], device=device)
    task = get_task(predictor.spec.task)
    rules = rules or task.rules
    columns = rule_metrics(get_rules(rules)) + CASE_METRICS
    stamp = ckpt.stat().st_mtime
    metrics_csv = fold_dir / "metrics.csv"
    if metrics_csv.exists() and metrics_csv.stat().st_mtime >= stamp:
        old = read_rows(metrics_csv)
        if (rules_of(old) == rules and all(m in row for row in old for m in columns)
                and {row["region"] for row in old} == set(task.scored)):
            return old
    data = fold_data(datalist, data_root, fold, task.name)
    if not data.val:
        raise MedsegError(f"fold {fold}: {datalist} has no cases in this fold to evaluate")
    rows = []
    for case in data.val:
        target = fold_dir / "predictions" / f"{case['id']}.nii.gz"
        # Written atomically: an existing mask newer than the checkpoint is complete.
        if not (target.exists() and target.stat().st_mtime >= stamp):
            images = case["image"] if isinstance(case["image"], list) else [case["image"]]
            predictor.predict_case(images, target, data.convention, data.channels)
        rows += metric_rows(case["id"], evaluate_case(target, case["label"], data.convention, rules, task),
                            rules=rules, fold=fold)
    write_rows(rows, metrics_csv)
    overall = summarize(rows)
    write_json({"fold": fold, "checkpoint": str(ckpt), "cases": len(data.val), "rules": rules,
                "task": task.name, "overall": overall}, fold_dir / "summary.json")
    dice = {r: overall[r]["dice"]["mean"] for r in task.scored}
    miou = overall[task.scored[0]]["mean_iou"]["mean"]
    print_fn(f"fold {fold}: {len(data.val)} held-out cases predicted; Dice ({rules}) "
             + "  ".join(f"{r} {dice[r] if dice[r] is not None else float('nan'):.3f}"
                         for r in task.scored)
             + f"; mean IoU {miou if miou is not None else float('nan'):.3f}")
    return rows


#: Candidate ET relabelling thresholds (mL) tried on the out-of-fold predictions.
ET_THRESHOLDS_ML = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def choose_et_threshold(rows: list[dict], candidates: Sequence[float] = ET_THRESHOLDS_ML) -> dict:
    """The ET relabelling threshold (of `candidates`) that maximises out-of-fold mean
    ET Dice.

    Exact from the metrics rows alone: relabelling a case's ET (predicted volume
    below t) makes its ET Dice 1 if the reference has no ET, else 0; cases above
    t keep their Dice. Ties go to the smaller threshold. A task without ET
    relabelling (`Task.et_relabel`, metastases) passes ``(0.0,)``.
    """
    et = [r for r in rows if r["region"] == "ET"]
    scores = {}
    for t in candidates:
        d = [(1.0 if r["vol_ref_ml"] == 0 else 0.0) if 0 < r["vol_pred_ml"] < t else r["dice"]
             for r in et]
        scores[t] = float(np.mean(d)) if d else 0.0
    best = max(candidates, key=lambda t: (round(scores[t], 9), -t))
    return {"et_min_ml": best, "et_dice_by_threshold": {str(t): v for t, v in scores.items()},
            "chosen_on": f"{len(et)} out-of-fold cases"}


def run_cv(cfg: dict, datalist: str | Path, data_root: str | Path, out_dir: str | Path,
           n_folds: int | None = None, folds: Sequence[int] | None = None,
           devices: Sequence[str] | None = None, device: str | None = None,
           print_fn: Callable[[str], None] = print, rules: str | None = None) -> dict:
    """Run (or continue) the cross-validation of the experiment's task (``data.task``;
    None: the datalist's, `medseg.data.folds.datalist_task`), scoring out-of-fold cases
    under the rule set `rules` (None: the task's); returns the summary written to
    ``cv_summary.json``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    dl = load_datalist(datalist)
    k_total = dl["num_folds"]
    if n_folds is not None and n_folds < 2:
        raise MedsegError(f"--folds {n_folds}: cross-validation needs at least 2 folds; to train one "
                          f"model on every case, run `medseg train --datalist {datalist} --data-root "
                          f"{data_root} --out DIR` without --fold")
    if n_folds is not None and n_folds != k_total:
        raise MedsegError(f"--folds {n_folds}: the datalist {datalist} was split into {k_total} "
                          f"folds; use --folds {k_total} or write a {n_folds}-fold split with "
                          f"`medseg data split --folds {n_folds}`")
    todo = list(range(k_total)) if not folds else sorted(set(folds))
    bad = [k for k in todo if not 0 <= k < k_total]
    if bad:
        raise MedsegError(f"--fold {bad[0]}: the datalist {datalist} has folds 0..{k_total - 1}")
    # Every input is checked before anything is created: a wrong --data-root must
    # not leave an experiment folder behind.
    for k in todo:
        fold_data(datalist, data_root, k, cfg["data"].get("task"))
    task, why = datalist_task(dl, cfg["data"].get("task"), str(datalist))
    cfg = with_task(cfg, task.name)
    rules = rules or task.rules
    rule_set = get_rules(rules)
    print_fn(f"task {task.name} ({why}): outputs {', '.join(task.outputs)}; scored on "
             f"{', '.join(task.scored)} under {rules}")
    cfg_path = out_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if isinstance(old, dict) and set(old) == set(cfg):
            old = experiment(**old)          # an older config: its later keys filled in
            if old["data"].get("task") is None:     # written before tasks: its task was this one
                old = with_task(old, task.name)
        if old != cfg:
            raise MedsegError(f"{out_dir} holds a cross-validation with another configuration "
                              f"({cfg_path}, hash {config_hash(old)} vs {config_hash(cfg)}); "
                              "re-run with the same options or choose another --out")
    write_json(cfg, cfg_path)

    unfinished = [k for k in todo if not (out_dir / f"fold_{k}" / "train_summary.json").exists()]
    for k in todo:
        if k not in unfinished:
            print_fn(f"fold {k}: already trained, skipping")
    if unfinished:
        # Once for the experiment, before any fold: folds (and parallel trainers) share it.
        prepare_store(cfg, fold_data(datalist, data_root, None), out_dir / DEFAULT_STORE, print_fn)
    if devices and len(devices) > 1 and unfinished:
        _train_folds_parallel(unfinished, devices, cfg_path, datalist, data_root, out_dir, print_fn)
    else:
        t_train = time.perf_counter()
        for n, k in enumerate(unfinished, 1):
            fold_dir = out_dir / f"fold_{k}"
            resume = (fold_dir / CHECKPOINT_DIR / "last.pt").exists()
            train_fold(cfg, datalist, data_root, k, fold_dir, resume=resume,
                       device=(devices[0] if devices else device), print_fn=print_fn,
                       cache_dir=out_dir / DEFAULT_STORE)
            per_fold = (time.perf_counter() - t_train) / n
            left = len(unfinished) - n
            print_fn(f"fold {k} trained: {n}/{len(unfinished)} folds in {(time.perf_counter() - t_train) / 60:.1f} min"
                     + (f"; about {left * per_fold / 60:.1f} min of training left for {left} fold(s)"
                        if left else ""))

    rows = []
    for k in todo:
        rows += evaluate_fold(k, datalist, data_root, out_dir / f"fold_{k}", device=device,
                              print_fn=print_fn, rules=rules)
    write_rows(rows, out_dir / "cv_metrics.csv")
    summary = {
        "datalist": str(datalist), "data_root": str(Path(data_root).resolve()), "folds": todo, "num_folds": k_total,
        "cases": len({r["case"] for r in rows}),
        "checkpoint": "final (out-of-fold cases never choose the checkpoint)",
        "task": task.to_dict(), "rules": rules, "metric_conventions": rule_set.description,
        "rule_set": describe_rules(rule_set),
        "overall": summarize(rows),
        "per_fold": {str(k): summarize([r for r in rows if int(r["fold"]) == k]) for k in todo},
        "seconds_this_run": time.perf_counter() - t0,
    }
    # The ET threshold is a model property, chosen under "both empty → Dice 1" whatever
    # the rules (Dice of non-empty masks is the same under every rule set; brats-eval's
    # NaN for both empty would leave nothing to gain from removing a spurious ET).
    post = choose_et_threshold([{**r, "dice": 1.0} if r["vol_pred_ml"] == 0 == r["vol_ref_ml"]
                                else r for r in rows], ET_THRESHOLDS_ML if task.et_relabel else (0.0,))
    if not task.et_relabel:
        post["why"] = f"task {task.name}: a small ET is a lesion, never relabelled"
    summary["postprocessing"] = post
    write_json(post, out_dir / "postprocessing.json")
    write_json(summary, out_dir / "cv_summary.json")
    return summary


def format_summary(summary: dict) -> str:
    """The table printed at the end of `medseg cv`."""
    folds = [(f"fold {k}", block) for k, block in summary["per_fold"].items()]
    return (format_table(summary["overall"], folds, summary.get("rules", DEFAULT_RULES))
            + f"\nout-of-fold, {summary['cases']} cases, folds {summary['folds']}")
