"""Knowledge distillation (`medseg distill`, `medseg.teacher`): student fold k learns only
from teacher fold k's outputs on fold k's training cases; stored teacher outputs
follow the teacher; the student's checkpoint and ONNX file say what taught it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.config import resolve_config
from medseg.data.folds import load_datalist
from medseg.data.preprocessed import Store, find_stores
from medseg.distill import run_distill, student_config
from medseg.errors import MedsegError
from medseg.infer import Predictor
from medseg.labels import labels_to_regions
from medseg.teacher import SoftTargets, ensure_targets, open_teacher, targets_dir
from medseg.transforms import patch_augmentation
from medseg.data.patches import Augmenter

from conftest import TINY_TRAIN, tiny_cv_run

STUDENT = ["train.patch=[16,16,16]"]
#: The student network of these tests: the registry's MobileNetV3-style U-Net, narrow.
NET = ("mobilenet_unet3d", {"channels": [8, 16, 32]})


def quiet(s):
    pass


@pytest.fixture(scope="module")
def teacher(_pristine, tmp_path_factory):
    """A finished 2-fold cv run of the tiny recipe (the teacher) and its data root."""
    base = tmp_path_factory.mktemp("teacher")
    run, root = tiny_cv_run(_pristine, base, 2, [])
    return run, root


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """The student's cross-validation and final student, distilled from `teacher`."""
    run, _ = teacher
    out = tmp_path_factory.mktemp("student") / "student"
    cfg = student_config(run, *NET, 0.5, False, STUDENT)
    result = run_distill(run, out, cfg, print_fn=quiet)
    return out, result


def _meta(path):
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


def test_student_fold_learns_only_from_its_teacher_fold_on_its_training_cases(teacher, distilled):
    run, root = teacher
    out, result = distilled
    dl = load_datalist(json.loads((run / "cv_summary.json").read_text())["datalist"])
    store = Store(find_stores(out)[0])
    for k in (0, 1):
        val = {e["id"] for e in dl["training"] if e["fold"] == k}
        train = {e["id"] for e in dl["training"] if e["fold"] != k}
        meta = _meta(out / f"fold_{k}" / "checkpoints" / "final.pt")
        d = meta["distill"]
        assert d["folds"] == [k] and d["weight"] == 0.5
        assert d["checkpoints"][str(k)]["sha256"] == open_teacher(run).sha256[k]
        folder = out / "preprocessed" / "teacher_outputs" / d["outputs"].split("/")[-1]
        stored = {p.stem for p in folder.glob("*.npy")}
        assert stored == train and not stored & val        # no held-out case, through any door
        # the stored outputs are teacher fold k's own, on the student's grid
        eng = Predictor([run / f"fold_{k}" / "checkpoints" / "final.pt"], device="cpu")
        other = Predictor([run / f"fold_{1 - k}" / "checkpoints" / "final.pt"], device="cpu")
        case = sorted(train)[0]
        x = np.asarray(store.image(case), np.float32)
        got = np.load(folder / f"{case}.npy").astype(np.float32)
        want = eng._to_numpy(eng.member_mean(eng._to_backend(x)))
        np.testing.assert_allclose(got, want, atol=2e-3)
        assert np.abs(got - other._to_numpy(other.member_mean(other._to_backend(x)))).max() > 1e-2
        with pytest.raises(MedsegError, match="not a training case"):
            SoftTargets(folder, sorted(train), 0.5).read(sorted(val)[0])
    # the final student: every case, against the mean of both teacher folds
    final = _meta(out / "final" / "checkpoints" / "final.pt")["distill"]
    assert final["folds"] == [0, 1]
    folder = out / "preprocessed" / "teacher_outputs" / final["outputs"].split("/")[-1]
    assert {p.stem for p in folder.glob("*.npy")} == {e["id"] for e in dl["training"]}
    assert (out / "final" / "oof_summary.json").is_file()
    assert set(result["student"]["cv_scores"]) == {"TC", "WT", "ET"}
    assert result["teacher"]["cv_scores"]["WT"]["dice"] is not None
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["cases"] == 6 and (out / "fold_0" / "metrics.csv").is_file()


