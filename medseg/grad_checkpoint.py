"""Gradient checkpointing (``train.grad_checkpoint``): the encoder and decoder
blocks of `unet3d` keep only their inputs in the forward pass and recompute
their activations in the backward pass (`torch.utils.checkpoint`, non-reentrant).

Values and gradients are those of the plain network (the recomputation runs
the same operations on the same inputs; the network has no dropout); the cost
is about one more forward pass of those blocks per step, the gain the
activation memory of everything inside them (measured by
`benchmarks/grad_checkpoint.py`). Evaluation and inference (no gradient, or
``eval()``) run the blocks directly. Checkpoints and exported models do not
change: the wrapping lives on the training network's instance only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medseg.errors import MedsegError

__all__ = ["enable_grad_checkpoint", "checkpointed_blocks"]


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of `model` whose activations are recomputed: a DynUNet's input
    block, down-sampling blocks, bottleneck and up-sampling blocks (the output and
    deep-supervision heads are single 1×1×1 convolutions, not worth it)."""
    from monai.networks.nets import DynUNet
    if isinstance(model, DynUNet):
        return [model.input_block, *model.downsamples, model.bottleneck, *model.upsamples]
    raise MedsegError(f"train.grad_checkpoint=true: supported for the unet3d network (DynUNet), not "
                      f"{type(model).__name__}; set train.grad_checkpoint=false for this model")


def _wrap(block: nn.Module, root: nn.Module) -> Callable:
    forward = block.forward
    state = getattr(root, "_missing_state", None)      # MissingAwareDynUNet: flags read by its FiLM norms

    def checkpointed(*args):
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args)
        flags = state.flags if state is not None else None

        def run(*a):
            # The recomputation happens in backward, after the network's forward has
            # reset the missing-modality flags: put this step's flags back for it.
            if state is None:
                return forward(*a)
            before = state.flags
            state.flags = flags
            try:
                return forward(*a)
            finally:
                state.flags = before
        return checkpoint(run, *args, use_reentrant=False)
    return checkpointed


def enable_grad_checkpoint(model: nn.Module) -> nn.Module:
    """Make `model`'s blocks (`checkpointed_blocks`) recompute their activations in
    backward; returns `model` (changed in place, its state dict unchanged)."""
    for block in checkpointed_blocks(model):
        if not getattr(block, "_medseg_checkpointed", False):
            block.forward = _wrap(block, model)
            block._medseg_checkpointed = True
    return model
