"""`medseg predict --shard K/N`: N jobs split one batch exactly, each resumable,
and a final run without --shard gathers the batch's manifest, only when every
shard was predicted with its settings."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.discover import discover
from medseg.data.cases import InputCase
from medseg.data.inputs import parse_shard, run_batch, shard_cases
from medseg.errors import MedsegError
from medseg.labels import CHANNELS
from medseg.predict import resolve_checkpoints

from conftest import tiny_cv_run


@pytest.fixture(scope="module")
def model_and_data(_pristine, tmp_path_factory):
    base = tmp_path_factory.mktemp("shard")
    run, _ = tiny_cv_run(_pristine, base, 2, ["train.epochs=2"], only=[0])
    root = base / "unseen"
    from medseg.data.synth import synthesize
    synthesize(root, 7, "brats2023", 11, (40, 40, 28))     # 7 cases: shards of unequal size
    return resolve_checkpoints([run / "fold_0"])[0], root


@pytest.mark.parametrize("n", [1, 2, 3, 7, 9])
def test_shards_partition_any_batch_exactly(n):
    cases = [InputCase(f"case{i:03d}", [], []) for i in (5, 3, 9, 1, 7, 2, 8, 4, 6, 0, 11)]
    parts = [shard_cases(cases, (k, n)) for k in range(1, n + 1)]
    ids = [c.case_id for p in parts for c in p]
    assert sorted(ids) == sorted(c.case_id for c in cases) and len(ids) == len(set(ids))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # the same shards whatever order the input listed the cases in
    assert [c.case_id for c in shard_cases(cases[::-1], (1, n))] == [c.case_id for c in parts[0]]


@pytest.mark.parametrize("text", ["0/4", "5/4", "3", "a/b", "2/0", "-1/3"])
def test_bad_shard_is_a_clear_error(text):
    with pytest.raises(MedsegError, match="--shard"):
        parse_shard(text)


def test_shard_jobs_cover_the_batch_skip_finished_and_gather(model_and_data, tmp_path, capsys):
    ckpt, root = model_and_data
    out = tmp_path / "out"
    base = ["predict", "--model", str(ckpt), "--input", str(root), "--out", str(out)]
    ids = sorted(c.case_id for c in discover(root).cases)
    got = []
    for k in (1, 2, 3):
        assert main([*base, "--shard", f"{k}/3"]) == 0
        shard = json.loads((out / f"predictions.shard-{k}-of-3.json").read_text())
        got.append({m.split(".")[0] for m in shard["masks"]})
    assert sorted(x for g in got for x in g) == ids                  # union = all, no overlap
    assert not (out / "predictions.json").exists()
    masks = {i: (out / f"{i}.nii.gz").stat().st_mtime_ns for i in ids}
    # a shard run again finds its masks done and predicts nothing
    capsys.readouterr()
    assert main([*base, "--shard", "2/3"]) == 0
    assert f"{len(got[1])} of {len(got[1])} cases already predicted" in capsys.readouterr().out
    # a finished mask deleted (a job killed before writing it) is the only one redone
    victim = sorted(got[0])[0]
    (out / f"{victim}.nii.gz").unlink()
    assert main([*base, "--shard", "1/3"]) == 0
    assert all((out / f"{i}.nii.gz").stat().st_mtime_ns == t for i, t in masks.items() if i != victim)
    # the gathering run: nothing left to predict; one manifest and volumes.csv for the batch
    capsys.readouterr()
    assert main(base) == 0
    assert f"{len(ids)} of {len(ids)} cases already predicted" in capsys.readouterr().out
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["status"] == "complete" and sorted(m.split(".")[0] for m in manifest["masks"]) == ids
    assert sorted(manifest["cases"]) == ids                         # every shard's per-case records
    assert (out / "volumes.csv").is_file()
    for case in discover(root).cases:                               # each on its own input grid
        assert nib.load(out / f"{case.case_id}.nii.gz").shape == nib.load(case.images[0]).shape


# ---------------------------------------------------------------- settings of every shard
def _tiny_cases(root, n: int = 4) -> list[InputCase]:
    """`n` cases of four tiny NIfTI files each (varying voxels: readable, not blank)."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        folder = root / f"case{i}"
        folder.mkdir(parents=True)
        files = []
        for ch in CHANNELS:
            files.append(folder / f"case{i}_{ch}.nii.gz")
            nib.save(nib.Nifti1Image(rng.random((4, 4, 4), dtype=np.float32), np.eye(4)), files[-1])
        cases.append(InputCase(f"case{i}", files, list(CHANNELS), "brats2021"))
    return cases


