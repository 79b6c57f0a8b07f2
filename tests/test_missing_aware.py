"""The missing-aware unet3d (``model.args.missing_aware``): every instance norm is
followed by a FiLM modulation driven by which input channels are missing. With
all four modalities it is exactly the plain network; the flags are computed from
the input inside the network, so they survive ONNX export; a plain model starts
a missing-aware one through `train.init_from`."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from medseg.config import resolve_config
from medseg.errors import MedsegError
from medseg.models import FiLMInstanceNorm3d, build_model, missing_channels
from medseg.train import initial_weights, modality_dropout, train_fold

from conftest import TINY_TRAIN


def quiet(_: str) -> None:
    pass


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    plain = build_model("unet3d", filters=(8, 16, 32), deep_supervision=False).eval()
    aware = build_model("unet3d", filters=(8, 16, 32), deep_supervision=False, missing_aware=True).eval()
    missing, unexpected = aware.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith(".film.weight") for k in missing)
    return plain, aware


def _scramble(net: torch.nn.Module) -> int:
    """Give every FiLM layer non-zero weights (as training would); → how many."""
    n = 0
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, FiLMInstanceNorm3d):
                m.film.weight.normal_(0.0, 0.5)
                n += 1
    return n


def _inputs(drop: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(2, 4, 16, 24, 16, generator=torch.Generator().manual_seed(len(drop)))
    x[0, list(drop)] = 0.0               # sample 0 lacks `drop`; sample 1 is complete
    return x


def test_missing_channels_flags_blank_channels_and_treats_a_blank_window_as_complete():
    x = torch.randn(3, 4, 5, 5, 5)
    x[0, 1] = 0.0
    x[1, [0, 2, 3]] = 0.0
    x[2] = 0.0                           # outside the brain: nothing to tell
    x[1, 1, 0, 0, 0] = 0.0               # one zero voxel does not make a channel missing
    assert missing_channels(x).tolist() == [[0, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]]


def test_missing_aware_network_is_the_plain_one_on_full_inputs():
    """Loaded with a plain network's weights it is that network on every input;
    whatever FiLM learns, complete inputs still give exactly the plain output
    (flags 0, no bias), while a missing channel changes it."""
    plain, aware = _pair()
    with torch.no_grad():
        for drop in ((), (1,), (0, 2, 3)):
            x = _inputs(drop)
            assert torch.equal(plain(x), aware(x))
        assert _scramble(aware) == sum(isinstance(m, torch.nn.InstanceNorm3d) for m in plain.modules())
        for drop in ((1,), (0, 2, 3)):
            x = _inputs(drop)
            a, b = plain(x), aware(x)
            assert torch.equal(a[1], b[1]), "the complete sample must not change"
            assert (a[0] - b[0]).abs().max() > 1e-2, "a missing channel must change the output"
    # state-dict keys: the plain network's plus one FiLM weight per norm
    extra = set(aware.state_dict()) - set(plain.state_dict())
    assert extra and all(k.endswith(".film.weight") for k in extra)


def test_missing_flags_are_computed_in_the_onnx_graph():
    """Exported once (traced on a complete input), the graph still reads the flags
    from each input: ONNX Runtime (and a TorchScript trace) equal PyTorch with and
    without missing channels."""
    import onnxruntime as ort
    _, aware = _pair(1)
    _scramble(aware)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(aware, (torch.randn(1, 4, 16, 16, 16),), buf, input_names=["image"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "batch", 2: "d", 3: "h", 4: "w"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for drop in ((), (1,), (0, 2, 3)):
        x = _inputs(drop)
        with torch.no_grad():
            want = aware(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        # (flags frozen at the traced "complete" would be off by > 1e-2 on sample 0)
        np.testing.assert_allclose(got, want, atol=1e-4)
    # the same holds for a TorchScript trace (the bundle's ckpt_export --use_trace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(aware, torch.randn(1, 4, 16, 16, 16))
    with torch.no_grad():
        for drop in ((1,), (0, 2, 3)):
            x = _inputs(drop)
            torch.testing.assert_close(traced(x), aware(x), atol=1e-5, rtol=1e-5)


def test_missing_aware_needs_dropout_and_starts_from_a_plain_model(split, tmp_path):
    """`missing_aware` without modality dropout is refused (nothing would teach
    the modulation); a plain model of the same fold starts a missing-aware run
    (lr 0: the shared weights come out unchanged, FiLM stays at zero); a
    missing-aware model does not start a plain run."""
    with pytest.raises(MedsegError, match="train.modality_dropout > 0"):
        modality_dropout(resolve_config("cpu", ["model.args.missing_aware=true"]))
    dl, root = split()
    src = tmp_path / "plain"
    train_fold(resolve_config("cpu", TINY_TRAIN), dl, root, 0, src, print_fn=quiet, device="cpu")
    cfg = resolve_config("cpu", [*TINY_TRAIN, "model.args.missing_aware=true", "train.modality_dropout=0.5",
                                 f"train.init_from={src}", "train.lr=0", "train.epochs=1"])
    assert initial_weights(cfg, 0, dl)[0] == src / "checkpoints" / "last.pt"
    train_fold(cfg, dl, root, 0, tmp_path / "aware", print_fn=quiet, device="cpu")
    got = torch.load(tmp_path / "aware" / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    was = torch.load(src / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    assert got["meta"]["network"]["args"]["missing_aware"] is True
    for k, v in got["model"].items():
        if k.endswith(".film.weight"):
            assert not v.any(), k
        else:
            assert torch.equal(v, was["model"][k]), k
    back = resolve_config("cpu", [*TINY_TRAIN, f"train.init_from={tmp_path / 'aware'}"])
    with pytest.raises(MedsegError, match="same network"):
        initial_weights(back, 0, dl)


def test_dropped_samples_pass_on_a_share_of_their_gradient():
    """`train.modality_dropout_weight`: the forward values (the loss) are those of
    the network; the gradient through a sample that lacks a modality is scaled by
    the weight, a complete sample's is untouched. Checked against per-sample
    gradients computed without the scaling; and the key's range."""
    from medseg.train import modality_dropout_weight, scale_dropped_gradient
    torch.manual_seed(0)
    net = torch.nn.Conv3d(4, 3, 3, padding=1)
    x = _inputs((1, 2))                       # sample 0 lacks two modalities
    target = torch.rand(2, 3, 16, 24, 16)

    def grads(weight: float | None, sample: int | None = None):
        net.zero_grad()
        out = net(x)
        if weight is not None:
            out = scale_dropped_gradient(out, x, weight)
        if sample is not None:
            out = out[sample:sample + 1]
        ((out - (target if sample is None else target[sample:sample + 1])) ** 2).sum().backward()
        return net.weight.grad.clone(), out.detach()

    g_scaled, v_scaled = grads(0.25)
    _, v_plain = grads(None)
    torch.testing.assert_close(v_scaled, v_plain)
    g0, _ = grads(None, 0)
    g1, _ = grads(None, 1)
    torch.testing.assert_close(g_scaled, 0.25 * g0 + g1, rtol=1e-4, atol=1e-4)
    assert modality_dropout_weight(resolve_config("cpu", [])) == 1.0
    for bad in ("0", "1.5"):
        with pytest.raises(MedsegError, match="modality_dropout_weight"):
            modality_dropout_weight(resolve_config("cpu", [f"train.modality_dropout_weight={bad}"]))
