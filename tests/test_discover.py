import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.data.discover import discover, resolve_convention
from medseg.errors import DataError, LabelError


@pytest.mark.parametrize("layout,convention,n_files", [
    ("brats2021", "brats2021", 5), ("brats2023", "brats2023", 5), ("msd", "msd", 2)])
def test_layout_detection(dataset, layout, convention, n_files):
    root = dataset(layout, cases=6, test_cases=2)
    ds = discover(root)
    assert ds.layout.name == layout
    assert len(ds.training) == 6 and len(ds.testing) == 2
    assert all(len(c.files) == n_files for c in ds.training)
    assert all(c.label is None for c in ds.testing)
    conv, scans = resolve_convention(ds)
    assert conv.name == convention
    assert len(scans) == 6


def test_brats2023_patient_ids(dataset):
    ds = discover(dataset("brats2023", cases=12))
    for c in ds.cases:
        assert c.case_id.startswith(c.patient_id + "-")
    # the generator gives some patients two time points
    assert len({c.patient_id for c in ds.cases}) < len(ds.cases)


def test_brats2021_channel_order(dataset):
    ds = discover(dataset("brats2021"))
    names = [p.name for p in ds.cases[0].images]
    assert [n.split("_")[-1].split(".")[0] for n in names] == ["t1", "t1ce", "t2", "flair"]


def test_uncompressed_nii_and_macos_junk(dataset, tmp_path):
    src = discover(dataset("brats2021", cases=3)).root
    dst = tmp_path / "plain"
    for f in src.rglob("*.nii.gz"):
        out = dst / f.parent.name / f.name.replace(".nii.gz", ".nii")
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.load(f), out)
        (out.parent / ("._" + out.name)).write_bytes(b"\0junk")   # AppleDouble files are ignored
    ds = discover(dst)
    assert ds.layout.name == "brats2021" and len(ds.training) == 3
    assert all(p.suffix == ".nii" for c in ds.cases for p in c.files)


def _set_label_values(path, mapping):
    img = nib.load(path)
    seg = np.asarray(img.dataobj).copy()
    for old, new in mapping.items():
        seg[seg == old] = new
    nib.save(nib.Nifti1Image(seg, img.affine, img.header), path)


def test_brats2024_resection_cavity_recognised(dataset):
    root = dataset("brats2023", cases=6)
    ds = discover(root)
    case = ds.training[0]
    _set_label_values(case.label, {2: 4})   # edema → RC in one case; other cases keep ET = 3
    conv, _ = resolve_convention(discover(root))
    assert conv.name == "brats2024"
    assert conv.region_labels()["ET"] == (3,)


def test_label_4_without_et_is_an_error_not_an_empty_et(dataset):
    root = dataset("brats2023", cases=6)
    for c in discover(root).training:
        _set_label_values(c.label, {3: 4})   # BraTS 2021 labels under 2023 names
    with pytest.raises(LabelError, match="brats2021") as exc:
        resolve_convention(discover(root))
    assert "BraTS-GLI-" in str(exc.value)


def test_explicit_convention_checks_every_file(dataset):
    root = dataset("brats2021")
    with pytest.raises(LabelError, match="_seg.nii.gz"):
        resolve_convention(discover(root), "msd")


def test_mixed_layouts_error(dataset, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(dataset("brats2021", cases=3), mixed / "a")
    shutil.copytree(dataset("brats2023", cases=3), mixed / "b")
    with pytest.raises(DataError, match="mixes BraTS 2021 and BraTS 2023"):
        discover(mixed)


def test_empty_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="no BraTS or MSD dataset found"):
        discover(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        discover(tmp_path / "nope")


def test_msd_modality_order_checked(dataset):
    root = dataset("msd", cases=3)
    spec = json.loads((root / "dataset.json").read_text())
    spec["modality"] = {"0": "T1w", "1": "FLAIR", "2": "t1gd", "3": "T2w"}
    (root / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="modality order"):
        discover(root)
