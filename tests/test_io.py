import nibabel as nib
import numpy as np
import pytest

from medseg.data.io import atomic_path, load_array, load_header, write_nifti
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
