import numpy as np
import torch
from monai.data import load_decathlon_datalist

from medseg.cli import main
from medseg.data.synth import synthesize
from medseg.transforms import preprocessing, train_augmentation


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
        pre = preprocessing(dl["channels"], dl["label_convention"]["name"], spacing=(2.5, 2.5, 2.5))
        out[layout] = [pre(it) for it in items]
    for a, b in zip(out["brats2023"], out["msd"]):
        assert a["image"].shape == b["image"].shape and a["image"].shape[0] == 4
        assert torch.equal(a["label"], b["label"])
        # BraTS files are int16-rounded, MSD float32: z-scores agree to rounding
        assert torch.allclose(a["image"], b["image"], atol=0.05)


def test_preprocessed_regions_and_normalisation(tmp_path):
    dl, items = _first(tmp_path, "brats2023")
    pre = preprocessing(dl["channels"], "brats2023", spacing=(2.5, 2.5, 2.5))
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


def test_augmentation_keeps_pairs_aligned(tmp_path):
    dl, items = _first(tmp_path, "brats2021")
    pre = preprocessing(dl["channels"], "brats2021", spacing=(2.5, 2.5, 2.5))
    aug = train_augmentation((32, 32, 32))
    aug.set_random_state(0)
    d = pre(items[0])
    for _ in range(3):
        s = aug(d)[0]
        assert s["image"].shape == (4, 32, 32, 32) and s["label"].shape == (3, 32, 32, 32)
        assert set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0}
