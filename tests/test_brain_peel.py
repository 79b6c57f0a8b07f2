"""The built-in brain extractor's last step (`peel_brain`) and the morphology under
it, on a hand-built head at 1 mm whose every layer is known."""

from __future__ import annotations

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from medseg.raw.register import _dilate, _erode, peel_brain  # noqa: E402


def _img(a: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> "sitk.Image":
    im = sitk.GetImageFromArray(a)
    im.SetSpacing(spacing)
    return im


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.9, 1.3), (0.45, 0.45, 4.0)])
def test_closing_keeps_the_mask_and_opening_stays_inside(spacing):
    """Erosion is the exact dual of dilation on any voxel size: a closing never loses a
    voxel, an opening never adds one (a shrinking closing cost the brain a voxel layer)."""
    r = np.random.default_rng(3).random((40, 40, 24)) > 0.55
    m = _img(r.astype(np.uint8), spacing)
    for mm in (0.5, 1.0, 2.5, 4.0):
        closed = sitk.GetArrayFromImage(_erode(_dilate(m, mm), mm)) > 0
        opened = sitk.GetArrayFromImage(_dilate(_erode(m, mm), mm)) > 0
        assert not (r & ~closed).any() and not (opened & ~r).any(), mm
    cube = np.zeros((30, 30, 30), np.uint8)
    cube[10:20, 10:20, 10:20] = 1
    c = _img(cube)
    assert (sitk.GetArrayFromImage(_erode(c, 0.0)) > 0).sum() == 1000
    assert (sitk.GetArrayFromImage(_erode(c, 1.0)) > 0).sum() == 8 ** 3
    assert (sitk.GetArrayFromImage(_dilate(c, 1.0)) > 0).sum() == 1000 + 6 * 100


def _head(seed: int = 0):
    """Concentric layers around a brain (radius 40 mm: white matter, a cortex with
    CSF-filled sulci, a 1 mm CSF rim), then 2.5 mm of outer CSF/meninges, a 2 mm inner
    table, 3 mm of marrow, an outer table and scalp; a 6 mm hole through the meninges
    and inner table lets the marrow touch the cortex. Returns the T1ce, the FLAIR, the
    true brain and the mask an extractor that stops at the skull would give."""
    n = 120
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float32) - n / 2
    r = np.sqrt(x * x + y * y + z * z)
    t1 = np.zeros((n, n, n), np.float32)
    fl = np.zeros_like(t1)
    brain = r <= 40.0
    def put(sel, a, b):
        t1[sel], fl[sel] = a, b
    put(r <= 36, 0.90, 0.55)                                   # white matter
    put((r > 36) & (r <= 39), 0.64, 0.72)                      # cortex
    sulci = (r > 36.5) & (r <= 40) & (np.abs(np.sin(np.arctan2(y, x) * 12)) < 0.12)
    put(sulci | ((r > 39) & (r <= 40)), 0.28, 0.12)            # sulcal CSF and the rim
    put((r > 40) & (r <= 42.5), 0.45, 0.16)                    # outer CSF / meninges
    put((r > 42.5) & (r <= 44.5), 0.03, 0.03)                  # inner table
    put((r > 44.5) & (r <= 47.5), 0.97, 0.70)                  # marrow
    put((r > 47.5) & (r <= 49.5), 0.03, 0.03)                  # outer table
    put((r > 49.5) & (r <= 53), 0.60, 0.55)                    # scalp
    hole = (r > 39.5) & (r <= 44.5) & (np.hypot(x, y) < 3) & (z > 0)
    put(hole, 0.97, 0.70)                                      # marrow through the skull
    ventricle = np.hypot(x / 12, np.hypot(y, z) / 6) < 1
    put(ventricle, 0.28, 0.12)
    rng = np.random.default_rng(seed)
    t1 = t1 * 1000 + rng.normal(0, 25, t1.shape)
    fl = fl * 800 + rng.normal(0, 25, fl.shape)
    skull_stop = (r <= 42.5) | hole | ((r <= 47.5) & (np.hypot(x, y) < 8) & (z > 0))
    return t1.astype(np.float32), fl.astype(np.float32), brain, skull_stop


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("with_flair", [True, False])
def test_peel_removes_outer_csf_and_marrow_through_the_skull(with_flair):
    t1, fl, brain, rough = _head()
    out = peel_brain(_img(t1), sitk.Cast(_img(rough.astype(np.uint8)), sitk.sitkUInt8),
                     _img(fl) if with_flair else None)
    got = sitk.GetArrayFromImage(out) > 0
    assert _dice(rough, brain) < 0.92                 # the rough mask: outer CSF and marrow
    assert _dice(got, brain) >= 0.97, _dice(got, brain)
    n = t1.shape[0]
    z, y, x = np.mgrid[:n, :n, :n] - n / 2
    r = np.sqrt(x * x + y * y + z * z)
    assert not (got & (r > 42.5)).any()               # nothing beyond the inner table
    assert got[np.hypot(np.hypot(x, y) / 12, z / 6) < 1].all()   # the ventricle is kept
    assert (got & (r > 40) & (r <= 42.5)).sum() < 0.15 * ((r > 40) & (r <= 42.5)).sum()


def test_peel_keeps_oedema_at_the_surface_when_flair_shows_it():
    """Oedema reaching the cortex is as dark as grey matter on the T1ce; the FLAIR
    keeps it in the brain."""
    t1, fl, brain, rough = _head(1)
    n = t1.shape[0]
    z, y, x = np.mgrid[:n, :n, :n] - n / 2
    oedema = (np.sqrt((x - 30) ** 2 + y ** 2 + z ** 2) < 12) & brain
    t1[oedema], fl[oedema] = 500, 1500
    got = sitk.GetArrayFromImage(peel_brain(_img(t1), sitk.Cast(_img(rough.astype(np.uint8)), sitk.sitkUInt8),
                                            _img(fl))) > 0
    assert got[oedema].mean() > 0.97


def test_peel_leaves_a_mask_it_cannot_read_alone():
    empty = np.zeros((20, 20, 20), np.uint8)
    m = sitk.Cast(_img(empty), sitk.sitkUInt8)
    assert (sitk.GetArrayFromImage(peel_brain(_img(empty.astype(np.float32)), m)) == 0).all()
