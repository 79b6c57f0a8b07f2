"""Support for running medseg's MONAI bundles with ``python -m monai.bundle``.

The bundle configs import this module (their ``imports`` list), which installs
an exception hook: when a run fails because of a `MedsegError` (bad input, bad
value, missing checkpoint…), MONAI wraps it in ``RuntimeError: Failed to
instantiate component …`` with a long traceback through its config resolver.
The hook prints medseg's own message (what, where, how to fix) instead, and
exits with status 1. Any other exception keeps Python's normal report.
"""

from __future__ import annotations

import sys

from medseg.errors import MedsegError

__all__ = ["medseg_error", "install_error_hook"]


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


install_error_hook()
