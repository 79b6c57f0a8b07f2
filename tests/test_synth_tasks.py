"""The synthetic generator's BraTS tasks: post-treatment glioma (RC), paediatric
tumours (CC), meningioma, metastases and SSA glioma, and the unchanged default."""

from functools import lru_cache

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from medseg.data import synth
from medseg.errors import MedsegError
from medseg.labels import CONVENTIONS

SHAPE = (48, 48, 32)
PATIENTS = range(10)
T1, T1CE, T2, FLAIR = range(4)


@lru_cache(maxsize=None)
def _case(task: str, patient: int, shape=SHAPE, geometry_variation: bool = True):
    return synth.render_case(0, patient, 0, shape, geometry_variation, task=task)


def _count(case, cls) -> int:
    return int((case.classes == cls).sum())


def _lesion(case) -> np.ndarray:
    return np.isin(case.classes, (synth.ET, synth.NCR, synth.NET))


def test_task_constants():
    assert synth.SYNTH_TASKS == ("gli2021", "gli2023", "ssa2023", "gli2024", "ped2024", "men2023", "met2023")
    assert synth.TASK_CONVENTION == {"gli2024": "brats2024", "ped2024": "brats2024-ped"}
    assert (synth.RC, synth.CC) == (9, 10) and synth.NET == 8      # appended, nothing renumbered
    assert synth._CONTRAST.shape == (9, 4) and synth._CONTRAST_ALL.shape == (11, 4)


def test_default_task_is_unchanged():
    default = synth.render_case(0, 3, 0, SHAPE)
    for task in ("gli2023", "gli2021"):
        explicit = synth.render_case(0, 3, 0, SHAPE, task=task)
        assert np.array_equal(default.images, explicit.images)
        assert np.array_equal(default.classes, explicit.classes)
        assert default.grade == explicit.grade and default.orientation == explicit.orientation
    # The glioma this (seed, patient) always had: class volumes recorded before tasks
    # existed (a changed random stream would change them completely).
    counts = np.bincount(default.classes.ravel(), minlength=9)
    expected = [63725, 1069, 2936, 5618, 117, 239, 0, 24, 0]
    assert default.grade == "high" and default.orientation == ("R", "A", "S")
    assert np.allclose(counts, expected, rtol=0.01, atol=3), counts.tolist()


def test_unknown_task_refused():
    with pytest.raises(MedsegError, match="unknown synthetic task 'gli2025'"):
        synth.render_case(0, 0, 0, SHAPE, task="gli2025")


def test_ssa_same_glioma_lower_contrast_to_noise():
    for patient in range(3):
        gli, ssa = _case("gli2023", patient), _case("ssa2023", patient)
        assert np.array_equal(gli.classes, ssa.classes) and gli.grade == ssa.grade
        wm = gli.classes == synth.WM
        cv = [float(np.mean([c.images[m][wm].std() / c.images[m][wm].mean() for m in range(4)]))
              for c in (gli, ssa)]
        assert cv[1] > 1.2 * cv[0], (patient, cv)


def test_post_treatment_cavity_rim_and_residual():
    with_et = without_et = with_ncr = 0
    for p in PATIENTS:
        case = _case("gli2024", p)
        assert _count(case, synth.RC) >= 30, p                       # every case has a cavity
        assert _count(case, synth.ED) > 0 and _count(case, synth.NET) == 0 and _count(case, synth.CC) == 0
        if _count(case, synth.ET):
            with_et += 1
            # the rim lies against the cavity
            assert (ndi.binary_dilation(case.classes == synth.RC) & (case.classes == synth.ET)).any()
        else:
            without_et += 1
        with_ncr += _count(case, synth.NCR) > 0
    assert with_et >= 2 and without_et >= 2                          # ~60 % enhance, the rest none
    assert 1 <= with_ncr <= 9