def _run(**changed) -> dict:
    """The run settings of a batch (as the predict drivers pass them), some `changed`."""
    return {"label_convention": "brats2021", "engine": "torch", "model": ["m.pt"], "mirror_tta": False,
            "min_component_ml": 0.0, **changed}


def _batch(cases, out, run, shard=None, overwrite=False, said=None):
    """`run_batch` of `cases` (shard K/N of them) with a predict step that only writes
    a placeholder mask and a record."""
    part = shard_cases(cases, shard)

    def one(case, outs):
        outs[0].write_bytes(b"mask")
        return {"made_with": run["mirror_tta"]}
    return run_batch(part, out, None, [[out / f"{c.case_id}.nii.gz"] for c in part], overwrite, run, one,
                     print_fn=(said.append if said is not None else lambda s: None), shard=shard)


def test_gather_refuses_a_shard_predicted_with_other_settings(tmp_path):
    cases, out = _tiny_cases(tmp_path / "in"), tmp_path / "out"
    _batch(cases, out, _run(), (1, 2))
    _batch(cases, out, _run(mirror_tta=True, min_component_ml=0.5), (2, 2))    # e.g. --tta --min-component-ml 0.5
    with pytest.raises(MedsegError) as err:
        _batch(cases, out, _run())
    msg = str(err.value)
    assert "predictions.shard-2-of-2.json" in msg                             # names the manifest
    assert "mirror_tta: False in this run, True in the shard" in msg           # each setting, here vs there
    assert "min_component_ml: 0.0 in this run, 0.5 in the shard" in msg
    assert "--shard 2/2" in msg and "--overwrite" in msg                       # and the fix
    assert not (out / "predictions.json").exists()                             # nothing recorded
    # The fix: that shard re-run with the gathering run's options; then it gathers.
    _batch(cases, out, _run(), (2, 2), overwrite=True)
    _batch(cases, out, _run())
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["run"] == _run() and manifest["status"] == "complete"
    assert {c["made_with"] for c in manifest["cases"].values()} == {False}    # every mask of these settings


def test_gather_with_overwrite_replaces_the_shards_and_their_manifests(tmp_path):
    cases, out = _tiny_cases(tmp_path / "in"), tmp_path / "out"
    _batch(cases, out, _run(), (1, 2))
    _batch(cases, out, _run(mirror_tta=True), (2, 2))
    said: list[str] = []
    _batch(cases, out, _run(mirror_tta=True), overwrite=True, said=said)       # the whole batch again
    assert not list(out.glob("predictions.shard-*")) and any("removed predictions.shard-1-of-2" in s for s in said)
    res = _batch(cases, out, _run(mirror_tta=True))                           # a later run: nothing to refuse
    assert (res["predicted"], res["skipped"]) == (0, len(cases))


def test_a_shard_continues_by_its_own_settings_whatever_another_shard_used(tmp_path):
    cases, out = _tiny_cases(tmp_path / "in"), tmp_path / "out"
    _batch(cases, out, _run(), (1, 2))
    _batch(cases, out, _run(mirror_tta=True), (2, 2))
    (out / "case3.nii.gz").unlink()                                            # shard 2 was killed mid-way
    assert _batch(cases, out, _run(mirror_tta=True), (2, 2))["predicted"] == 1


def test_a_shard_refuses_to_continue_with_other_settings_than_its_own_manifest(tmp_path):
    cases, out = _tiny_cases(tmp_path / "in"), tmp_path / "out"
    _batch(cases, out, _run(), (1, 2))
    _batch(cases, out, _run(mirror_tta=True), (2, 2))
    (out / "case3.nii.gz").unlink()
    # Continued with shard 1's settings, not its own: refused, naming its manifest.
    with pytest.raises(MedsegError) as err:
        _batch(cases, out, _run(), (2, 2))
    msg = str(err.value)
    assert "predictions.shard-2-of-2.json" in msg and "mirror_tta was True, now False" in msg
    assert "--overwrite" in msg and not (out / "case3.nii.gz").exists()


def test_cli_gather_names_the_shard_of_other_settings(model_and_data, tmp_path, capsys):
    ckpt, root = model_and_data
    out = tmp_path / "out"
    base = ["predict", "--model", str(ckpt), "--input", str(root), "--out", str(out)]
    assert main([*base, "--shard", "1/7"]) == 0                                # one case each: cheap
    assert main([*base, "--shard", "2/7", "--min-component-ml", "0.5"]) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "predictions.shard-2-of-7.json" in err and "min_component_ml: 0.0 in this run, 0.5 in the shard" in err
    assert "--shard 2/7" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before                     # nothing predicted or recorded
