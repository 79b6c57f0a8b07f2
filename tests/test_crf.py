"""Dense-CRF post-processing (medseg.crf): a known edge, stability on a featureless
image, nesting, parameter checks and the processed box — synthetic, a few seconds."""

import subprocess
import sys

import numpy as np
import pytest

from medseg.crf import (CRF_INSTALL, CRF_PACKAGE, CRFParams, classes_to_regions, crf_box, crf_classes,
                        crf_available, dense_crf, nest_upwards, region_chain, regions_to_classes)
from medseg.errors import MedsegError
from medseg.labels import REGIONS

needs_crf = pytest.mark.skipif(not crf_available(), reason=f"the dense CRF package {CRF_PACKAGE} is not "
                               f"installed ({CRF_INSTALL}, or the dev extra)")

TC, WT, ET = (REGIONS.index(r) for r in ("TC", "WT", "ET"))


def level(w: np.ndarray) -> float:
    """Where the centre line along x of a (X, Y, Z) map first drops below 0.5 (linear
    interpolation between voxel centres)."""
    line = w[:, w.shape[1] // 2, w.shape[2] // 2]
    i = int(np.flatnonzero(line < 0.5)[0])
    return i - 1 + (line[i - 1] - 0.5) / (line[i - 1] - line[i])


def edge_case(slope: float, nx: int = 48, ny: int = 12, edge: int = 20, centre: int = 23):
    """Four channels bright (+1 z) for x < `edge`, dark (−1 z) beyond, plus noise; the
    network's probabilities a sigmoid ramp centred at x = `centre`, the same for all
    three regions (so every region's boundary is 3 voxels off the image's edge)."""
    x = np.arange(nx, dtype=np.float32)[:, None, None] * np.ones((1, ny, ny), np.float32)
    img = np.repeat(np.where(x < edge, 1.0, -1.0)[None], 4, 0).astype(np.float32)
    img += np.random.default_rng(0).normal(scale=0.2, size=img.shape).astype(np.float32)
    ramp = (1.0 / (1.0 + np.exp(-(centre - x) / slope))).astype(np.float32)
    return np.stack([ramp, ramp, ramp]), img


@needs_crf
@pytest.mark.parametrize("label_model", ["regions", "classes"])
@pytest.mark.parametrize("spacing, slope", [(1.0, 1.5), (2.5, 2.5)])
def test_boundary_moves_to_the_image_edge(label_model, spacing, slope):
    probs, img = edge_case(slope)
    before = [level(probs[i]) for i in range(3)]
    assert before == pytest.approx([23.0] * 3, abs=1e-4)
    out = dense_crf(probs, img, CRFParams(label_model=label_model), spacing=(spacing,) * 3)
    # The image's edge lies between voxels 19 and 20: the 0.5 level must be there (±1).
    for i in range(3):
        assert abs(level(out[i]) - 19.5) <= 1.0, (REGIONS[i], level(out[i]))
    # Far from the boundary the answer stays: inside, outside.
    assert (out[:, :15] > 0.5).all() and (out[:, 28:] < 0.5).all()


@needs_crf
@pytest.mark.parametrize("label_model", ["regions", "classes"])
def test_featureless_image_keeps_confident_regions(label_model):
    # A tumour (WT ⊃ TC ⊃ ET: a ball, a core, an enhancing shell of it) that the network
    # is 99.9 % sure of, on a uniform image: no edge to move to, nothing may change.
    n, sp = 40, 2.5
    c = (np.arange(n) - n / 2) * sp
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(c, c, c, indexing="ij")))
    regions = np.zeros((3, n, n, n), bool)
    regions[WT], regions[TC] = r < 25, r < 15
    regions[ET] = regions[TC] & (r > 8)
    probs = np.where(regions, 0.999, 0.001).astype(np.float32)
    out = dense_crf(probs, np.zeros((4, n, n, n), np.float32), CRFParams(label_model=label_model),
                    spacing=(sp,) * 3)
    np.testing.assert_array_equal(out > 0.5, regions)
    # A uniform image with an isolated uncertain voxel: smoothing decides it (the
    # other way round from its own 0.6).
    probs2 = np.where(regions, 0.999, 0.001).astype(np.float32)
    probs2[:, 2, 20, 20] = 0.6
    out2 = dense_crf(probs2, np.zeros((4, n, n, n), np.float32), CRFParams(label_model=label_model),
                     spacing=(sp,) * 3)
    assert (out2[:, 2, 20, 20] < 0.5).all()


