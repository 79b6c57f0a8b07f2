import numpy as np
import pytest
import torch
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Zoomd

from medseg.cli import main
from medseg.data.synth import synthesize
from medseg.transforms import preprocessing


def _first(tmp_path, layout):
    root = tmp_path / layout
    synthesize(root, 5, layout, seed=3, shape=(48, 48, 32))
    assert main(["data", "split", "--root", str(root), "--out", str(tmp_path / f"{layout}.json")]) == 0
    import json
    dl = json.loads((tmp_path / f"{layout}.json").read_text())
    items = load_decathlon_datalist(str(tmp_path / f"{layout}.json"), base_dir=str(root))
    return dl, sorted(items, key=lambda it: it["id"])


def test_same_case_in_two_layouts_preprocesses_identically(tmp_path):
    """BraTS 2023 files (t1n… order, ET=3) and the MSD 4D file (FLAIR first, NCR=2)
    of one synthetic case give the same regions and near-identical images."""
    out = {}
    for layout in ("brats2023", "msd"):
        dl, items = _first(tmp_path, layout)
        pre = preprocessing(dl["channels"], dl["label_convention"]["name"], (2.5, 2.5, 2.5))
        out[layout] = [pre(it) for it in items]
    for a, b in zip(out["brats2023"], out["msd"]):
        assert a["image"].shape == b["image"].shape and a["image"].shape[0] == 4
        assert torch.equal(a["label"], b["label"])
        # BraTS files are int16-rounded, MSD float32: z-scores agree to rounding
        assert torch.allclose(a["image"], b["image"], atol=0.05)


def test_preprocessed_regions_and_normalisation(tmp_path):
    dl, items = _first(tmp_path, "brats2023")
    pre = preprocessing(dl["channels"], "brats2023", (2.5, 2.5, 2.5))
    for it in items:
        d = pre(it)
        img, lab = d["image"], d["label"]
        assert lab.shape[0] == 3 and set(torch.unique(lab).tolist()) <= {0.0, 1.0}
        tc, wt, et = lab
        assert torch.all(et <= tc) and torch.all(tc <= wt)          # nested regions
        brain = img[0] != 0
        for c in range(4):
            v = img[c][brain]
            assert abs(float(v.mean())) < 1e-3 and abs(float(v.std()) - 1) < 1e-2
        # RAS after preprocessing, whatever the file's orientation
        import nibabel as nib
        assert nib.aff2axcodes(np.asarray(img.affine)) == ("R", "A", "S")


