"""The preprocessed dataset (medseg.data.preprocessed) and the patch loader
(medseg.data.patches): round trip against the MONAI transforms on every layout
and geometry of the synthetic data, sharing by folds and DDP ranks, resuming a
killed build, rebuilding corrupt and stale entries, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.config import resolve_config
from medseg.data.patches import EpochSampler, PatchDataset, VolumeDataset, patch_window
from medseg.data.preprocessed import MAX_LOCATIONS, ensure_store, tumour_labels
from medseg.errors import MedsegError
from medseg.labels import labels_to_regions
from medseg.train import fold_data, train_fold
from medseg.transforms import IMAGE, LABEL, patch_augmentation, preprocessing

from conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]
SPACING = (6.0, 6.0, 6.0)


def quiet(_: str) -> None:
    pass


def _cases(split, layout="brats2023", cases=6):
    dl, root = split(layout, cases)
    data = fold_data(dl, root, None)
    return data, sorted(data.train, key=lambda c: c["id"]), dl, root


def _mtimes(store_dir: Path) -> dict[str, int]:
    return {p.name: (p / "entry.json").stat().st_mtime_ns for p in store_dir.iterdir()
            if (p / "entry.json").is_file()}


@pytest.mark.parametrize("layout", ["brats2023", "brats2021", "msd"])
def test_entries_equal_the_monai_transform_output(split, tmp_path, layout):
    """Every case (RAS, LPS, PIR and thick-slice files among them; the MSD 4D file in
    its own channel order) read back equals the MONAI preprocessing output within
    float16 rounding, and its regions equal the transform's exactly."""
    data, cases, _, _ = _cases(split, layout)
    geoms = {tuple(nib.aff2axcodes(nib.load(c["label"]).affine)) for c in cases}
    assert len(geoms) > 1, "the synthetic data should mix orientations"
    store = ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1,
                         print_fn=quiet)
    pre = preprocessing(data.channels, data.convention, SPACING)
    for case in cases:
        ref = pre({IMAGE: case["image"], LABEL: case["label"]})
        img = np.asarray(store.image(case["id"]), dtype=np.float32)
        want = ref[IMAGE].numpy()
        assert img.shape == want.shape
        # float16: 11 significant bits → relative error ≤ 2^-11 (+ a tiny absolute term near 0)
        assert np.all(np.abs(img - want) <= np.abs(want) * 2.0 ** -11 + 1e-6)
        regions = labels_to_regions(store.label(case["id"]), data.convention)
        assert np.array_equal(regions, ref[LABEL].numpy() > 0.5)
        vol = VolumeDataset(store, [case["id"]])[0]
        assert torch.equal(vol[LABEL], torch.as_tensor(regions, dtype=torch.float32))
        # tumour locations: real tumour voxels of the stored labels, at most MAX_LOCATIONS each
        locs = store.locations(case["id"])
        lab = store.label(case["id"])
        assert len(locs) and np.all(lab[tuple(locs[:, 1:].T)] == locs[:, 0])
        assert set(np.unique(locs[:, 0])) <= set(tumour_labels(data.convention))
        for v in np.unique(locs[:, 0]):
            assert (locs[:, 0] == v).sum() == min(MAX_LOCATIONS, int((lab == v).sum()))


def test_patches_are_reproducible_cover_the_tumour_and_keep_alignment(split, tmp_path):
    data, cases, _, _ = _cases(split)
    store = ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1,
                         print_fn=quiet)
    ids = [c["id"] for c in cases]
    ds = PatchDataset(store, ids, (16, 16, 16), 2.0, 1.0, patch_augmentation(0.5))
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(a[IMAGE], b[IMAGE]) and torch.equal(a[LABEL], b[LABEL])
    assert a[IMAGE].shape == (4, 16, 16, 16) and a[LABEL].shape == (3, 16, 16, 16)
    assert not torch.equal(ds[(0, 124)][IMAGE], a[IMAGE])
    # pos:neg 2:1 → about two thirds of raw patches hold tumour
    raw = PatchDataset(store, ids, (16, 16, 16), 2.0, 1.0, None)
    with_tumour = np.mean([raw.read(i % len(ids), s)[1].any() for i, s in enumerate(range(300))])
    assert 0.6 < with_tumour <= 1.0
    # without augmentation a patch is exactly a window of the stored case
    img, lab = raw.read(1, 7)
    full_img, full_lab = np.asarray(store.image(ids[1]), np.float32), store.label(ids[1])
    hits = [(x, y, z) for x in range(full_lab.shape[0] - 15) for y in range(full_lab.shape[1] - 15)
            for z in range(full_lab.shape[2] - 15)
            if np.array_equal(full_lab[x:x + 16, y:y + 16, z:z + 16], lab)
            and np.array_equal(full_img[:, x:x + 16, y:y + 16, z:z + 16], img)] \
        if all(n >= 16 for n in full_lab.shape) else [None]
    assert hits


