import nibabel as nib
import numpy as np
import pytest

from medseg.data.io import atomic_path, load_array, load_header, write_label_map, write_nifti
from medseg.errors import DataError


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_write_read_geometry_round_trip(tmp_path, codes, suffix):
    o = nib.orientations
    aff = o.inv_ornt_aff(o.ornt_transform(o.axcodes2ornt("RAS"), o.axcodes2ornt(codes)), (5, 6, 7))
    aff = aff @ np.diag([1.0, 2.0, 3.5, 1.0])
    data = np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7)
    ref = nib.Nifti1Image(data, aff)
    ref.set_qform(aff, 1)
    ref.set_sform(aff, 2)
    write_nifti(data, aff, tmp_path / f"m{suffix}", header=ref.header)
    img = load_header(tmp_path / f"m{suffix}")
    assert np.array_equal(load_array(tmp_path / f"m{suffix}", img, np.uint8), data)
    assert np.allclose(img.affine, aff) and nib.aff2axcodes(img.affine) == tuple(codes)
    assert int(img.header["sform_code"]) == 2 and img.get_data_dtype() == np.uint8


def test_atomic_path_leaves_target_on_failure(tmp_path):
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]


def test_unreadable_files_raise_data_error(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(DataError, match="x.nii.gz: not a readable NIfTI"):
        load_header(bad)
    with pytest.raises(DataError, match="file not found"):
        load_header(tmp_path / "missing.nii.gz")


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os
    from medseg.data.io import write_json
    umask = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_mask_takes_the_geometry_not_the_display_header(tmp_path):
    # An MSD-style 4D scan: vector intent, a display range for MR intensities, a
    # description and time units. The mask keeps the geometry only.
    aff = np.diag([-1.2, -1.2, 3.0, 1.0])
    aff[:3, 3] = [90, 100, -60]
    scan = nib.Nifti1Image(np.zeros((6, 7, 5, 4), np.int16), aff)
    scan.set_qform(aff, 1)
    scan.set_sform(aff, 0)
    hdr = scan.header
    hdr.set_intent("vector")
    hdr["cal_min"], hdr["cal_max"] = 0, 3000
    hdr["descrip"] = b"scanner output"
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_zooms((1.2, 1.2, 3.0, 2.5))
    labels = np.zeros((6, 7, 5), np.uint8)
    labels[2:4, 2:4, 1:3] = 3
    write_label_map(labels, scan, tmp_path / "m.nii.gz", "msd", source="medseg test")
    m = nib.load(tmp_path / "m.nii.gz")
    h = m.header
    assert m.shape == (6, 7, 5) and m.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(m.dataobj), labels)
    np.testing.assert_allclose(m.affine, aff)
    assert h.get_intent()[0] == "label"
    assert (float(h["cal_min"]), float(h["cal_max"])) == (0.0, 3.0)
    assert (int(h["qform_code"]), int(h["sform_code"])) == (1, 0)
    np.testing.assert_allclose(h.get_zooms(), (1.2, 1.2, 3.0))
    assert h.get_xyzt_units()[0] == "mm"
    assert h["descrip"].item() == b"medseg test labels=msd"
    assert float(h["scl_slope"]) in (0.0, 1.0) or np.isnan(float(h["scl_slope"]))
