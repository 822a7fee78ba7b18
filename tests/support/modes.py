"""Run a child process that file modes bind even when the tests run as root."""

from __future__ import annotations

import os
import sys

import pytest


def _drop_dac_override() -> None:  # pragma: no cover - runs in the child, before exec
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that root's
    child obeys file modes (PR_CAPBSET_DROP; the capabilities after exec are that set)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def bound_by_modes() -> dict:
    """Popen arguments for a writer that a read-only mode stops: as it is, or for root (whom
    modes do not stop) without the capability to override them."""
    if os.geteuid() != 0:
        return {}
    if not sys.platform.startswith("linux"):
        pytest.skip("running as root, and dropping root's override of file modes needs Linux")
    return {"preexec_fn": _drop_dac_override}