def _blobs(shape=(48, 44, 40)):
    """(3, X, Y, Z) multi-hot TC/WT/ET of nested off-centre ellipsoids (no symmetry a
    flip could hide) and a (4, X, Y, Z) image derived from it: 1000 inside each
    region (channels TC, WT, ET, WT), 1 outside."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")

    def ellipsoid(c, a):
        return ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2 <= 1

    tc, wt, et = ellipsoid((28, 22, 19), (11, 9, 8)), ellipsoid((26, 20, 18), (16, 13, 11)), \
        ellipsoid((30, 23, 20), (7, 6, 5))
    label = torch.as_tensor(np.stack([tc, wt, et]).astype(np.float32))
    image = torch.cat([label, label[1:2]]) * 1000 + 1
    return {"image": MetaTensor(image), "label": MetaTensor(label)}


def _contradictions(image, label) -> int:
    """Voxels whose label contradicts the image beyond what interpolation allows.

    A nearest-neighbour label copies the source voxel nearest to the sampling point;
    trilinear weights that voxel at least 1/8, so a labelled voxel holds ≥ 1/8 of the
    foreground intensity F and an unlabelled one ≤ 7/8. Gamma 0.7-1.5 (on the
    image's range) moves these bounds to 0.125^1.5 = 0.044 F and 0.875^0.7 = 0.911 F;
    scaling moves F itself; shift (±0.1) and noise (σ 0.05) are negligible against
    F ≈ 1000. So in an aligned pair no labelled voxel is below 0.02 F and no
    unlabelled one above 0.95 F, while a label displaced by one voxel has both.
    """
    image, label = torch.as_tensor(image), torch.as_tensor(label) > 0.5
    f = float(image.max())
    if f < 500:                      # crop without foreground: the label must be empty too
        return int(label.sum())
    rel = image[:3] / f              # image channels TC, WT, ET ↔ label channels
    return int((label & (rel < 0.02)).sum() + (~label & (rel > 0.95)).sum())


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's thread pool costs more than it saves (measured 20× slower
    with 2 threads on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_alignment_check_catches_a_half_voxel_label_shift():
    """torch's legacy "nearest" zoom samples the label from floor(i·s), up to a voxel
    from where trilinear samples the image: the check must see that."""
    d = _blobs()
    for mode, bad in (("nearest", True), ("nearest-exact", False)):
        z = Zoomd(["image", "label"], zoom=1.13, mode=("trilinear", mode), keep_size=True)(d)
        assert (_contradictions(z["image"], z["label"]) > 0) == bad, mode


def test_patch_augmentation_keeps_pairs_aligned(one_thread):
    """The preprocessed path's augmentation (one-resampling rotate+zoom, flips in one
    copy, float32 gamma and noise) moves the label map with the image."""
    from medseg.labels import labels_to_regions, regions_to_labels
    from medseg.transforms import RandRotateZoomd, patch_augmentation
    d = _blobs((32, 32, 32))
    labels = regions_to_labels(d["label"].numpy() > 0.5, "brats2023")
    sample = {"image": d["image"].as_tensor(), "label": torch.as_tensor(labels[None], dtype=torch.float32)}
    aug = patch_augmentation(0.0)
    spatial = next(t for t in aug.transforms if isinstance(t, RandRotateZoomd))
    moved, peaks = 0, set()
    for seed in range(40):
        aug.set_random_state(seed)
        s = aug(dict(sample))
        moved += spatial.angles is not None or spatial.zoom is not None
        lab = np.rint(s["label"].numpy()[0]).astype(np.uint8)
        assert set(np.unique(lab)) <= {0, 1, 2, 3}
        regions = labels_to_regions(lab, "brats2023")
        peaks.add(round(float(s["image"].max())))
        assert _contradictions(s["image"], regions) == 0, f"seed {seed}"
        assert _contradictions(torch.roll(s["image"], 1, 2), regions) > 100
    assert moved >= 8 and min(peaks) < 990 and max(peaks) > 1010, (moved, peaks)
    assert torch.equal(sample["image"], d["image"].as_tensor())          # the input is never modified


@pytest.mark.parametrize("shape", [(64, 40, 24), (32, 32, 32)])
def test_rotation_is_rigid_on_non_cubic_patches(one_thread, shape):
    """A sphere rotated in a non-cubic patch stays a sphere of the same radius (a
    rotation applied in normalised coordinates would squash it)."""
    from medseg.transforms import RandRotateZoomd
    x, y, z = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    sphere = torch.as_tensor((x ** 2 + y ** 2 + z ** 2 <= 10 ** 2)[None].astype(np.float32))
    t = RandRotateZoomd(["label"], prob_rotate=1.0, max_angle=0.8, prob_zoom=0.0)
    for seed in range(4):
        t.set_random_state(seed)
        out = t({"label": sphere})["label"][0].numpy() > 0.5
        assert max(abs(a) for a in t.angles) > 0.3
        extents = [np.ptp(np.nonzero(out.any(axis=tuple(j for j in range(3) if j != i)))[0]) + 1
                   for i in range(3)]
        assert all(abs(e - 21) <= 1 for e in extents), extents
        assert abs(out.sum() - sphere.sum().item()) <= 0.03 * sphere.sum().item()
    t = RandRotateZoomd(["label"], prob_rotate=0.0, prob_zoom=1.0, zoom_range=(1.2, 1.2))
    out = t({"label": sphere})["label"][0].numpy() > 0.5
    assert abs(np.ptp(np.nonzero(out.any(axis=(1, 2)))[0]) + 1 - 21 * 1.2) <= 1.5     # zoom > 1 enlarges
