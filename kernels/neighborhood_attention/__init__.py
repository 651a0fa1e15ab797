"""2D neighborhood attention with relative positional bias (DiNAT): `neighborhood_attention` dispatches to
the plain-PyTorch reference or the FlexAttention path.

Backends are "reference" and "flex" (not the "triton" of kernels/_backend.py: the fast path here is torch's
FlexAttention, which generates its own Triton). Dispatch follows the same rules: the default is the fast
path for CUDA tensors and the reference otherwise; an explicitly requested backend that cannot run raises
BackendUnavailableError rather than silently falling back.
"""

from __future__ import annotations

import logging

import torch
import torch.utils.checkpoint

from kernels._backend import BackendUnavailableError
from kernels.neighborhood_attention.reference import neighborhood_attention_reference

BACKENDS = ("reference", "flex")
TRAINING_BAND_ELEMENTS = 2**25
"""Gathered elements per band of query rows on the CPU training path (128 MB in fp32)."""
_logged_choices: set[tuple[str, str]] = set()
log = logging.getLogger("kernels")


def flex_available_for(device: torch.device, needs_grad: bool) -> tuple[bool, str]:
    """Whether the FlexAttention path can run on `device` (compiled; forward only on the CPU)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as err:  # pragma: no cover - ships with torch >= 2.5
        return False, f"torch.nn.attention.flex_attention is not importable ({err})"
    if device.type == "cpu" and needs_grad:
        return False, "FlexAttention has no backward on CPU tensors (call it under no_grad there)"
    if device.type in ("cuda", "cpu"):
        return True, ""
    return False, f"FlexAttention does not run on {device.type} tensors"


def choose_neighborhood_backend(device: torch.device, backend: str | None, needs_grad: bool = False) -> str:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"neighborhood_attention: backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        backend = "flex" if device.type == "cuda" else "reference"
    if backend == "flex":
        ok, why = flex_available_for(device, needs_grad)
        if not ok:
            raise BackendUnavailableError(f"neighborhood_attention: backend 'flex' requested but {why}")
    if (device.type, backend) not in _logged_choices:
        _logged_choices.add((device.type, backend))
        log.info("neighborhood_attention: using the %s backend for %s tensors", backend, device.type)
    return backend


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """NATTEN-v0.14 neighborhood attention. q, k, v [B, heads, H, W, d], rpb [heads, 2k-1, 2k-1] or None,
    scale defaults to d ** -0.5 -> [B, heads, H, W, d]. H and W must be >= kernel_size * dilation."""
    tensors = (query, key, value) if rpb is None else (query, key, value, rpb)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    chosen = choose_neighborhood_backend(query.device, backend, needs_grad)
    if chosen == "reference" and needs_grad:
        return _reference_for_training(query, key, value, kernel_size, dilation, rpb, scale)
    if chosen == "reference":
        return neighborhood_attention_reference(query, key, value, kernel_size, dilation, rpb, scale)
    from kernels.neighborhood_attention.flex import neighborhood_attention_flex

    return neighborhood_attention_flex(query, key, value, kernel_size, dilation, rpb, scale)


def _reference_for_training(query, key, value, kernel_size, dilation, rpb, scale) -> torch.Tensor:
    """The reference over bands of query rows, each recomputed in the backward. Whole, it gathers k*k keys and
    values per query and autograd keeps them, their gradients and the scores: 10 GB and more for one DiNAT-L
    block at a 640 crop. Per band only the inputs are kept and at most one band's gathers live at a time."""
    batch, heads, height, width, head_dim = query.shape
    per_row = batch * heads * width * kernel_size**2 * (head_dim + value.shape[-1])
    rows = max(1, TRAINING_BAND_ELEMENTS // per_row)
    bands = [
        torch.utils.checkpoint.checkpoint(
            neighborhood_attention_reference, query, key, value, kernel_size, dilation, rpb, scale,
            (start, min(start + rows, height)), use_reentrant=False)
        for start in range(0, height, rows)
    ]
    return torch.cat(bands, dim=2)


__all__ = ["BACKENDS", "neighborhood_attention", "neighborhood_attention_reference"]
