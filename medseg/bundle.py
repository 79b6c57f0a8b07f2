"""Support for running medseg's MONAI bundles with ``python -m monai.bundle``.

The bundle configs import this module (their ``imports`` list), which installs
an exception hook: when a run fails because of a `MedsegError` (bad input, bad
value, missing checkpoint…), MONAI wraps it in ``RuntimeError: Failed to
instantiate component …`` with a long traceback through its config resolver.
The hook prints medseg's own message (what, where, how to fix) instead, and
exits with status 1. Any other exception keeps Python's normal report.

It also holds the bundle steps too long for a one-line ``$`` expression:
`load_weights`, the ``network`` entry of ``inference.json`` (``network_def`` builds
the architecture alone, as in the MONAI model zoo; this step loads a checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import nn

from medseg.errors import MedsegError
from medseg.infer import load_model

__all__ = ["medseg_error", "install_error_hook", "load_weights"]


def medseg_error(exc: BaseException | None) -> MedsegError | None:
    """The `MedsegError` in `exc`'s chain of causes, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedsegError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _hook(exc_type, exc, tb, _previous=sys.excepthook) -> None:
    err = medseg_error(exc)
    if err is None:
        _previous(exc_type, exc, tb)
        return
    print(f"medseg: error: {err}", file=sys.stderr, flush=True)


def install_error_hook() -> None:
    """Report medseg errors in bundle runs as messages, not tracebacks (idempotent)."""
    if sys.excepthook is not _hook:
        sys.excepthook = _hook


def load_weights(network: nn.Module, path: str | Path, model: dict) -> nn.Module:
    """`network` (the bundle's ``network_def``, built from its `model` values
    ``{"name", "args"}``) with the weights of the medseg checkpoint `path`, in eval
    mode: ``(B, 4, D, H, W)`` images → ``(B, 3, D, H, W)`` TC/WT/ET logits.

    The checkpoint's recorded network (``meta["network"]``) must equal `model`: a
    weight copy by parameter name and shape (MONAI's export without ignite) loads
    another architecture partly or not at all, and leaves random weights.
    """
    trained, meta = load_model(path)
    found, expected = (json.loads(json.dumps(s)) for s in (meta["network"], model))  # tuples → lists
    if found != expected:
        raise MedsegError(
            f"{path}: the checkpoint was trained with model {found}, but the bundle's model values "
            f"are {expected}; pass the checkpoint's values, e.g. --model \"{found}\"")
    network.load_state_dict(trained.state_dict())
    return network.eval()


install_error_hook()
