"""BraTS tasks (`medseg.labels.TASKS`): labels ↔ regions per task, conventions that
would lose a label, hand-computable scores of the 2024 regions, a four-output model
through training, export and both engines, tasks refusing each other's data, and
models written before tasks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.synth import synthesize
from medseg.errors import DataError, LabelError, MedsegError
from medseg.labels import (CONVENTIONS, TASKS, conversion_problem, detect_task, get_convention, get_task,
                           labels_to_regions, legacy_task, regions_to_labels, task_problem)
from medseg.pipeline import PipelineSpec

from conftest import TINY, TINY_TRAIN


# ----------------------------------------------------------------------------- the table
def _random_labels(task, convention, shape=(7, 8, 9), seed=0):
    """Random labels of every class `task` learns, in `convention`."""
    conv = get_convention(convention)
    values = [0] + [v for v, c in conv.class_of.items() if c in task.classes]
    return np.random.default_rng(seed).choice(values, size=shape).astype(np.uint8)


@pytest.mark.parametrize("name", list(TASKS))
def test_labels_regions_labels_round_trip_for_every_task(name):
    task = get_task(name)
    # the task's own convention, and every other convention that holds its classes
    for conv in CONVENTIONS.values():
        if task_problem(task, conv) or conversion_problem(task, conv):
            continue
        lab = _random_labels(task, conv.name)
        regions = labels_to_regions(lab, conv.name, task)
        assert regions.shape == (len(task.outputs), *lab.shape)
        np.testing.assert_array_equal(regions_to_labels(regions, conv.name, task), lab)
        # and through any other convention that holds the task's classes: same classes
        for other in CONVENTIONS.values():
            if task_problem(task, other) or conversion_problem(task, other):
                continue
            moved = regions_to_labels(regions, other.name, task)
            want = np.vectorize(lambda v: 0 if v == 0 else other.value(conv.class_of[v]))(lab)
            np.testing.assert_array_equal(moved, want)
    assert task_problem(task, task.convention) is None and conversion_problem(task, task.convention) is None


def test_regions_of_the_new_tasks():
    gli = get_task("gli2024")
    assert gli.outputs == ("TC", "WT", "ET", "RC")
    assert gli.scored == ("ET", "NETC", "SNFH", "RC", "TC", "WT") and gli.rules == "brats-eval"
    assert gli.region_values("brats2024") == {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,), "RC": (4,),
                                              "NETC": (1,), "SNFH": (2,)}
    ped = get_task("ped2024")
    assert ped.outputs == ("TC", "WT", "ET", "CC")
    # BraTS 2024 PED: 1 ET, 2 NET, 3 CC, 4 ED; TC = ET ∪ NET ∪ CC, WT = all
    assert ped.region_values("brats2024-ped") == {"TC": (1, 2, 3), "WT": (1, 2, 3, 4), "ET": (1,), "CC": (3,),
                                                  "NET": (2,), "ED": (4,)}
    # precedence: ET over the core over the cavity over edema
    reg = np.zeros((4, 5), bool)
    reg[:, 0] = [1, 1, 1, 1]      # everything → ET
    reg[:, 1] = [1, 1, 0, 1]      # TC and RC → core
    reg[:, 2] = [0, 1, 0, 1]      # WT and RC → cavity
    reg[:, 3] = [0, 1, 0, 0]      # WT only → edema
    assert regions_to_labels(reg, "brats2024", "gli2024").tolist() == [3, 1, 4, 2, 0]
    # ped2024 paints CC after the core: TC+CC and WT+CC are the cyst
    assert regions_to_labels(reg, "brats2024-ped", "ped2024").tolist() == [1, 3, 3, 4, 0]


@pytest.mark.parametrize("task, convention, lost", [
    ("gli2024", "brats2023", "resection cavity"), ("gli2024", "brats2021", "resection cavity"),
    ("gli2024", "msd", "resection cavity"), ("ped2024", "brats2023", "cystic component"),
    ("ped2024", "brats2024", "cystic component"),
])
def test_a_convention_change_that_would_lose_a_label_is_an_error(task, convention, lost):
    t = get_task(task)
    regions = labels_to_regions(_random_labels(t, t.convention), t.convention, t)
    with pytest.raises(LabelError, match=f"{lost}.*would lose"):
        regions_to_labels(regions, convention, t)
    from medseg.data.inputs import output_convention
    with pytest.raises(MedsegError, match=f"{lost}.*--convention {t.convention}"):
        output_convention([], convention, t.convention, task)
    # a three-region model writes brats2024 (RC never predicted) and 2021 labels as before
    assert output_convention([], "brats2021", "brats2023", "gli2023")[0] == "brats2021"


def test_labels_a_task_cannot_learn_are_refused_with_the_reason():
    assert "resection cavity" in task_problem("gli2024", "brats2023")
    assert "cystic component" in task_problem("gli2023", "brats2024-ped")
    assert "cystic component" in task_problem("ped2024", "brats2021")
    assert task_problem("gli2023", "brats2024") is None       # RC is not tumour: ignored, as before
    assert task_problem("men2023", "brats2023") is None
    with pytest.raises(MedsegError, match="gli2024"):
        PipelineSpec(spacing=(1, 1, 1), roi=(8, 8, 8), label_convention="brats2023", task="gli2024")


def test_task_detected_from_labels_and_cohorts():
    assert detect_task("brats2024", ["GLI"])[0].name == "gli2024"
    assert detect_task("brats2024-ped", ["PED"])[0].name == "ped2024"
    assert detect_task("brats2023", ["MEN", "MEN"])[0].name == "men2023"
    assert detect_task("brats2023", ["MET"])[0].name == "met2023"
    assert detect_task("brats2023", ["SSA"])[0].name == "ssa2023"
    assert detect_task("brats2023", ["GLI"])[0].name == "gli2023"
    task, why = detect_task("brats2023", ["MEN", "MET"])
    assert task.name == "gli2023" and "mixed" in why and "--task" in why
    assert detect_task("brats2021", [None])[0].name == "gli2021"
    assert detect_task("msd", [None])[0].name == "gli2021"


def test_models_written_before_tasks_keep_their_three_regions():
    # a checkpoint's metadata before the pipeline spec, and a spec before tasks
    old = {"spacing": [2.5, 2.5, 2.5], "roi": [48, 48, 48], "label_convention": "brats2023"}
    spec = PipelineSpec.from_meta(old)
    assert spec.task == "gli2023" and spec.regions == ("TC", "WT", "ET")
    d = spec.to_dict()
    del d["task"]
    assert PipelineSpec.from_dict({**d, "label_convention": "brats2021"}).task == "gli2021"
    assert PipelineSpec.from_dict({**d, "label_convention": "brats2024"}).task == "gli2023"
    assert legacy_task("msd").name == "gli2021"
    with pytest.raises(MedsegError, match="regions"):
        PipelineSpec.from_dict({**d, "regions": ["TC", "WT", "ET", "RC"]})


# ----------------------------------------------------------------------------- scoring
def _nifti(arr, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.diag([*spacing, 1.0])), path)
    return path


def test_post_treatment_regions_scored_by_hand(tmp_path):
    from medseg.evaluate import evaluate_case
    ref = np.zeros((20, 4, 4), np.uint8)
    ref[0:8, :2, :2] = 4       # RC 32 voxels
    ref[8:10, :2, :2] = 3      # ET 8
    ref[10:12, :2, :2] = 1     # NETC 8
    ref[12:16, :2, :2] = 2     # SNFH 16
    pred = np.zeros_like(ref)
    pred[4:12, :2, :2] = 4     # RC 32 voxels: 16 right, 16 on the reference's ET and NETC
    pred[12:16, :2, :2] = 2    # SNFH exact; no ET, no NETC predicted
    rp, pp = _nifti(ref, tmp_path / "ref.nii.gz"), _nifti(pred, tmp_path / "pred.nii.gz")
    got = evaluate_case(pp, rp, "brats2024", "brats21", "gli2024")
    assert list(got) == ["ET", "NETC", "SNFH", "RC", "TC", "WT"]
    d = {r: got[r]["dice"] for r in got}
    assert d["RC"] == pytest.approx(2 * 16 / (32 + 32))
    assert d["ET"] == 0 and d["NETC"] == 0 and d["SNFH"] == 1
    assert d["TC"] == 0                                   # ref TC 16 voxels, none predicted
    assert d["WT"] == pytest.approx(2 * 16 / (32 + 16))   # pred WT = SNFH 16, ref WT 32
    assert got["RC"]["iou"] == pytest.approx(16 / (32 + 32 - 16))
    # brats-eval (the 2024 challenge's package): both empty → NaN, not 1
    empty = np.zeros_like(ref)
    empty[12:16, :2, :2] = 2
    e = _nifti(empty, tmp_path / "e.nii.gz")
    both = evaluate_case(e, e, "brats2024", "brats-eval", "gli2024")
    assert np.isnan(both["RC"]["dice"]) and both["SNFH"]["dice"] == 1
    assert evaluate_case(e, e, "brats2024", "brats21", "gli2024")["RC"]["dice"] == 1


def test_paediatric_regions_scored_by_hand(tmp_path):
    from medseg.evaluate import evaluate_case
    ref = np.zeros((20, 2, 2), np.uint8)
    ref[0:4] = 1       # ET 16
    ref[4:8] = 2       # NET 16
    ref[8:12] = 3      # CC 16
    ref[12:20] = 4     # ED 32
    pred = ref.copy()
    pred[8:12] = 2     # the cyst called solid tumour: CC missed, NET doubled, TC and WT unchanged
    rp, pp = _nifti(ref, tmp_path / "ref.nii.gz"), _nifti(pred, tmp_path / "pred.nii.gz")
    got = evaluate_case(pp, rp, "brats2024-ped", "brats21", "ped2024")
    assert list(got) == ["ET", "NET", "CC", "ED", "TC", "WT"]
    assert got["ET"]["dice"] == 1 and got["ED"]["dice"] == 1 and got["CC"]["dice"] == 0
    assert got["NET"]["dice"] == pytest.approx(2 * 16 / (16 + 32))
    assert got["TC"]["dice"] == 1 and got["WT"]["dice"] == 1     # TC = ET ∪ NET ∪ CC


# ----------------------------------------------------------------------------- data of a task
@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """Tiny synthetic datasets of the two four-output tasks, split in 2 folds."""
    from medseg.data.discover import discover, resolve_convention
    from medseg.data.folds import build_datalist, write_datalist
    made = {}
    for task in ("gli2024", "ped2024"):
        base = tmp_path_factory.mktemp(task)
        root = base / "data"
        synthesize(root, 6, "brats2023", 0, TINY, task=task)
        ds = discover(root)
        conv, scans = resolve_convention(ds)
        write_datalist(build_datalist(ds, conv, scans, 2, 0, task), base / "split.json")
        made[task] = (base / "split.json", root, conv.name)
    return made


def test_synthetic_task_data_is_detected(task_data, capsys):
    from medseg.cli import main
    assert task_data["gli2024"][2] == "brats2024" and task_data["ped2024"][2] == "brats2024-ped"
    assert main(["data", "index", "--root", str(task_data["ped2024"][1])]) == 0
    out = capsys.readouterr().out
    assert "task        ped2024" in out and "PED" in out


def test_a_task_refuses_data_of_another(task_data, split):
    from medseg.train import fold_data
    dl23, root23 = split("brats2023")
    with pytest.raises(DataError, match="gli2024 learns resection cavity"):
        fold_data(dl23, root23, 0, "gli2024")
    dl_ped, root_ped, _ = task_data["ped2024"]
    with pytest.raises(DataError, match="cystic component.*ped2024"):
        fold_data(dl_ped, root_ped, 0, "gli2023")
    assert fold_data(dl_ped, root_ped, 0).task == "ped2024"


def test_evaluation_refuses_references_the_models_task_cannot_be_scored_on(task_data, split, tmp_path):
    from medseg.evaluate import evaluate_folder
    _, root23 = split("brats2023")
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "predictions.json").write_text(json.dumps({"run": {"task": "gli2024"}}))
    with pytest.raises(DataError, match="resection cavity"):
        evaluate_folder(pred, root23, tmp_path / "out")


@pytest.fixture(scope="module")
def gli2024_run(task_data, tmp_path_factory):
    """A tiny gli2024 cross-validation (fold 0 of 2) by `run_cv`."""
    from medseg.config import resolve_config
    from medseg.cv import run_cv
    dl, root, _ = task_data["gli2024"]
    out = tmp_path_factory.mktemp("gli2024_run") / "run"
    summary = run_cv(resolve_config("cpu", [*TINY_TRAIN, "train.epochs=3", "train.iters_per_epoch=3"]), dl, root,
                     out, folds=[0], print_fn=lambda s: None)
    return out, root, summary


def test_a_four_output_task_trains_and_is_scored_on_its_regions(gli2024_run):
    out, root, summary = gli2024_run
    ck = torch.load(out / "fold_0" / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    meta = ck["meta"]
    assert meta["regions"] == ["TC", "WT", "ET", "RC"] and meta["task"]["name"] == "gli2024"
    assert meta["pipeline"]["task"] == "gli2024" and meta["network"]["args"]["out_channels"] == 4
    assert json.loads((out / "config.json").read_text())["data"]["task"] == "gli2024"
    assert summary["task"]["name"] == "gli2024" and summary["rules"] == "brats-eval"
    assert list(summary["overall"]) == ["ET", "NETC", "SNFH", "RC", "TC", "WT"]
    masks = sorted((out / "fold_0" / "predictions").glob("*.nii.gz"))
    assert masks and all(set(np.unique(np.asarray(nib.load(m).dataobj))) <= {0, 1, 2, 3, 4} for m in masks)


def test_a_four_output_model_exports_and_both_engines_agree(gli2024_run, tmp_path):
    from medseg.edge import EdgePredictor, read_metadata
    from medseg.export import export_onnx
    from medseg.infer import Predictor
    out, root, _ = gli2024_run
    ck = out / "fold_0" / "checkpoints" / "final.pt"
    # a model sure of itself (large logits): both engines must give the same masks
    state = torch.load(ck, map_location="cpu", weights_only=True)
    head = [k for k in state["model"] if k.startswith("output_block") and k.endswith("weight")]
    assert head, "no output block in the checkpoint"
    for k in head:
        state["model"][k] = state["model"][k] * 50
    bold = tmp_path / "bold.pt"
    torch.save(state, bold)
    report = export_onnx([bold], tmp_path / "m.onnx", print_fn=lambda s: None)
    assert report["max_abs_diff"] < 1e-3 and set(report["dice"]) == {"TC", "WT", "ET", "RC"}
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["task"]["name"] == "gli2024" and meta["regions"] == ["TC", "WT", "ET", "RC"]
    assert meta["label_values"]["rc"] == 4 and "RC → RC (4)" in meta["labels_from_regions"]
    case = sorted(p for p in root.iterdir() if p.is_dir())[0]
    images = [next(case.glob(f"*-{k}.nii.gz")) for k in ("t1n", "t1c", "t2w", "t2f")]
    a, _ = Predictor([bold]).labels(images)
    b, _ = EdgePredictor(tmp_path / "m.onnx").labels(images)
    assert 4 in np.unique(a) and np.mean(a == b) > 0.999
    with pytest.raises(LabelError, match="resection cavity"):
        Predictor([bold]).labels(images, convention="brats2023")


def test_three_region_checkpoints_written_before_tasks_still_predict(split, tmp_path):
    from medseg.infer import Predictor
    from medseg.models import build_model
    torch.manual_seed(0)
    model = build_model("unet3d", filters=[8, 16, 32], deep_supervision=False)
    meta = {"network": {"name": "unet3d", "args": {"filters": [8, 16, 32]}},
            "channels": ["t1", "t1ce", "t2", "flair"], "regions": ["TC", "WT", "ET"],
            "label_convention": "brats2023", "spacing": [6.0, 6.0, 6.0], "roi": [16, 16, 16],
            "medseg_version": "0.1", "infer": {"overlap": 0.5, "sw_batch_size": 1, "threshold": 0.5}}
    torch.save({"model": model.state_dict(), "meta": meta}, tmp_path / "old.pt")
    _, root = split("brats2023")
    case = sorted(p for p in root.iterdir() if p.is_dir())[0]
    images = [next(case.glob(f"*-{k}.nii.gz")) for k in ("t1n", "t1c", "t2w", "t2f")]
    pred = Predictor([tmp_path / "old.pt"])
    assert pred.spec.task == "gli2023" and pred.spec.regions == ("TC", "WT", "ET")
    labels, _ = pred.labels(images)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}


def test_metastases_never_relabel_a_small_enhancing_tumour():
    from medseg.cv import ET_THRESHOLDS_ML, choose_et_threshold
    # one case whose reference has no ET and a spurious 0.1 mL ET: relabelling would help
    rows = [{"region": "ET", "dice": 0.0, "vol_pred_ml": 0.1, "vol_ref_ml": 0.0},
            {"region": "ET", "dice": 0.8, "vol_pred_ml": 5.0, "vol_ref_ml": 5.5}]
    assert choose_et_threshold(rows)["et_min_ml"] > 0
    assert [t.name for t in TASKS.values() if not t.et_relabel] == ["met2023"]
    met = get_task("met2023")
    got = choose_et_threshold(rows, ET_THRESHOLDS_ML if met.et_relabel else (0.0,))
    assert got["et_min_ml"] == 0.0 and list(got["et_dice_by_threshold"]) == ["0.0"]