def test_a_changed_teacher_invalidates_its_stored_outputs(teacher, tmp_path):
    run, _ = teacher
    copy = tmp_path / "teacher"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("preprocessed"))
    store_dir = find_stores(run)[0]
    store = Store(store_dir)
    t = open_teacher(copy)
    ids = store.case_ids()[:2]
    first = ensure_targets(tmp_path / "cache", t, 0, store, ids, print_fn=quiet)
    before = np.load(first / f"{ids[0]}.npy")
    # retrain stands in: other weights under the same path
    ck_path = copy / "fold_0" / "checkpoints" / "final.pt"
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    ck["model"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in ck["model"].items()}
    torch.save(ck, ck_path)
    t2 = open_teacher(copy)
    assert t2.sha256[0] != t.sha256[0] and t2.sha256[1] == t.sha256[1]
    second = ensure_targets(tmp_path / "cache", t2, 0, store, ids, print_fn=quiet)
    assert second != first and targets_dir(tmp_path / "cache", t2, 1, store, False) == \
        targets_dir(tmp_path / "cache", t, 1, store, False)      # fold 1 unchanged: same key
    assert np.abs(np.load(second / f"{ids[0]}.npy").astype(np.float32) - before.astype(np.float32)).max() > 1e-3
    # a stored output whose store entry changed (another image) is recomputed, not reused
    rec = second / f"{ids[0]}.json"
    stale = json.loads(rec.read_text())
    rec.write_text(json.dumps({**stale, "image_crc32": stale["image_crc32"] + 1}))
    mtime = (second / f"{ids[0]}.npy").stat().st_mtime_ns
    ensure_targets(tmp_path / "cache", t2, 0, store, ids, print_fn=quiet)
    assert (second / f"{ids[0]}.npy").stat().st_mtime_ns != mtime
    assert json.loads(rec.read_text()) == stale


def test_the_student_must_keep_the_teachers_split_and_grid(teacher, tmp_path):
    run, root = teacher
    # the teacher's split with one case moved to the other fold
    dl = json.loads(open(json.loads((run / "cv_summary.json").read_text())["datalist"]).read())
    dl["training"][0]["fold"] = 1 - dl["training"][0]["fold"]
    other = tmp_path / "other_split.json"
    other.write_text(json.dumps(dl))
    cfg = student_config(run, *NET, 0.5, False, STUDENT)
    with pytest.raises(MedsegError, match="split differs from the teacher"):
        run_distill(run, tmp_path / "s1", cfg, datalist=other, data_root=root, final=False, print_fn=quiet)
    cfg = student_config(run, *NET, 0.5, False, STUDENT + ["data.spacing=[5,5,5]"])
    with pytest.raises(MedsegError, match="preprocessing differs"):
        run_distill(run, tmp_path / "s2", cfg, final=False, print_fn=quiet)
    with pytest.raises(MedsegError, match="train.distill.weight"):
        student_config(run, *NET, 1.5)
    with pytest.raises(MedsegError, match="not a folder"):
        open_teacher(tmp_path / "nowhere")


def test_distill_weight_is_checked_when_training_starts(split, tmp_path):
    from medseg.train import train_fold
    dl, root = split("brats2023", cases=6, folds=2)
    cfg = resolve_config("cpu", [*TINY_TRAIN, "train.distill.weight=1.5"])
    with pytest.raises(MedsegError, match="train.distill.weight"):
        train_fold(cfg, dl, root, 0, tmp_path / "f0", print_fn=quiet)