def test_patch_window_pads_short_axes_and_stays_inside():
    src, dst = patch_window((10, 40, 40), (5, 0, 39), (16, 16, 16))
    assert (src[0], dst[0]) == (slice(0, 10), slice(3, 13))     # short: whole axis, centred
    assert src[1] == slice(0, 16) and src[2] == slice(24, 40)   # moved inside the volume


def test_epoch_sampler_matches_across_ranks_and_is_seeded():
    one = list(EpochSampler(5, 8, seed=3))
    ranks = [list(EpochSampler(5, 4, seed=3, rank=r, world=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(one)             # ranks split one epoch's samples
    s = EpochSampler(5, 8, seed=3)
    s.set_epoch(1)
    assert list(s) != one and sorted({i for i, _ in one}) == list(range(5))


@pytest.mark.slow   # 8-20 s on 2 cores: `make test-slow`
def test_two_folds_and_parallel_trainers_share_one_store(split, tmp_path):
    """cv preprocesses once; both folds (trained in this process, then one again as a
    separate `medseg train` process) read the same entries: none is rewritten and
    no second copy appears."""
    from medseg.cv import run_cv
    dl, root = split("brats2023", 6, folds=2)
    out = tmp_path / "cv"
    run_cv(resolve_config("cpu", TINY_TRAIN), dl, root, out, folds=[0], print_fn=quiet)
    stores = list((out / "preprocessed").iterdir())
    assert len(stores) == 1 and len(_mtimes(stores[0])) == 6     # every case, once, for every fold
    before = _mtimes(stores[0])
    run_cv(resolve_config("cpu", TINY_TRAIN), dl, root, out, folds=[1], print_fn=quiet)
    assert list((out / "preprocessed").iterdir()) == stores and _mtimes(stores[0]) == before
    assert not list(out.rglob("cache"))
    assert (out / "fold_1" / "train_summary.json").is_file()


@pytest.mark.slow   # over 10 s on 2 cores: `make test-slow`
def test_torchrun_ranks_split_the_build_and_read_one_store(split, tmp_path):
    dl, root = split()
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medseg", "train", "--datalist", str(dl), "--data-root", str(root), "--fold", "0",
           "--out", str(out), "--preset", "cpu", "--device", "cpu", "--cache-dir", str(tmp_path / "pp"),
           *[f"--set={s}" for s in [*TINY_TRAIN, "train.val_every=1"]]]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    stores = list((tmp_path / "pp").iterdir())
    assert len(stores) == 1 and len(_mtimes(stores[0])) == 6
    # each rank built its share: 3 entries each, written by two different processes
    log = json.loads((out / "train_summary.json").read_text())
    assert log["world_size"] == 2
    import csv
    with open(out / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(r["dice_TC"] != "" for r in rows)
    # each rank validated its share of the 3 held-out cases; the gathered mean equals
    # one process validating all of them with the final weights
    from medseg.config import load_config
    from medseg.data.preprocessed import Store
    from medseg.infer import load_model
    from medseg.train import validate
    model, _ = load_model(out / "checkpoints" / "final.pt")
    val = VolumeDataset(Store(stores[0]), [c["id"] for c in fold_data(dl, root, 0).val])
    assert len(val) == 3
    alone = validate(model, val, load_config(out / "config.json"), torch.device("cpu"))
    assert abs(alone["dice_mean"] - float(rows[-1]["dice_mean"])) < 1e-4
    before = _mtimes(stores[0])
    train_fold(resolve_config("cpu", TINY_TRAIN), dl, root, 0, tmp_path / "single",
               cache_dir=tmp_path / "pp", print_fn=quiet)
    assert _mtimes(stores[0]) == before and len(list((tmp_path / "pp").iterdir())) == 1


@pytest.mark.slow   # 8-20 s on 2 cores: `make test-slow`
def test_killed_build_resumes_without_redoing_finished_cases(split, tmp_path):
    dl, root = split("brats2023", 6)
    pp = tmp_path / "pp"
    cmd = [sys.executable, "-m", "medseg", "data", "preprocess", "--datalist", str(dl), "--data-root",
           str(root), "--preset", "cpu", "--set", "data.spacing=[3,3,3]", "--out", str(pp), "--jobs", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list(pp.glob("*/*/entry.json"))
        if len(done) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store_dir = next(p for p in pp.iterdir() if p.is_dir())
    finished = _mtimes(store_dir)
    assert 2 <= len(finished) < 6
    said = []
    data = fold_data(dl, root, None)
    ensure_store(sorted(data.train, key=lambda c: c["id"]), pp, (3, 3, 3), data.channels,
                 data.convention, jobs=1, print_fn=said.append)
    assert any(f"preprocessing {6 - len(finished)} of 6" in s for s in said), said
    after = _mtimes(store_dir)
    assert len(after) == 6 and all(after[k] == v for k, v in finished.items())
    # the killed process's half-written entry (if it had one) is cleaned up: no
    # temporary, and one version folder per case, the one its entry points at
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".tmp")]
    versions = sorted((store_dir / ".entries").iterdir())
    assert versions == sorted((store_dir / k).resolve() for k in after)
    assert main(cmd[3:]) == 0                          # and the command itself finds nothing to do
    assert _mtimes(store_dir) == after


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "stale"])
def test_corrupt_or_stale_entry_is_rebuilt(split, tmp_path, damage):
    """Truncated, deleted and stale entries are found by the cheap check every
    training start does; a flipped bit (same size) only by the deep one (CRC-32 of
    every byte: `deep=True`, as `medseg data verify` does)."""
    data, cases, _, _ = _cases(split)
    store = ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1,
                         print_fn=quiet)
    victim = cases[2]["id"]
    good = np.array(store.image(victim))
    before = _mtimes(store.path)
    f = store.path / victim / "image.npy"
    if damage == "flip":
        raw = bytearray(f.read_bytes())
        raw[-7] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        with open(store.path / victim / "label.npy", "r+b") as fh:
            fh.truncate(100)
    elif damage == "delete":
        (store.path / victim / "locations.npy").unlink()
    else:
        src = Path(cases[2]["image"][0])
        os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    said = []
    store = ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1,
                         print_fn=said.append, deep=damage == "flip")
    assert any(victim in s and "rebuilding" in s for s in said), said
    assert any("preprocessing 1 of 6" in s for s in said)
    after = _mtimes(store.path)
    assert after[victim] != before[victim]
    assert all(after[k] == v for k, v in before.items() if k != victim)
    assert np.array_equal(np.array(store.image(victim)), good)


