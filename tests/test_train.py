"""Training: outputs, checkpoint contents, determinism, resume after SIGKILL,
bad options, and a 2-process torchrun run — all on the tiny synthetic data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medseg.cli import main
from medseg.config import resolve_config
from medseg.errors import MedsegError
from medseg.infer import load_model
from medseg.train import lr_factor, train_fold

from conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]


def tiny(*extra: str) -> dict:
    return resolve_config("cpu", [*TINY_TRAIN, *extra])


def log_rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_writes_a_self_describing_run(split, tmp_path):
    dl, root = split()
    out = tmp_path / "run"
    summary = train_fold(tiny(), dl, root, 0, out, print_fn=lambda s: None)
    for name in ("config.json", "env.json", "log.csv", "train_summary.json", "learning_curve.png",
                 "checkpoints/last.pt", "checkpoints/best.pt", "checkpoints/final.pt"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    # the config as run: data.task resolved from the datalist (BraTS-GLI cases, brats2023 labels)
    want = tiny()
    want["data"]["task"] = "gli2023"
    assert json.loads((out / "config.json").read_text()) == want
    rows = log_rows(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0.0 <= float(rows[-1][f"dice_{r}"]) <= 1.0 for r in ("TC", "WT", "ET"))
    assert summary["epochs"] == 2 and summary["val_cases"] > 0
    # Checkpoints load with weights_only=True and rebuild the network by themselves.
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "meta"} <= set(ck)
    model, meta = load_model(out / "checkpoints/final.pt")
    assert meta["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert meta["label_convention"] == "brats2023" and meta["spacing"] == [6, 6, 6]
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


@pytest.mark.slow   # 8-20 s on 2 cores: `make test-slow`
def test_same_seed_same_metrics_and_weights(split, tmp_path):
    dl, root = split()
    a = train_fold(tiny(), dl, root, 0, tmp_path / "a", print_fn=lambda s: None)
    b = train_fold(tiny(), dl, root, 0, tmp_path / "b", print_fn=lambda s: None)
    assert a["final"] | {"seconds": 0, "data_wait": 0} == b["final"] | {"seconds": 0, "data_wait": 0}
    wa = torch.load(tmp_path / "a/checkpoints/final.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b/checkpoints/final.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train_fold(tiny("seed=1"), dl, root, 0, tmp_path / "c", print_fn=lambda s: None)
    assert c["final"]["train_loss"] != a["final"]["train_loss"]


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_resume_after_sigkill_matches_uninterrupted_run(split, tmp_path):
    dl, root = split()
    extra = ["train.epochs=4", "train.iters_per_epoch=6", "train.val_every=2"]
    ref = train_fold(tiny(*extra), dl, root, 0, tmp_path / "ref", print_fn=lambda s: None)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medseg", "train", "--datalist", str(dl), "--data-root", str(root),
           "--fold", "0", "--out", str(out), "--preset", "cpu",
           *[f"--set={s}" for s in [*TINY_TRAIN, *extra]]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.csv").exists() and len(log_rows(out)) >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.3)                                   # into epoch 2
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train_summary.json").exists(), "the run finished before it was killed"
    done = torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4

    assert main(["train", "--datalist", str(dl), "--data-root", str(root), "--fold", "0",
                 "--out", str(out), "--preset", "cpu", "--resume",
                 *[f"--set={s}" for s in [*TINY_TRAIN, *extra]]]) == 0
    got = json.loads((out / "train_summary.json").read_text())
    assert got["epochs"] == ref["epochs"] == 4
    assert got["final"] | {"seconds": 0, "data_wait": 0} == ref["final"] | {"seconds": 0, "data_wait": 0}
    assert [r["train_loss"] for r in log_rows(out)] == [r["train_loss"] for r in log_rows(tmp_path / "ref")]


def test_existing_run_needs_resume_and_resume_needs_a_run(split, tmp_path, capsys):
    dl, root = split()
    out = tmp_path / "run"
    args = ["train", "--datalist", str(dl), "--data-root", str(root), "--fold", "0", "--out", str(out),
            "--preset", "cpu", *[f"--set={s}" for s in TINY_TRAIN]]
    assert main([*args, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # Resuming a finished run is a no-op that keeps the result.
    assert main([*args, "--resume"]) == 0
    # ... but resuming with other options is refused.
    assert main([*args, "--resume", "--set", "train.lr=0.1"]) == 2
    assert "another configuration" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.patch=[18,16,16]", "multiple of 4"),
    ("train.optimizer=lion", "unknown optimizer"),
    ("train.epoch=3", "unknown key 'train.epoch'"),
    ("model.name=vnet", "unknown model 'vnet'"),
])
def test_bad_options_are_clear_errors(split, tmp_path, capsys, override, message):
    dl, root = split()
    rc = main(["train", "--datalist", str(dl), "--data-root", str(root), "--fold", "0",
               "--out", str(tmp_path / "r"), "--preset", "cpu",
               *[f"--set={s}" for s in [*TINY_TRAIN, override]]])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_bad_fold_and_data_root(split, tmp_path):
    dl, root = split()
    with pytest.raises(MedsegError, match="folds 0..1"):
        train_fold(tiny(), dl, root, 5, tmp_path / "r")
    with pytest.raises(MedsegError, match="--data-root"):
        train_fold(tiny(), dl, tmp_path, 0, tmp_path / "r")


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "poly") == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "poly") == pytest.approx(0.5 ** 0.9)


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_torchrun_two_cpu_processes(split, tmp_path):
    dl, root = split()
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medseg", "train", "--datalist", str(dl), "--data-root", str(root), "--fold", "0",
           "--out", str(out), "--preset", "cpu", "--device", "cpu",
           *[f"--set={s}" for s in TINY_TRAIN]]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert "x 2 ranks" in res.stdout
    assert res.stdout.count("epoch   2/2") == 1          # rank 0 logs, rank 1 does not
    assert len(log_rows(out)) == 2
    load_model(out / "checkpoints/final.pt")


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_retired_caches_are_a_clear_error(split, tmp_path, cache):
    # One training data path: the preprocessed dataset. An old config asking for the
    # in-memory or disk cache is told so before anything is built or written.
    dl, root = split()
    with pytest.raises(MedsegError, match=rf"data.cache='{cache}'.*retired.*data.cache=preprocessed"):
        train_fold(tiny(f'data.cache="{cache}"'), dl, root, 0, tmp_path / "r", print_fn=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_fp16_on_cpu_is_refused(split, tmp_path):
    dl, root = split()
    with pytest.raises(MedsegError, match="float16 needs CUDA"):
        train_fold(tiny("train.amp_dtype=\"float16\""), dl, root, 0, tmp_path / "r",
                   print_fn=lambda s: None)