def test_post_treatment_et_is_nodular_and_the_thin_wall_enhancement_is_not_labelled():
    """BraTS 2024: ET is thick or nodular enhancement; the thin linear enhancement
    lining a resection cavity is not ET. Both are rendered, told apart by shape."""
    wall_enhancing = 0
    for p in range(8):
        case = _case("gli2024", p, synth.DEMO_SHAPE, False)
        et, rc = case.classes == synth.ET, case.classes == synth.RC
        comps, n = ndi.label(et)
        depth = ndi.distance_transform_edt(et)
        for i in range(1, n + 1):  # every ET lesion is deeper than a one-voxel line (depth 1): a nodule
            assert depth[comps == i].max() >= 1.7, (p, i)
            assert (ndi.binary_dilation(rc) & (comps == i)).any(), (p, i)   # on the cavity wall
        # The wall's enhancement: only on non-tumour tissue touching the cavity (or a nodule in it),
        # labelled as that tissue, and bright on T1ce but not on T1.
        wall = case.enhance
        if wall is None or not wall.any():
            continue
        wall_enhancing += 1
        assert not (wall & ~ndi.binary_dilation(rc | et)).any() and not (wall & np.isin(case.classes, (synth.ET, synth.NCR, synth.RC))).any()
        assert not (case.labels("brats2024")[wall] == 3).any()
        for cls in np.unique(case.classes[wall]):
            same = case.classes == cls
            gain = [case.images[m][same & wall].mean() / case.images[m][same & ~wall].mean() for m in (T1CE, T1)]
            assert gain[0] > 1.3 and 0.8 < gain[1] < 1.2, (p, cls, gain)
    assert wall_enhancing >= 3, wall_enhancing     # about 70 % of cases (14 of patients 0-19)


def test_post_treatment_cavity_size_on_demo_grid():
    for p in range(2):
        case = _case("gli2024", p, synth.DEMO_SHAPE, False)
        assert _count(case, synth.RC) >= 300


def test_cavity_and_cyst_contrast():
    for p in range(4):
        case = _case("gli2024", p)
        mean = {c: case.images[:, case.classes == c].mean(1) for c in (synth.RC, synth.WM, synth.ED)}
        assert mean[synth.RC][T2] > 1.5 * mean[synth.WM][T2]          # fluid: bright on T2
        assert mean[synth.RC][FLAIR] < 0.5 * mean[synth.ED][FLAIR]    # suppressed on FLAIR
        assert mean[synth.RC][T1] < mean[synth.WM][T1]
    seen = 0
    for p in PATIENTS:
        case = _case("ped2024", p)
        cc, wm = case.classes == synth.CC, case.classes == synth.WM
        if cc.sum() >= 20:
            seen += 1
            assert case.images[T2][cc].mean() > 1.5 * case.images[T2][wm].mean()
    assert seen >= 2


def test_paediatric_solid_cysts_enhancement_location():
    cyst = enhancing = posterior_fossa = edema = 0
    for p in PATIENTS:
        case = _case("ped2024", p)
        assert _count(case, synth.NCR) > 0 and _count(case, synth.NET) == 0 and _count(case, synth.RC) == 0
        cyst += _count(case, synth.CC) > 0
        enhancing += _count(case, synth.ET) > 0
        edema += _count(case, synth.ED) > 0
        assert (_count(case, synth.ET) > 0) == (case.grade == "high")
        # lesion centre in world mm: below the tentorium and behind the midline
        ijk = np.argwhere(case.classes == synth.NCR).mean(0)
        centre = case.affine[:3, :3] @ ijk + case.affine[:3, 3]
        posterior_fossa += centre[2] < -12 and centre[1] < 0
    assert 2 <= cyst <= 9 and 2 <= enhancing <= 9
    assert posterior_fossa >= 2 and edema >= 6


@pytest.mark.skipif("brats2024-ped" not in CONVENTIONS, reason="brats2024-ped convention not defined yet")
def test_paediatric_labels_in_brats2024_ped():
    case = next(c for c in (_case("ped2024", p) for p in PATIENTS)
                if _count(c, synth.CC) and _count(c, synth.ET) and _count(c, synth.ED))
    lab = case.labels("brats2024-ped")
    for tissue, value in ((synth.ET, 1), (synth.NCR, 2), (synth.CC, 3), (synth.ED, 4)):
        assert np.array_equal(case.classes == tissue, lab == value)
    with pytest.raises(MedsegError, match="CC"):
        case.labels("brats2023")


