"""Plain-PyTorch multi-scale deformable attention: the one reference that tests, benchmarks and the CPU
path share. Semantics follow Deformable DETR: bilinear sampling with zero padding, pixel centres at
(x * w - 0.5, y * h - 0.5), i.e. `grid_sample(align_corners=False, padding_mode="zeros")`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[tuple[int, int]],
    level_start_index: torch.Tensor | Sequence[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [B, Lv, H, D], spatial_shapes [L, 2] (h, w), level_start_index [L],
    sampling_locations [B, Lq, H, L, P, 2] (x, y in [0, 1]), attention_weights [B, Lq, H, L, P]
    -> [B, Lq, H * D]. Computes in the dtype of `value` (upcast the inputs for a float64 reference).
    The layout may also be Python ints ((h, w) pairs and starts): they are used as given, so sizes that
    torch.export traces symbolically stay symbolic (a tensor's `.tolist()` would turn them into data)."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if isinstance(level_start_index, torch.Tensor):
        level_start_index = [int(s) for s in level_start_index.tolist()]
    return ms_deform_attn_reference_static(
        value, list(spatial_shapes), list(level_start_index), sampling_locations, attention_weights
    )


def ms_deform_attn_reference_static(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    starts: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The same reference with the level layout as Python ints, so torch.compile can specialise on it
    instead of breaking the graph at `.tolist()`."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # grid_sample wants coordinates in [-1, 1]; align_corners=False puts pixel centres where Deformable DETR does.
    grids = 2 * sampling_locations.to(value.dtype) - 1
    sampled_per_level = []
    for level, (height, width) in enumerate(shapes):
        level_value = value[:, starts[level] : starts[level] + height * width]
        # [B, h*w, H, D] -> [B*H, D, h, w]. reshape copies for B > 1 anyway; for B = 1 it returns a strided
        # view, on which CPU grid_sample in bf16 returns non-finite values (torch 2.14), hence .contiguous().
        level_value = (
            level_value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width).contiguous()
        )
        # [B, Lq, H, P, 2] -> [B*H, Lq, P, 2]
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, num_points, 2)
        sampled = F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [B*H, D, Lq, P]
        sampled_per_level.append(sampled)
    # [B*H, D, Lq, L, P] weighted over (L, P)
    stacked = torch.stack(sampled_per_level, dim=3)
    weights = (
        attention_weights.to(value.dtype)
        .transpose(1, 2)
        .reshape(batch * heads, 1, num_queries, num_levels, num_points)
    )
    output = (stacked * weights).sum(dim=(3, 4))  # [B*H, D, Lq]
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()