def test_unwritable_store_is_a_clear_error(split, tmp_path):
    if os.geteuid() == 0:
        # root writes anywhere: a file where the folder should be fails for everyone
        blocker = tmp_path / "pp"
        blocker.write_text("not a folder")
        root_dir = blocker
    else:
        root_dir = tmp_path / "ro"
        root_dir.mkdir()
        root_dir.chmod(0o500)
    data, cases, _, _ = _cases(split)
    with pytest.raises(MedsegError, match="cannot write"):
        ensure_store(cases, root_dir, SPACING, data.channels, data.convention, jobs=1, print_fn=quiet)


def test_full_disk_is_a_clear_error_before_building(split, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    data, cases, _, _ = _cases(split)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MedsegError, match="GB needed.*GB free"):
        ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1, print_fn=quiet)
    assert not [p for p in (tmp_path / "pp").rglob("entry.json")]


def test_training_writes_its_store_beside_the_run_folder(split, tmp_path):
    """A fold trains to completion from the preprocessed dataset, which it wrote
    beside the run folder by default."""
    dl, root = split()
    b = train_fold(resolve_config("cpu", TINY_TRAIN), dl, root, 0, tmp_path / "runs" / "pp",
                   print_fn=quiet)
    assert b["train_cases"] + b["val_cases"] == 6
    assert (tmp_path / "runs" / "preprocessed").is_dir()
    assert np.isfinite(b["final"]["train_loss"]) and "dice_mean" in b["final"]


def test_building_in_process_leaves_the_thread_count_alone(split, tmp_path):
    """A serial build must not change the caller's torch threads: training after it
    in the same process would otherwise not reproduce a run in a fresh process."""
    data, cases, _, _ = _cases(split)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ensure_store(cases[:2], tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1,
                     print_fn=quiet)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threaded_checks_parse_one_npy_header_at_a_time(split, tmp_path, monkeypatch):
    """The store's checks run in threads and numpy parses .npy headers with
    `ast.literal_eval`; on CPython 3.11 < 3.11.8 two threads in the AST constructor
    at once can corrupt it for the whole process (python/cpython#106905: every later
    `ast` call raises SystemError). So the header parses must never overlap."""
    import ast
    import threading

    data, cases, _, _ = _cases(split)
    store = ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1,
                         print_fn=quiet)
    original, inside, worst, guard = ast.literal_eval, [0], [0], threading.Lock()

    def watched(text):
        with guard:
            inside[0] += 1
            worst[0] = max(worst[0], inside[0])
        try:
            time.sleep(0.01)   # widen the window in which another thread could enter
            return original(text)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(ast, "literal_eval", watched)
    from medseg.data.preprocessed import verify_store
    assert verify_store(store.path, jobs=4) == []
    ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=4, print_fn=quiet)
    assert worst[0] == 1