@needs_crf
@pytest.mark.parametrize("label_model", ["regions", "classes"])
def test_output_regions_are_nested(label_model):
    # Noisy probabilities that break the nesting (ET > TC, TC > WT in places).
    rng = np.random.default_rng(1)
    shape = (24, 20, 16)
    img = rng.normal(size=(4, *shape)).astype(np.float32)
    probs = rng.random((3, *shape)).astype(np.float32)
    assert (probs[ET] > probs[TC]).any() and (probs[TC] > probs[WT]).any()
    out = dense_crf(probs, img, CRFParams(label_model=label_model), spacing=(1.0, 1.0, 2.0))
    assert out.shape == probs.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    assert (out[ET] <= out[TC] + 1e-6).all() and (out[TC] <= out[WT] + 1e-6).all()
    # The input is not modified.
    assert (probs[ET] > probs[TC]).any()


def test_label_model_round_trip_and_classes():
    assert [REGIONS[i] for i in region_chain()] == ["WT", "TC", "ET"]
    assert crf_classes() == ["background", "ED", "NCR", "ET"]
    p = np.random.default_rng(2).random((3, 5, 6, 7)).astype(np.float32)
    q = regions_to_classes(p)
    assert q.shape == (4, 5, 6, 7) and (q >= 0).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-6)
    back = classes_to_regions(q)
    np.testing.assert_allclose(back, nest_upwards(p), atol=1e-6)
    # Nested upwards = the precedence of regions_to_labels: ET stays, TC and WT grow.
    np.testing.assert_array_equal(back[ET], p[ET])
    assert (back[TC] >= p[TC] - 1e-6).all() and (back[WT] >= np.maximum(p[WT], p[TC]) - 1e-6).all()
    assert (back[TC] >= back[ET]).all() and (back[WT] >= back[TC]).all()


@pytest.mark.parametrize("bad", [
    {"bilateral_weight": -1}, {"gaussian_weight": float("nan")}, {"bilateral_sigma_mm": 0},
    {"bilateral_sigma_z": -0.5}, {"gaussian_sigma_mm": float("inf")}, {"iterations": 0},
    {"iterations": 2.5}, {"iterations": 1000}, {"box_probability": 1.5}, {"box_probability": 0},
    {"margin_mm": -1}, {"label_model": "softmax"}, {"bilateral_weight": "5"}, {"iterations": True},
])
def test_params_out_of_range_raise(bad):
    with pytest.raises(MedsegError, match=next(iter(bad))):
        CRFParams(**bad)


def test_params_parse_and_record():
    p = CRFParams.parse("bilateral_weight=4, bilateral-sigma-mm=15,iterations=3,label_model=classes")
    assert (p.bilateral_weight, p.bilateral_sigma_mm, p.iterations, p.label_model) == (4.0, 15.0, 3, "classes")
    assert CRFParams.parse("") == CRFParams() == CRFParams.parse(None)
    assert CRFParams.from_dict(p.to_dict()) == p
    for text, match in [("foo=1", "unknown CRF parameter"), ("iterations", "key=value"),
                        ("bilateral_weight=abc", "not a number"), ("iterations=0", "out of range")]:
        with pytest.raises(MedsegError, match=match):
            CRFParams.parse(text)