def test_meningioma_on_the_brain_surface():
    with_edema = 0
    for p in PATIENTS:
        case = _case("men2023", p)
        lesion = _lesion(case)
        assert _count(case, synth.ET) > 0 and _count(case, synth.ET) >= _count(case, synth.NCR)
        # extra-axial: the lesion reaches the outside of the (skull-stripped) brain
        assert (ndi.binary_dilation(lesion) & (case.classes == synth.BG)).any(), p
        with_edema += _count(case, synth.ED) > 0
    assert 2 <= with_edema <= 8


def test_metastases_small_and_several():
    several = 0
    for p in PATIENTS:
        case = _case("met2023", p)
        voxel = float(np.prod(np.abs(np.diag(case.affine)[:3])))
        comps, n = ndi.label(np.isin(case.classes, (synth.ET, synth.NCR)))
        assert 1 <= n <= 6 and _count(case, synth.ED) > 0, p
        sizes = np.bincount(comps.ravel())[1:] * voxel
        assert sizes.max() <= 4 / 3 * np.pi * 16.0**3, (p, sizes)     # radius ≤ 12 mm (+ lobes, growth)
        several += n > 1
    assert several >= 3


def test_labels_by_class_and_missing_class_refused():
    case = _case("gli2024", 0)
    with pytest.raises(MedsegError, match=r"RC.*brats2023|brats2023.*RC") as err:
        case.labels("brats2023")
    assert "gli2024" in str(err.value)
    lab = case.labels("brats2024")
    for tissue, value in ((synth.NCR, 1), (synth.ED, 2), (synth.ET, 3), (synth.RC, 4)):
        assert np.array_equal(case.classes == tissue, lab == value)
    for task in ("men2023", "met2023", "ssa2023"):
        case = _case(task, 1)
        for conv, (ncr, ed, et) in (("brats2021", (1, 2, 4)), ("brats2023", (1, 2, 3)), ("msd", (2, 1, 3))):
            lab = case.labels(conv)
            assert np.array_equal(lab == ncr, np.isin(case.classes, (synth.NCR, synth.NET)))
            assert np.array_equal(lab == ed, case.classes == synth.ED)
            assert np.array_equal(lab == et, case.classes == synth.ET)


def test_labels_ignore_classes_the_task_does_not_render():
    """synth_raw builds class maps with its own head classes 9-16 (9, 10 are RC, CC
    here) and labels them as a default-task case: those stay background."""
    classes = np.array([[[0, 5, 6, 7, 8, 9, 10, 12]]], np.uint8)
    case = synth.SynthCase(None, classes, np.eye(4), ("R", "A", "S"), "high")
    assert case.labels("brats2023").ravel().tolist() == [0, 2, 1, 3, 1, 0, 0, 0]


def test_synthesize_task_ids_and_conventions(tmp_path):
    ids = synth.synthesize(tmp_path / "men", 2, "brats2023", shape=(32, 32, 24), task="men2023")
    assert all(i.startswith("BraTS-MEN-") for i in ids)
    ids = synth.synthesize(tmp_path / "gli", 2, "brats2023", shape=(32, 32, 24), task="gli2024")
    assert all(i.startswith("BraTS-GLI-") for i in ids)
    values = set()
    for f in (tmp_path / "gli").rglob("*-seg.nii.gz"):
        values |= set(np.unique(np.asarray(nib.load(f).dataobj)).tolist())
    assert 4 in values                                                # brats2024: 4 = resection cavity
    assert synth.synthesize(tmp_path / "met", 1, "msd", shape=(32, 32, 24), task="met2023") == ["BRATS_001"]
    for task, layout in (("gli2024", "brats2021"), ("ped2024", "msd")):
        with pytest.raises(MedsegError, match=f"{task}.*{layout}"):
            synth.synthesize(tmp_path / f"x-{task}", 1, layout, shape=(32, 32, 24), task=task)
        assert not (tmp_path / f"x-{task}").exists()
    with pytest.raises(MedsegError, match="unknown synthetic task"):
        synth.synthesize(tmp_path / "y", 1, task="GLI")


def test_preview_shows_cavity_and_cysts(tmp_path):
    pytest.importorskip("matplotlib")
    cases = [("post", _case("gli2024", 0)), ("ped", next(c for c in (_case("ped2024", p) for p in PATIENTS)
                                                          if _count(c, synth.CC))),
             ("met", _case("met2023", 1)), ("men", _case("men2023", 0))]
    synth.save_preview(cases, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
