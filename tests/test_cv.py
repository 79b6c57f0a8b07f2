"""Cross-validation on tiny data: outputs, masks on the input grids, continuation,
fold subsets, parallel fold training, and option errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from medseg import cv
from medseg.cli import main
from medseg.config import resolve_config
from medseg.cv import format_summary, run_cv
from medseg.data.folds import load_datalist
from medseg.errors import MedsegError

from conftest import TINY_TRAIN


def cfg():
    return resolve_config("cpu", TINY_TRAIN)


def quiet(s):
    pass


def test_cv_writes_oof_masks_on_input_grids_and_summary(split, tmp_path):
    dl, root = split("brats2023", cases=6, folds=2)
    out = tmp_path / "exp"
    summary = run_cv(cfg(), dl, root, out, n_folds=2, print_fn=quiet)
    entries = load_datalist(dl)["training"]
    assert summary["cases"] == len(entries) == 6
    with open(out / "cv_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 * 3 and {r["region"] for r in rows} == {"TC", "WT", "ET"}
    saved = json.loads((out / "cv_summary.json").read_text())
    assert set(saved["overall"]) == {"TC", "WT", "ET"} and set(saved["per_fold"]) == {"0", "1"}
    for r in ("TC", "WT", "ET"):
        dices = [float(x["dice"]) for x in rows if x["region"] == r]
        assert saved["overall"][r]["dice"]["mean"] == pytest.approx(np.mean(dices), abs=1e-5)
    orientations = set()
    for e in entries:
        mask = out / f"fold_{e['fold']}" / "predictions" / f"{e['id']}.nii.gz"
        ref = nib.load(root / e["label"])
        got = nib.load(mask)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)
        assert got.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2, 3}
        orientations.add(nib.aff2axcodes(ref.affine))
    assert len(orientations) > 1, "the tiny dataset should mix orientations"
    assert "Dice" in format_summary(summary) and "HD95" in format_summary(summary)


@pytest.mark.slow   # 8-20 s on 2 cores: `make test-slow`
def test_cv_rerun_skips_finished_folds(split, tmp_path):
    dl, root = split("brats2023", cases=6, folds=2)
    out = tmp_path / "exp"
    first = run_cv(cfg(), dl, root, out, print_fn=quiet)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    lines: list[str] = []
    second = run_cv(cfg(), dl, root, out, print_fn=lines.append)
    assert sum("already trained" in s for s in lines) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps
    assert first["overall"] == second["overall"]
    # An unfinished fold (no summary, no metrics) is resumed and completed.
    (out / "fold_1" / "train_summary.json").unlink()
    (out / "fold_1" / "metrics.csv").unlink()
    third = run_cv(cfg(), dl, root, out, print_fn=quiet)
    assert third["overall"] == first["overall"]


def test_cv_fold_subset_msd_layout(split, tmp_path):
    dl, root = split("msd", cases=6, folds=2)
    out = tmp_path / "exp"
    summary = run_cv(cfg(), dl, root, out, folds=[1], print_fn=quiet)
    assert summary["folds"] == [1]
    assert not (out / "fold_0").exists()
    n1 = sum(e["fold"] == 1 for e in load_datalist(dl)["training"])
    assert summary["cases"] == n1
    e = next(e for e in load_datalist(dl)["training"] if e["fold"] == 1)
    mask = nib.load(out / "fold_1" / "predictions" / f"{e['id']}.nii.gz")
    assert mask.shape == nib.load(root / e["image"]).shape[:3]
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_cv_parallel_devices(split, tmp_path):
    dl, root = split("brats2023", cases=6, folds=2)
    out = tmp_path / "exp"
    summary = run_cv(cfg(), dl, root, out, devices=["cpu", "cpu"], print_fn=quiet)
    assert summary["cases"] == 6
    assert (out / "fold_0" / "train.log").is_file() and (out / "fold_1" / "train.log").is_file()


def test_cv_option_errors(split, tmp_path, capsys):
    dl, root = split("brats2023", cases=6, folds=2)
    with pytest.raises(MedsegError, match="split into 2 folds"):
        run_cv(cfg(), dl, root, tmp_path / "a", n_folds=5)
    with pytest.raises(MedsegError, match="folds 0..1"):
        run_cv(cfg(), dl, root, tmp_path / "b", folds=[3])
    out = tmp_path / "c"
    args = ["cv", "--datalist", str(dl), "--data-root", str(root), "--out", str(out),
            "--preset", "cpu", *[f"--set={s}" for s in TINY_TRAIN]]
    assert main([*args, "--fold", "0"]) == 0
    assert "out-of-fold" in capsys.readouterr().out
    assert main([*args, "--fold", "0", "--set", "train.lr=0.5"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_one_fold_gets_one_consistent_answer(split, tmp_path, capsys):
    # `cv --folds 1` and `data split --folds 1` give the same advice, and the
    # advice works (`medseg train` without --fold trains on every case).
    dl, root = split("brats2023", cases=6, folds=2)
    base = ["--datalist", str(dl), "--data-root", str(root), "--preset", "cpu",
            *[f"--set={s}" for s in TINY_TRAIN]]
    assert main(["cv", *base, "--folds", "1", "--out", str(tmp_path / "cv")]) == 2
    err = capsys.readouterr().err
    assert "at least 2 folds" in err and "medseg train" in err and "Traceback" not in err
    assert main(["data", "split", "--root", str(root), "--folds", "1", "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "at least 2 folds" in err and "medseg train" in err
    assert not (tmp_path / "cv").exists() and not (tmp_path / "s.json").exists()
    assert main(["train", *base, "--out", str(tmp_path / "all")]) == 0
    summary = json.loads((tmp_path / "all" / "train_summary.json").read_text())
    assert summary["train_cases"] == 6 and summary["val_cases"] == 0


def test_wrong_data_root_creates_nothing(split, tmp_path, capsys):
    dl, root = split("brats2023", cases=6, folds=2)
    out = tmp_path / "exp"
    assert main(["cv", "--datalist", str(dl), "--data-root", str(tmp_path / "nowhere"), "--out", str(out),
                 "--preset", "cpu"]) == 2
    assert "--data-root" in capsys.readouterr().err
    wrong = tmp_path / "other"
    wrong.mkdir()
    assert main(["cv", "--datalist", str(dl), "--data-root", str(wrong), "--out", str(out),
                 "--preset", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "--data-root" in err and "Traceback" not in err
    assert not out.exists()


# --- parallel fold training leaves no trainer behind -------------------------------------

_REAL_SLEEP = time.sleep     # kept before a test replaces time.sleep


def _sleeper(cfg_path, datalist, data_root, fold, fold_dir, device, resume):
    """A cheap stand-in for `medseg train`: writes its PID to fold_<k>/pid, then sleeps."""
    code = (f"import os, time; open({str(fold_dir / 'pid.tmp')!r}, 'w').write(str(os.getpid())); "
            f"os.replace({str(fold_dir / 'pid.tmp')!r}, {str(fold_dir / 'pid')!r}); time.sleep(60)")
    return [sys.executable, "-c", code]


def _pids(out, n, timeout=5.0):
    """PIDs of the stand-in trainers of folds 0..n-1, once all have started (or, after
    `timeout`, of those that did: fewer than `n` means they did not run at once)."""
    files = [out / f"fold_{k}" / "pid" for k in range(n)]
    deadline = time.monotonic() + timeout
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        _REAL_SLEEP(0.02)
    return [int(f.read_text()) for f in files if f.exists()]


def _gone(pid):
    """True when `pid` no longer exists at all (not running, and not an unreaped zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _open_logs():
    """Files named train.log that this process still holds open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("train.log"):
            out.append(target)
    return out


@pytest.fixture
def stand_in_trainers(monkeypatch, tmp_path):
    """Patch `medseg train` with sleepers; afterwards SIGKILL any that survived the test."""
    monkeypatch.setattr(cv, "_train_command", _sleeper)
    monkeypatch.setattr(cv, "POLL_S", 0.05)
    seen: list[int] = []
    yield tmp_path / "exp", seen
    for pid in seen:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_parallel_fold_failure_stops_the_other_trainers(stand_in_trainers):
    out, seen = stand_in_trainers

    def kill_fold_1():
        pids = _pids(out, 3)
        seen.extend(pids)
        os.kill(pids[1] if len(pids) == 3 else pids[0], signal.SIGKILL)   # (else: fail fast)

    killer = threading.Thread(target=kill_fold_1)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(MedsegError, match=r"fold 1 training failed on cpu \(killed by signal 9\)") as exc:
        cv._train_folds_parallel([0, 1, 2], ["cpu", "cpu", "cpu"], out / "config.json", "dl.json",
                                 "data", out, quiet)
    killer.join()
    assert str(out / "fold_1" / "train.log") in str(exc.value)
    assert len(seen) == 3, "all three folds ran at once (one per listed device)"
    assert [pid for pid in seen if not _gone(pid)] == [], "trainers left running or unreaped"
    assert _open_logs() == []
    assert time.monotonic() - t0 < 8


def test_parallel_ctrl_c_stops_every_trainer(stand_in_trainers, monkeypatch):
    out, seen = stand_in_trainers

    def interrupt_once_started(seconds):
        # Ctrl-C arrives in the polling loop once every trainer runs; later sleeps
        # (e.g. inside Popen.wait) are real.
        if not seen:
            seen.extend(_pids(out, 3))
            raise KeyboardInterrupt
        _REAL_SLEEP(seconds)

    monkeypatch.setattr(cv.time, "sleep", interrupt_once_started)
    with pytest.raises(KeyboardInterrupt):
        cv._train_folds_parallel([0, 1, 2], ["cpu", "cpu", "cpu"], out / "config.json", "dl.json",
                                 "data", out, quiet)
    assert len(seen) == 3
    assert [pid for pid in seen if not _gone(pid)] == [], "trainers left running or unreaped"
    assert _open_logs() == []