@needs_crf
def test_outside_the_box_is_bit_identical():
    rng = np.random.default_rng(3)
    shape = (48, 40, 32)
    probs = (rng.random((3, *shape)) * 0.04).astype(np.float32)      # all below 0.05 …
    probs[:, 20:26, 18:22, 10:14] = 0.9                               # … but a small tumour
    probs[ET, 20:26, 18:22, 10:14] = 0.6
    img = rng.normal(size=(4, *shape)).astype(np.float32)
    params = CRFParams(margin_mm=5.0)
    box = crf_box(probs, params, (2.5, 2.5, 2.5))
    assert box == (slice(18, 28), slice(16, 24), slice(8, 16))       # ±2 voxels of 2.5 mm
    out = dense_crf(probs, img, params, spacing=(2.5, 2.5, 2.5))
    outside = np.ones(shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(out[:, outside], probs[:, outside])
    assert not np.array_equal(out[(slice(None), *box)], probs[(slice(None), *box)])
    # Nothing above box_probability: the input comes back unchanged.
    low = (rng.random((3, *shape)) * 0.05).astype(np.float32)
    np.testing.assert_array_equal(dense_crf(low, img, params, spacing=(1, 1, 1)), low)


@needs_crf
def test_bad_inputs_raise():
    p = np.zeros((3, 8, 8, 8), np.float32)
    img = np.zeros((4, 8, 8, 8), np.float32)
    with pytest.raises(MedsegError, match="shape"):
        dense_crf(p[:2], img, spacing=(1, 1, 1))
    with pytest.raises(MedsegError, match="does not match"):
        dense_crf(p, img[:, :4], spacing=(1, 1, 1))
    with pytest.raises(MedsegError, match="spacing"):
        dense_crf(p, img, spacing=(1, 0, 1))


def test_missing_package_names_the_install_command():
    # A fresh interpreter where importing pydensecrf fails.
    code = ("import sys; sys.modules['pydensecrf'] = None; sys.modules['pydensecrf.densecrf'] = None\n"
            "import numpy as np\n"
            "from medseg.crf import dense_crf, require_crf, crf_available\n"
            "from medseg.errors import MedsegError\n"
            "assert not crf_available()\n"
            "for f in (require_crf, lambda: dense_crf(np.zeros((3, 4, 4, 4), np.float32), "
            "np.zeros((4, 4, 4, 4), np.float32), spacing=(1, 1, 1))):\n"
            "    try:\n"
            "        f()\n"
            "    except MedsegError as e:\n"
            "        print(e)\n"
            "    else:\n"
            "        raise SystemExit('no error')\n"
            "assert 'torch' not in sys.modules, 'medseg.crf imported torch'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and all(CRF_PACKAGE in s and CRF_INSTALL in s for s in lines)


# ----------------------------------------------------------------------------- engine wiring
from medseg.engine import Engine  # noqa: E402

wired = pytest.mark.skipif(not hasattr(Engine, "refine"),
                           reason="the engine wiring of --crf (Engine.crf / Engine.refine) is not applied yet")


class _FakeEngine(Engine):
    """One 'model' whose logits are the window's FLAIR channel, scaled: no torch, no ONNX."""

    engine = "fake"

    def __init__(self, spec, mirror=False):
        super().__init__(spec, {"network": {"name": "fake"}}, 1, mirror, ["fake"])

    def _window_logits(self, windows):
        w = np.stack(windows)                                          # (B, 4, *roi)
        return np.repeat(3.0 * w[:, None, 3:4], 3, axis=2).astype(np.float32)   # (B, 1, 3, *roi)


def _case(tmp_path):
    import nibabel as nib
    from medseg.labels import CHANNELS
    rng = np.random.default_rng(4)
    vol = 100.0 + rng.normal(scale=2.0, size=(4, 24, 22, 18))
    vol[:, 8:16, 7:15, 6:12] += 40.0                                  # a bright 'tumour' block
    paths = []
    for ch, a in zip(CHANNELS, vol.astype(np.float32)):
        paths.append(tmp_path / f"case_{ch}.nii.gz")
        nib.save(nib.Nifti1Image(a, np.diag([1.0, 1.0, 1.0, 1.0])), paths[-1])
    return paths


@wired
def test_engine_applies_the_crf_on_the_model_grid_before_restore(tmp_path, monkeypatch):
    import medseg.engine as engine_mod
    from medseg.pipeline import PipelineSpec, restore
    spec = PipelineSpec(spacing=(2.0, 2.0, 2.0), roi=(16, 16, 16), label_convention="brats2023")
    eng = _FakeEngine(spec, mirror=True)                               # 8 members: uncertainty runs
    images = _case(tmp_path)
    plain, _ = eng.probabilities(images)
    x, grid, _ = eng.prepare(images)
    calls = []

    def spy(probs, image, params, *, spacing):
        calls.append((probs.shape, image.shape, params, tuple(spacing)))
        np.testing.assert_array_equal(image, x)
        return np.full_like(probs, 0.25)

    monkeypatch.setattr(engine_mod, "dense_crf", spy)
    eng.crf = CRFParams(iterations=2)
    refined, _ = eng.probabilities(images)
    mean, maps, _ = eng.uncertainty(images)
    assert calls == [((3, *x.shape[1:]), x.shape, eng.crf, (2.0, 2.0, 2.0))] * 2
    expected = restore(np.full((3, *x.shape[1:]), 0.25, np.float32), grid)
    np.testing.assert_allclose(refined, expected)
    np.testing.assert_allclose(mean, expected)
    assert refined.shape == plain.shape
    assert "dense CRF" in eng.postprocessing()
    eng.crf = None
    np.testing.assert_array_equal(eng.probabilities(images)[0], plain)
    assert "dense CRF" not in eng.postprocessing()


@wired
@needs_crf
def test_engine_with_the_real_crf(tmp_path):
    from medseg.pipeline import PipelineSpec
    eng = _FakeEngine(PipelineSpec(spacing=(2.0, 2.0, 2.0), roi=(16, 16, 16), label_convention="brats2023"))
    images = _case(tmp_path)
    plain, _ = eng.probabilities(images)
    eng.crf = CRFParams()
    refined, _ = eng.probabilities(images)
    assert refined.shape == plain.shape and np.isfinite(refined).all()
    assert (refined[2] <= refined[0] + 1e-6).all() and (refined[0] <= refined[1] + 1e-6).all()
