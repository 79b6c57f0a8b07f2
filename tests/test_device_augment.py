"""Augmentation on the training device (`data.augment=device`): the loader
workers only read raw patches, the training process augments the batch where the
model is. Checked here with the CPU as the device: the result must equal the
in-worker augmentation sample for sample, so moving it to a GPU changes where it
runs, not what it does. Also `train.init_from` (fine-tuning from a trained model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medseg.config import resolve_config
from medseg.data.patches import EpochSampler, PatchDataset
from medseg.data.preprocessed import ensure_store
from medseg.errors import MedsegError
from medseg.labels import labels_to_regions
from medseg.train import augment_on_device, fold_data, initial_weights, train_fold
from medseg.transforms import IMAGE, LABEL, RandRotateZoomd, patch_augmentation

from conftest import TINY_TRAIN

SPACING = (6.0, 6.0, 6.0)


def quiet(_: str) -> None:
    pass


@pytest.fixture
def store(split, tmp_path):
    dl, root = split("brats2023", 6)
    data = fold_data(dl, root, None)
    cases = sorted(data.train, key=lambda c: c["id"])
    return ensure_store(cases, tmp_path / "pp", SPACING, data.channels, data.convention, jobs=1,
                        print_fn=quiet), [c["id"] for c in cases]


def test_batch_augmented_on_the_device_equals_the_worker_augmentation(store):
    """Every draw (rotation+zoom, flips, intensity, noise, modality dropout) comes
    from the sample's seed: raw patches batched through a DataLoader and augmented
    by `Augmenter.batch` equal the in-worker samples exactly, over enough seeds that
    every transform fires."""
    st, ids = store
    patch = (24, 24, 16)
    worker = PatchDataset(st, ids, patch, 2.0, 1.0, patch_augmentation(0.5))
    raw = PatchDataset(st, ids, patch, 2.0, 1.0, patch_augmentation(0.5), augment=False)
    sampler = EpochSampler(len(ids), 40, seed=3)
    loader = DataLoader(raw, batch_size=4, sampler=sampler)
    keys = list(sampler)
    rotated = 0
    for b, batch in enumerate(loader):
        assert batch[IMAGE].dtype == torch.float16 and batch[LABEL].dtype == torch.uint8
        assert batch[LABEL].shape == (4, 1, *patch)
        img, reg = raw.augmenter.batch(batch[IMAGE], batch[LABEL], batch["seed"])
        assert img.shape == (4, 4, *patch) and reg.shape == (4, 3, *patch)
        assert img.dtype == reg.dtype == torch.float32
        for j in range(4):
            ref = worker[keys[4 * b + j]]
            assert torch.equal(img[j], ref[IMAGE]) and torch.equal(reg[j], ref[LABEL])
        rz = RandRotateZoomd([IMAGE, LABEL])
        for s in batch["seed"]:
            rz.set_random_state(seed=int(s) % 2**32)
            rz.randomize()
            rotated += rz.angles is not None or rz.zoom is not None
    assert rotated >= 5, "the seeds should make rotation/zoom fire"


def test_raw_patch_is_the_stored_window_and_regions_follow_the_labels(store):
    st, ids = store
    raw = PatchDataset(st, ids, (16, 16, 16), 2.0, 1.0, None, augment=False)
    item = raw[(2, 11)]
    img, lab = raw.read(2, 11, dtype=None)
    assert np.array_equal(item[IMAGE].numpy(), img) and np.array_equal(item[LABEL][0].numpy(), lab)
    assert int(item["seed"]) == 11
    # no augmentation: the regions are labels_to_regions of the raw labels, on CPU and "device"
    _, reg = raw.augmenter.one(item[IMAGE], item[LABEL], 11)
    assert np.array_equal(reg.numpy(), labels_to_regions(lab, st.convention).astype(np.float32))
    on_meta = raw.augmenter.regions(item[LABEL][0].to("meta"))
    assert on_meta.shape == (3, 16, 16, 16)


def test_rotated_label_map_stays_integer_and_aligned_with_the_image():
    """A uint8 label map through the one-resampling rotation+zoom stays uint8 and
    lands where the image's identical channel lands (same grid)."""
    rng = np.random.default_rng(0)
    lab = torch.from_numpy(rng.integers(0, 4, (1, 20, 18, 12)).astype(np.uint8))
    t = RandRotateZoomd([IMAGE, LABEL], prob_rotate=1.0, prob_zoom=1.0, mode=("nearest", "nearest"))
    t.set_random_state(seed=5)
    out = t({IMAGE: lab.float(), LABEL: lab})
    assert out[LABEL].dtype == torch.uint8
    assert torch.equal(out[LABEL].float(), out[IMAGE])
    assert not torch.equal(out[LABEL], lab)


