import nibabel as nib
import numpy as np
import pytest

from medseg.data import synth
from medseg.data.discover import discover
from medseg.errors import MedsegError


def test_render_is_deterministic_per_seed():
    a = synth.render_case(3, 5, 0, (40, 40, 28))
    b = synth.render_case(3, 5, 0, (40, 40, 28))
    c = synth.render_case(4, 5, 0, (40, 40, 28))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.classes, b.classes)
    assert not np.array_equal(a.classes, c.classes)


def test_written_dataset_is_deterministic(tmp_path):
    for name in ("a", "b"):
        synth.synthesize(tmp_path / name, 3, "brats2021", seed=7, shape=(32, 32, 24))
    for fa in sorted((tmp_path / "a").rglob("*.nii.gz")):
        fb = tmp_path / "b" / fa.relative_to(tmp_path / "a")
        assert np.array_equal(np.asarray(nib.load(fa).dataobj), np.asarray(nib.load(fb).dataobj))
        assert np.array_equal(nib.load(fa).affine, nib.load(fb).affine)


def _means(case):
    """Mean intensity per (class, modality), normalised by white matter."""
    out = {}
    for cls in (synth.CSF, synth.GM, synth.WM, synth.ED, synth.NCR, synth.ET, synth.NET):
        m = case.classes == cls
        if m.sum() > 20:
            out[cls] = [float(case.images[k][m].mean() / case.images[k][case.classes == synth.WM].mean())
                        for k in range(4)]
    return out


def test_mri_contrast_per_modality():
    T1, T1CE, T2, FLAIR = range(4)
    seen_et = seen_low = False
    for patient in range(8):
        case = synth.render_case(0, patient, 0, (96, 96, 64), geometry_variation=False)
        m = _means(case)
        assert m[synth.CSF][FLAIR] < m[synth.GM][FLAIR] < 1.0 * m[synth.ED][FLAIR]   # CSF dark on FLAIR
        assert m[synth.CSF][T2] > m[synth.GM][T2] > m[synth.WM][T2]                   # CSF bright on T2
        assert m[synth.ED][T2] > 1.5 and m[synth.ED][FLAIR] > 1.5                    # edema bright
        assert m[synth.GM][T1] < 1.0                                                  # WM brighter than GM on T1
        if synth.ET in m:
            seen_et = True
            assert m[synth.ET][T1CE] > 1.3 > m[synth.ET][T1]                          # enhances on T1ce only
        if case.grade == "low":
            seen_low = True
            assert not (case.classes == synth.ET).any()                              # no enhancing rim
    assert seen_et and seen_low


def test_background_zero_and_brain_positive():
    case = synth.render_case(0, 1, 0, (48, 48, 32))
    brain = case.classes > 0
    assert (case.images[:, ~brain] == 0).all()
    assert (case.images[:, brain] > 0).all()
    assert 0.15 < brain.mean() < 0.6


def test_tumour_sizes_and_mass_effect_vary():
    vols = [int((synth.render_case(0, p, 0, (48, 48, 32), False).classes >= synth.ED).sum())
            for p in range(12)]
    assert max(vols) > 5 * min(vols)


def test_geometry_variation_in_dataset(tmp_path):
    synth.synthesize(tmp_path / "d", 14, "brats2023", seed=0, shape=(32, 32, 24))
    codes, zs = set(), set()
    for c in discover(tmp_path / "d").cases:
        img = nib.load(c.images[0])
        codes.add(nib.aff2axcodes(img.affine))
        zs.add(round(float(img.header.get_zooms()[2]), 2))
    assert ("R", "A", "S") in codes and len(codes) > 1   # some non-RAS cases
    assert len(zs) > 1                                    # some thick-slice cases


def test_geometry_stored_matches_world():
    """A case stored in LPS or PIR holds the same world-space data as its RAS render."""
    case = synth.render_case(0, 2, 0, (32, 32, 24))
    for codes in synth._ORIENTATIONS:
        data, aff = synth._storage(case.classes, case.affine, codes)
        assert nib.aff2axcodes(aff) == codes
        back = nib.Nifti1Image(data, aff).as_reoriented(
            nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(codes),
                                            nib.orientations.axcodes2ornt("RAS")))
        assert np.array_equal(np.asarray(back.dataobj), case.classes)
        assert np.allclose(back.affine, case.affine)


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(MedsegError, match="not empty"):
        synth.synthesize(tmp_path / "x", 1)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_preview_png(tmp_path):
    pytest.importorskip("matplotlib")
    synth.synthesize(tmp_path / "d", 2, "msd", shape=(32, 32, 24), preview=tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_brats_size_case(tmp_path):
    ids = synth.synthesize(tmp_path / "d", 1, "brats2021", shape=(240, 240, 155),
                           geometry_variation=False)
    img = nib.load(next((tmp_path / "d").rglob("*_t1.nii.gz")))
    assert img.shape == (240, 240, 155) and np.allclose(img.header.get_zooms(), 1.0)
    assert ids == ["BraTS2021_00000"]
