"""Multi-scale deformable attention: `ms_deform_attn` dispatches to the reference or the Triton kernels."""

from __future__ import annotations

import torch

from kernels._backend import choose_backend
from kernels.ms_deform_attn.reference import ms_deform_attn_reference


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Deformable DETR's op; see `ms_deform_attn_reference` for shapes and semantics."""
    chosen = choose_backend("ms_deform_attn", value.device, backend)
    if chosen == "reference":
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    from kernels.ms_deform_attn.triton_kernels import ms_deform_attn_triton

    return ms_deform_attn_triton(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
