"""`medseg predict --shard K/N`: N jobs split one batch exactly, each resumable,
and a final run without --shard gathers the batch's manifest."""

from __future__ import annotations

import json

import nibabel as nib
import pytest

from medseg.cli import main
from medseg.data.discover import discover
from medseg.data.inputs import InputCase, parse_shard, shard_cases
from medseg.errors import MedsegError
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
