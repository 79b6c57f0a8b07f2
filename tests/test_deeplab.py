"""3D DeepLabv3+ (`medseg.deeplab`, registry name ``deeplabv3plus``): shapes, gradients,
size, registry entries, argument errors and ONNX export parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.deeplab import OUTPUT_STRIDE, DeepLabV3Plus3D
from medseg.errors import MedsegError
from medseg.export import export_onnx
from medseg.labels import CHANNELS, REGIONS
from medseg.models import MODELS, build_model, network_from_spec, size_divisor

NAME = "deeplabv3plus"


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return network_from_spec({"name": NAME, "args": {}}).eval()


@pytest.mark.parametrize("size", [(48, 48, 48), (32, 48, 64)])
def test_output_matches_input_size(net, size):
    with torch.no_grad():
        out = net(torch.randn(1, len(CHANNELS), *size))
    assert out.shape == (1, len(REGIONS), *size) and torch.isfinite(out).all()


def test_registry_and_size_divisor():
    assert MODELS[NAME] is not None and isinstance(build_model(NAME), DeepLabV3Plus3D)
    assert size_divisor(NAME) == OUTPUT_STRIDE == 8
    assert size_divisor(NAME, channels=[8, 16, 32, 64], aspp_rates=[2, 4, 6]) == 8
    # no deep supervision: the flag is for unet3d only, the output is a plain tensor
    net = network_from_spec({"name": NAME, "args": {"channels": [8, 8, 16, 16]}}, deep_supervision=True)
    assert net.train()(torch.randn(1, 4, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_parameter_count_is_cpu_sized(net):
    n = sum(p.numel() for p in net.parameters())
    print(f"deeplabv3plus default parameters: {n:,}")
    assert 1_000_000 <= n <= 3_000_000
    small = sum(p.numel() for p in build_model(NAME, channels=[8, 16, 32, 64]).parameters())
    assert small < n / 3


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = build_model(NAME, dropout=0.1).train()
    out = net(torch.randn(2, 4, 16, 16, 16))   # the smallest trainable size: a 2³ map at stride 8
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("args, match", [
    ({"width": 3}, "bad arguments"),                       # unknown argument (TypeError, wrapped)
    ({"channels": [16, 32, 64]}, "expected 4 positive widths"),
    ({"aspp_rates": [0, 2]}, "positive integers"),
    ({"dropout": 1.5}, "probability"),
    ({"aspp_rates": "2,4,6"}, "lists of integers"),        # e.g. --set model.args.aspp_rates=2,4,6
])
def test_bad_arguments_are_medseg_errors(args, match):
    with pytest.raises(MedsegError, match=match):
        build_model(NAME, **args)


def test_onnx_export_parity(tmp_path, net):
    # as test_export's registry parity test: a checkpoint, `medseg export`'s own
    # export and verification; then logits, torch vs onnxruntime, at the window
    # size and at another multiple of 8 (dynamic spatial axes)
    roi = (48, 48, 48)
    meta = {"network": {"name": NAME, "args": {}}, "channels": list(CHANNELS), "regions": list(REGIONS),
            "label_convention": "brats2023", "spacing": [2.5, 2.5, 2.5], "roi": list(roi),
            "normalization": "z-score", "medseg_version": "test",
            "infer": {"overlap": 0.5, "sw_batch_size": 1, "threshold": 0.5, "blend": "gaussian", "amp": False}}
    ck = tmp_path / f"{NAME}.pt"
    torch.save({"model": net.state_dict(), "meta": meta}, ck)
    report = export_onnx([ck], tmp_path / "m.onnx", print_fn=lambda s: None)
    assert report["max_abs_diff"] < 1e-4
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for size in (roi, (32, 48, 64)):
        x = rng.normal(size=(1, 4, *size)).astype(np.float32)
        got = sess.run(None, {"image": x})[0]
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        assert got.shape == (1, 1, 3, *size)              # (B, K folds, regions, …)
        assert np.abs(got[:, 0] - want).max() < 1e-4
