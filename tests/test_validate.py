"""Every bad-input class of `medseg data check`: a non-zero exit, a message that
names the file and the fix, and an untouched data root."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.discover import discover
from medseg.labels import CHANNELS
from tests.conftest import tree_fingerprint


def _case_files(root):
    """Canonical channel name (and "seg") → file of the first case."""
    case = discover(root).training[0]
    return dict(zip(CHANNELS, case.images)) | {"seg": case.label}


def _rewrite(path, fn):
    img = nib.load(path)
    data, affine = fn(np.asarray(img.dataobj).copy(), img.affine.copy())
    hdr = img.header.copy()
    hdr.set_data_dtype(data.dtype)
    nib.save(nib.Nifti1Image(data, affine, hdr), path)


def _missing(root, files):
    files["t1ce"].unlink()
    return files["t1"].parent.name, "missing modality t1ce"


def _truncated(root, files):
    raw = files["t2"].read_bytes()
    files["t2"].write_bytes(raw[: len(raw) // 2])
    return files["t2"].name, "truncated or corrupt"


def _not_nifti(root, files):
    files["flair"].write_bytes(gzip.compress(b"this is a text file, not an image\n" * 20))
    return files["flair"].name, "not a readable NIfTI"


def _four_d(root, files):
    _rewrite(files["t1"], lambda d, a: (np.stack([d, d], -1), a))
    return files["t1"].name, "expected a 3D volume"


def _shape(root, files):
    _rewrite(files["t2"], lambda d, a: (d[:-2], a))
    return files["t2"].name, "shape"


def _affine(root, files):
    def shift(d, a):
        a[:3, 3] += 0.5
        return d, a
    _rewrite(files["flair"], shift)
    return files["flair"].name, "affine differs"


def _nan(root, files):
    def put(d, a):
        d = d.astype(np.float32)
        d[3, 3, 3] = np.nan
        return d, a
    _rewrite(files["t1"], put)
    return files["t1"].name, "NaN or infinite"


def _zero(root, files):
    _rewrite(files["t1ce"], lambda d, a: (np.zeros_like(d), a))
    return files["t1ce"].name, "all zero"


def _bad_label(root, files):
    def put(d, a):
        d[d == 2] = 7
        return d, a
    _rewrite(files["seg"], put)
    return files["seg"].name, "label values [7]"


def _float_label(root, files):
    def put(d, a):
        d = d.astype(np.float32)
        d[d == 2] = 1.5
        return d, a
    _rewrite(files["seg"], put)
    return files["seg"].name, "must be integers"


def _duplicate(root, files):
    case = files["t1"].parent
    shutil.copytree(case, root / "copy_of_case" / case.name)
    return case.name, "appears 2 times"


BREAKERS = {"missing modality": _missing, "truncated file": _truncated, "non-NIfTI file": _not_nifti,
            "4D image": _four_d, "shape mismatch": _shape, "affine mismatch": _affine,
            "NaN values": _nan, "all-zero modality": _zero, "label value": _bad_label,
            "non-integer label": _float_label, "duplicate case id": _duplicate}


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_bad_input_is_reported(dataset, capsys, layout, name):
    root = dataset(layout, cases=5)
    files = _case_files(root)
    expect_file, expect_msg = BREAKERS[name](root, files)
    before = tree_fingerprint(root)
    rc = main(["data", "check", "--root", str(root)])
    out = capsys.readouterr().out
    assert rc == 1, out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert any(expect_msg in line and expect_file.split(".")[0] in line for line in errors), out
    assert out.rstrip().splitlines()[-1].startswith("FAILED")
    assert tree_fingerprint(root) == before            # never modifies the data


def test_msd_wrong_channel_count(dataset, capsys):
    root = dataset("msd", cases=4)
    img_path = sorted((root / "imagesTr").glob("*.nii.gz"))[0]
    _rewrite(img_path, lambda d, a: (d[..., :3], a))
    rc = main(["data", "check", "--root", str(root)])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"{img_path.name}: expected a 4D image with 4 channels" in out


def test_msd_missing_label_file(dataset, capsys):
    root = dataset("msd", cases=4)
    spec = json.loads((root / "dataset.json").read_text())
    (root / spec["training"][1]["label"]).unlink()
    assert main(["data", "check", "--root", str(root)]) == 1
    assert "label file of case BRATS_002 listed in dataset.json is missing" in capsys.readouterr().out


def test_msd_missing_image_file(dataset, capsys):
    root = dataset("msd", cases=4)
    spec = json.loads((root / "dataset.json").read_text())
    (root / spec["training"][0]["image"]).unlink()
    assert main(["data", "check", "--root", str(root)]) == 1
    assert "image file of case BRATS_001 listed in dataset.json is missing" in capsys.readouterr().out


def test_one_bad_label_in_brats2024_data_flags_only_that_file(dataset, capsys):
    root = dataset("brats2023", cases=5)
    cases = discover(root).training
    _rewrite(cases[0].label, lambda d, a: (np.where(d == 2, 4, d).astype(d.dtype), a))  # RC: fine
    _rewrite(cases[1].label, lambda d, a: (np.where(d == 2, 7, d).astype(d.dtype), a))  # 7: bad
    assert main(["data", "check", "--root", str(root)]) == 1
    errors = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ERROR")]
    assert len(errors) == 1 and cases[1].case_id in errors[0] and "[7]" in errors[0]
    assert "'brats2024'" in errors[0]


def test_every_problem_of_every_case_is_reported(dataset, capsys):
    root = dataset("brats2021", cases=5)
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    next(cases[0].glob("*_t1.nii.gz")).unlink()
    next(cases[0].glob("*_t2.nii.gz")).write_bytes(b"junk")
    next(cases[3].glob("*_flair.nii.gz")).unlink()
    assert main(["data", "check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 3
    assert "3 errors" in out


def test_clean_dataset_passes_with_warnings_only(dataset, capsys):
    root = dataset("brats2023", cases=8)
    assert main(["data", "check", "--root", str(root), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "ERROR" not in out
    assert "not 1 mm" in out          # demo grid is 2.5 mm: a warning, not an error
    assert "not RAS" in out
    assert out.rstrip().splitlines()[-1].startswith("OK")