def test_where_augmentation_runs():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    full = resolve_config("full")
    assert full["data"]["augment"] == "auto"
    assert augment_on_device(full, gpu) and not augment_on_device(full, cpu)
    assert not augment_on_device(resolve_config("full", ["data.augment=worker"]), gpu)
    assert augment_on_device(resolve_config("full", ["data.augment=device"]), cpu)
    with pytest.raises(MedsegError, match="data.augment='gpu'"):
        augment_on_device(resolve_config("full", ["data.augment=gpu"]), gpu)
    old = resolve_config("full")
    del old["data"]["augment"]
    assert not augment_on_device(old, cpu) and augment_on_device(old, gpu)


def test_training_with_device_augmentation_equals_worker_augmentation(split, tmp_path):
    """The same fold trained with augmentation in the workers and on the device
    (here the CPU) follows the same samples: the same losses, step for step."""
    dl, root = split()
    runs = {}
    for where in ("worker", "device"):
        cfg = resolve_config("cpu", [*TINY_TRAIN, f"data.augment={where}", "train.modality_dropout=0.3"])
        runs[where] = train_fold(cfg, dl, root, 0, tmp_path / "runs" / where, print_fn=quiet, device="cpu")
    a, b = runs["worker"]["final"], runs["device"]["final"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
    assert a["dice_mean"] == pytest.approx(b["dice_mean"], abs=1e-6)


def test_init_from_starts_from_the_same_fold_of_a_trained_model(split, tmp_path):
    """`train.init_from` takes fold k of a cv folder (or a run folder, or a .pt);
    with lr 0 the weights that come out are the ones that went in; another fold,
    another datalist or another network is refused."""
    dl, root = split()
    src = tmp_path / "cv"
    train_fold(resolve_config("cpu", TINY_TRAIN), dl, root, 0, src / "fold_0", print_fn=quiet, device="cpu")
    cfg = resolve_config("cpu", [*TINY_TRAIN, f"train.init_from={src}", "train.lr=0", "train.epochs=1"])
    path, _ = initial_weights(cfg, 0, dl)
    assert path == src / "fold_0" / "checkpoints" / "last.pt"
    train_fold(cfg, dl, root, 0, tmp_path / "ft", print_fn=quiet, device="cpu")
    out = torch.load(tmp_path / "ft" / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    src_final = torch.load(src / "fold_0" / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    assert out["model"].keys() == src_final["model"].keys()
    for k, v in src_final["model"].items():
        assert torch.equal(out["model"][k], v), k
    assert out["meta"]["init_from"] == str(src)
    # a checkpoint file and a run folder work too
    assert initial_weights(resolve_config("cpu", [*TINY_TRAIN, f"train.init_from={src / 'fold_0'}"]), 0, dl)
    with pytest.raises(MedsegError, match="trained on fold 0"):
        initial_weights(resolve_config("cpu", [*TINY_TRAIN, f"train.init_from={path}"]), 1, dl)
    other = tmp_path / "other.json"
    other.write_text(Path(dl).read_text())
    with pytest.raises(MedsegError, match="validation cases"):
        initial_weights(resolve_config("cpu", [*TINY_TRAIN, f"train.init_from={path}"]), 0, other)
    with pytest.raises(MedsegError, match="same network"):
        initial_weights(resolve_config("cpu", ["model.args.filters=[8,16,64]", f"train.init_from={path}"]), 0, dl)
    with pytest.raises(MedsegError, match="no checkpoint for fold 3"):
        initial_weights(resolve_config("cpu", [f"train.init_from={src}"]), 3, dl)
    with pytest.raises(MedsegError, match="no such checkpoint"):
        initial_weights(resolve_config("cpu", [f"train.init_from={tmp_path / 'nope.pt'}"]), 0, dl)