def test_soft_targets_move_with_the_image_and_blend_with_the_labels():
    rng = np.random.default_rng(0)
    label = np.zeros((24, 24, 24), np.uint8)
    label[6:16, 8:18, 5:14] = 2
    label[8:13, 10:15, 7:11] = 1
    label[9:11, 11:13, 8:10] = 3
    regions = torch.from_numpy(labels_to_regions(label, "brats2023").astype(np.float32))
    image = torch.from_numpy(rng.normal(size=(4, 24, 24, 24)).astype(np.float32))
    lab = torch.from_numpy(label[None])
    aug = patch_augmentation(soft=True)
    for seed in range(12):
        # the teacher's probabilities = the labels' regions: after the same moves, the
        # pure-teacher target is (up to interpolation) the pure-label target
        _, y_lab = Augmenter(aug, "brats2023", 0.0).one(image, lab, seed, regions)
        _, y_soft = Augmenter(aug, "brats2023", 1.0).one(image, lab, seed, regions)
        _, y_half = Augmenter(aug, "brats2023", 0.5).one(image, lab, seed, regions * 0 + 0.2)
        assert set(np.unique(y_lab.numpy())) <= {0.0, 1.0}
        inter = ((y_soft > 0.5) & (y_lab > 0.5)).sum().item()
        union = ((y_soft > 0.5) | (y_lab > 0.5)).sum().item()
        assert inter / union > 0.85
        # half labels, half a uniform 0.2 teacher (0 where a rotation brings in padding)
        rest = y_half.numpy() - 0.5 * y_lab.numpy()
        assert rest.min() >= -1e-6 and rest.max() <= 0.1 + 1e-6 and np.mean(np.abs(rest - 0.1) < 1e-4) > 0.5


def test_exported_student_says_it_is_a_student_and_runs_without_torch(distilled, teacher, tmp_path):
    import subprocess
    import sys

    import nibabel as nib
    import onnx
    from test_export import _BLOCK, REPO
    out, _ = distilled
    target = tmp_path / "student.onnx"
    # fp32: an INT8 copy of a student trained for 4 steps fails export's own agreement check (as it should)
    assert main(["export", "--model", str(out / "final"), "--out", str(target)]) == 0
    masks = tmp_path / "masks"
    res = subprocess.run([sys.executable, "-c", _BLOCK, "predict", "--engine", "onnx", "--model", str(target),
                          "--input", str(teacher[1]), "--out", str(masks)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORTED []" in res.stdout
    assert len(list(masks.glob("*.nii.gz"))) == 6
    first = sorted(masks.glob("*.nii.gz"))[0]
    assert nib.load(first).shape == nib.load(sorted((teacher[1] / first.name.split(".")[0]).glob("*t1n*"))[0]).shape
    info = json.loads({p.key: p.value for p in onnx.load(str(target)).metadata_props}["medseg"])
    assert info["student"]["weight"] == 0.5 and info["student"]["folds"] == [0, 1]
    assert set(info["student"]["checkpoints"]) == {"0", "1"}
    assert info["student"]["cv_scores"]["WT"]["dice"] is not None     # the teacher's
    assert info["cv_scores"]["WT"]["dice"] is not None                 # the student recipe's out-of-fold


def test_export_takes_the_measured_inference_choice(distilled, tmp_path, capsys):
    import onnx
    out, _ = distilled
    model = tmp_path / "final"
    shutil.copytree(out / "final", model)
    choice = {"overlap": 0.25, "tta": False, "tolerance": 0.005, "chosen_on": "8 out-of-fold cases", "measured": []}
    (model / "inference_choice.json").write_text(json.dumps(choice))
    target = tmp_path / "s.onnx"
    assert main(["export", "--model", str(model), "--out", str(target)]) == 0
    info = json.loads({p.key: p.value for p in onnx.load(str(target)).metadata_props}["medseg"])
    assert info["pipeline"]["overlap"] == 0.25 and info["inference_choice"]["chosen_on"] == "8 out-of-fold cases"
    assert main(["export", "--model", str(model), "--out", str(target), "--overlap", "0.5"]) == 0
    info = json.loads({p.key: p.value for p in onnx.load(str(target)).metadata_props}["medseg"])
    assert info["pipeline"]["overlap"] == 0.5
    (model / "inference_choice.json").write_text(json.dumps({"overlap": 2}))
    assert main(["export", "--model", str(model), "--out", str(target)]) == 2
    assert "inference_choice.json" in capsys.readouterr().err
