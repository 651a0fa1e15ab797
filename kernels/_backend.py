"""Choosing between a kernel's plain-PyTorch reference and its Triton implementation.

Every op in `kernels/` takes `backend=None | "reference" | "triton"`. The default picks Triton for CUDA
tensors and the reference otherwise. An explicitly requested backend that cannot run raises: a silent
fallback to the slow path is the bug users of the official code keep hitting, so we never do it.
"""

from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("reference", "triton")
_logged_choices: set[tuple[str, str, str]] = set()
log = logging.getLogger("kernels")


class BackendUnavailableError(RuntimeError):
    """The requested kernel backend cannot run on these inputs or this machine."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available_for(device: torch.device) -> tuple[bool, str]:
    """Whether our Triton kernels can run on tensors on `device`, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - triton ships with torch
        return False, f"triton is not importable ({err})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreter_enabled():
        return True, ""
    return False, (
        f"Triton kernels need CUDA tensors (got {device.type}); on the CPU they run only under "
        "TRITON_INTERPRET=1, set before the kernels are imported"
    )


def choose_backend(op: str, device: torch.device, backend: str | None) -> str:
    """Resolve `backend` for `op` on `device`, raising if an explicit choice cannot run."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "triton":
        ok, why = triton_available_for(device)
        if not ok:
            raise BackendUnavailableError(f"{op}: backend 'triton' requested but {why}")
    key = (op, device.type, backend)
    if key not in _logged_choices:
        _logged_choices.add(key)
        log.info("%s: using the %s backend for %s tensors", op, backend, device.type)
    return backend
