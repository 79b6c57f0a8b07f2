"""Light CPU networks (`medseg.light`, registry names ``mobilenet_unet3d`` and
``thin_unet3d``): shapes in training and evaluation, size, registry entries,
argument errors, gradients, determinism, building blocks and ONNX export parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.export import TOLERANCE, export_onnx
from medseg.labels import CHANNELS, REGIONS
from medseg.light import FuseUp3d, InvertedResidual3d, MobileNetUNet3D, SqueezeExcite3d, ThinUNet3D
from medseg.models import MODELS, UNET3D_FILTERS, build_model, network_from_spec, size_divisor

NAMES = ("mobilenet_unet3d", "thin_unet3d")
CLASSES = {"mobilenet_unet3d": MobileNetUNet3D, "thin_unet3d": ThinUNet3D}


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    out = {}
    for name in NAMES:
        torch.manual_seed(0)
        out[name] = network_from_spec({"name": name, "args": {}}).eval()
    return out


def test_registry_size_divisor_and_parameters(nets):
    cpu_unet = _params(build_model("unet3d", preset="cpu"))
    for name in NAMES:
        assert isinstance(build_model(name), CLASSES[name]) and MODELS[name] is not None
        assert size_divisor(name) == 16                                   # 4 downsamplings
        assert size_divisor(name, channels=[8, 16, 32]) == 4
        n = _params(nets[name])
        print(f"{name} default parameters: {n:,} (unet3d cpu: {cpu_unet:,})")
        assert n < cpu_unet / 3
    assert size_divisor("mobilenet_unet3d", channels=[8, 16, 24, 32, 48, 64], blocks=2) == 32
    assert build_model("mobilenet_unet3d", channels=[8, 16, 24], blocks=1, expansion=3)(
        torch.randn(1, 4, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    assert UNET3D_FILTERS["cpu"][0] == 16 and nets["thin_unet3d"].encoder[0][0][0].out_channels == 8


@pytest.mark.parametrize("name, args, match", [
    ("mobilenet_unet3d", {"width": 2}, "bad arguments"),        # unknown argument (TypeError, wrapped)
    ("thin_unet3d", {"filters": [8, 16]}, "bad arguments"),
    ("thin_unet3d", {"channels": [8]}, "at least 2 levels"),
    ("thin_unet3d", {"channels": "8,16,32"}, "list of integers"),  # e.g. --set model.args.channels=8,16,32
    ("mobilenet_unet3d", {"channels": [8, 16, 0]}, "positive integers"),
    ("mobilenet_unet3d", {"blocks": [1, 2]}, "one entry per stage"),
    ("mobilenet_unet3d", {"expansion": [1, 4, 4, 4, 4]}, "one entry per stage"),
    ("mobilenet_unet3d", {"expansion": [1, 2.5, 4, 4]}, "list of integers"),
    ("mobilenet_unet3d", {"se_reduction": -1}, "se_reduction"),
])
def test_bad_arguments_are_medseg_errors(name, args, match):
    with pytest.raises(MedsegError, match=match):
        build_model(name, **args)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_gradients_and_determinism(name):
    torch.manual_seed(0)
    net = network_from_spec({"name": name, "args": {}}, deep_supervision=True)   # flag is unet3d's only
    out = net.train()(torch.randn(2, len(CHANNELS), 32, 32, 32))   # smallest trainable: a 2³ bottleneck
    assert isinstance(out, torch.Tensor) and out.shape == (2, len(REGIONS), 32, 32, 32)
    (out * torch.randn_like(out)).sum().backward()
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.in_channels == len(CHANNELS)
    g = first.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    with torch.no_grad():
        out = net.eval()(torch.randn(2, len(CHANNELS), 16, 32, 48))
    assert out.shape == (2, len(REGIONS), 16, 32, 48) and torch.isfinite(out).all()
    torch.manual_seed(0)
    again = build_model(name)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_squeeze_excitation_with_zero_weights_halves_its_input():
    # hard-sigmoid(0) = relu6(3) / 6 = 0.5: with zero weights and biases the gate is
    # 0.5 for every sample and channel, whatever the input
    se = SqueezeExcite3d(6, 8)
    for p in se.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 6, 3, 4, 5)
    assert torch.equal(se(x), 0.5 * x)
    # hard-swish and hard-sigmoid, by hand: x·relu6(x+3)/6 and relu6(x+3)/6
    z = torch.linspace(-5, 5, 41)
    assert torch.allclose(torch.nn.Hardswish()(z), z * F.relu6(z + 3) / 6)
    assert torch.allclose(se.gate(z), F.relu6(z + 3) / 6)


def test_inverted_residual_adds_its_input_only_when_shapes_match():
    block = InvertedResidual3d(8, 8, stride=1, expansion=2)
    torch.nn.init.zeros_(block.project[1].weight)          # projection's norm → 0 (its bias is 0)
    x = torch.randn(1, 8, 4, 4, 4)
    assert torch.equal(block(x), x)                         # residual: x + 0
    down = InvertedResidual3d(8, 16, stride=2)
    assert not down.residual and down(x).shape == (1, 16, 2, 2, 2)


def test_fusion_is_concatenation_then_pointwise_convolution():
    # up(W_c · coarse) + W_s · skip == [W_c | W_s] · cat(up(coarse), skip)
    torch.manual_seed(0)
    fuse = FuseUp3d(12, 6, 5)
    coarse, skip = torch.randn(2, 12, 3, 4, 2), torch.randn(2, 6, 6, 8, 4)
    w = torch.cat([fuse.coarse.weight, fuse.skip.weight], 1)
    up = F.interpolate(coarse, size=skip.shape[2:], mode="trilinear", align_corners=False)
    want = F.conv3d(torch.cat([up, skip], 1), w)
    assert torch.allclose(fuse.fused(coarse, skip), want, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_parity(tmp_path, nets, name):
    # as test_deeplab: a checkpoint, `medseg export`'s own export and verification;
    # then logits, torch vs onnxruntime, at the window size and at another shape
    # (multiples of 16: dynamic spatial axes). Small windows keep it fast: at batch 1
    # and under ~48³ torch runs these convolutions on its slow non-oneDNN path.
    net = nets[name]
    roi = (32, 32, 32)
    meta = {"network": {"name": name, "args": {}}, "channels": list(CHANNELS), "regions": list(REGIONS),
            "label_convention": "brats2023", "spacing": [2.5, 2.5, 2.5], "roi": list(roi),
            "normalization": "z-score", "medseg_version": "test",
            "infer": {"overlap": 0.5, "sw_batch_size": 1, "threshold": 0.5, "blend": "gaussian", "amp": False}}
    ck = tmp_path / f"{name}.pt"
    torch.save({"model": net.state_dict(), "meta": meta}, ck)
    report = export_onnx([ck], tmp_path / "m.onnx", print_fn=lambda s: None)
    # export's own fp32 limit (as test_export): the verification patch is half zeros
    # (outside the brain), and instance norm of nearly constant deep channels
    # amplifies float rounding; random init gives ~1e-4 here, as unet3d does
    assert report["max_abs_diff"] < TOLERANCE["fp32"][0]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for size in (roi, (48, 16, 32)):
        x = rng.normal(size=(1, 4, *size)).astype(np.float32)
        got = sess.run(None, {"image": x})[0]
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        assert got.shape == (1, 1, 3, *size)              # (B, K folds, regions, …)
        assert np.abs(got[:, 0] - want).max() < 1e-4      # logits
