"""train.grad_checkpoint: same loss and gradients, fewer activations kept for backward."""

import pytest
import torch

from medseg.errors import MedsegError
from medseg.grad_checkpoint import checkpointed_blocks, enable_grad_checkpoint
from medseg.losses import build_loss
from medseg.models import build_model

FILTERS = (4, 8, 16, 16)


def _step(checkpointed: bool, missing_aware: bool = False, drop: int | None = None):
    """One training step of a small unet3d with deep supervision → (loss, gradients,
    MB of tensors saved for backward outside the checkpointed blocks)."""
    torch.manual_seed(0)
    net = build_model("unet3d", filters=FILTERS, deep_supervision=True, missing_aware=missing_aware).train()
    if missing_aware:     # non-zero FiLM weights, so the flags matter
        for n, p in net.named_parameters():
            if n.endswith("film.weight"):
                torch.nn.init.normal_(p, std=0.5)
    if checkpointed:
        enable_grad_checkpoint(net)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 16, 16, 16)
    if drop is not None:
        x[0, drop] = 0
    t = (torch.rand(2, 3, 16, 16, 16) > 0.7).float()
    saved: dict[int, int] = {}

    def pack(tensor):
        st = tensor.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return tensor
    loss_fn = build_loss(deep_supervision=True, levels=2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(list(torch.unbind(net(x), 1)), t)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(saved.values()) / 2 ** 20


@pytest.mark.parametrize("missing_aware, drop", [(False, None), (True, 2)])
def test_same_loss_and_gradients_with_fewer_saved_activations(missing_aware, drop):
    loss0, g0, mb0 = _step(False, missing_aware, drop)
    loss1, g1, mb1 = _step(True, missing_aware, drop)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    assert mb1 < mb0 / 2, (mb0, mb1)


def test_missing_aware_recompute_uses_the_steps_flags():
    # With a modality dropped, the FiLM modulation changes the output; a recompute
    # without the flags would give other gradients than the plain network's.
    _, g_drop, _ = _step(False, True, 2)
    _, g_full, _ = _step(False, True, None)
    assert any((g_drop[n] - g_full[n]).abs().max() > 1e-6 for n in g_drop)


def test_eval_and_no_grad_run_the_blocks_directly():
    net = enable_grad_checkpoint(build_model("unet3d", filters=FILTERS, deep_supervision=False))
    plain = build_model("unet3d", filters=FILTERS, deep_supervision=False)
    plain.load_state_dict(net.state_dict())          # same keys: the state dict is unchanged
    net.eval(), plain.eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))
    assert len(checkpointed_blocks(net)) == 2 * len(FILTERS) - 1


def test_other_networks_are_refused_with_a_reason():
    with pytest.raises(MedsegError, match="unet3d"):
        enable_grad_checkpoint(build_model("segresnet", init_filters=8))
