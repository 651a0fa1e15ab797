"""Plain-PyTorch point-sampled mask losses and matcher costs: the one reference that tests, benchmarks and the
CPU path share.

Point sampling follows detectron2's `point_sample`: bilinear, zero padding outside the map, coordinates (x, y)
in [0, 1] with pixel centres at (x * w - 0.5, y * h - 0.5), i.e. `grid_sample(align_corners=False)`.
Targets are sampled from float copies of the full-resolution masks, which is what Mask2Former does and what
the Triton path avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses run in float64 for float64 inputs (tests) and in float32 otherwise (bf16/fp16 are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_points_reference(
    maps: torch.Tensor,
    point_coords: torch.Tensor,
    map_index: torch.Tensor | None = None,
    rows_per_group: int = 1,
) -> torch.Tensor:
    """Bilinearly sample rows of `maps` [N, H, W] (any dtype; bool reads as 0/1) at `point_coords` [G, S, 2].

    Output row r reads map `map_index[r]` (r itself when None; -1 gives a row of zeros) at coordinate set
    `r // rows_per_group`, so an image's masks can share one set of points. Returns [R, S] in the compute
    dtype of `point_coords`' float type (float64 stays float64, everything else float32).
    """
    dtype = compute_dtype(point_coords.dtype)
    if map_index is None:
        rows = maps.to(dtype)
    else:
        # Materialise the selected maps at full resolution: the memory cost the fused path removes.
        rows = maps[map_index.clamp(min=0)].to(dtype)
        rows = rows * (map_index >= 0).to(dtype)[:, None, None]
    num_rows, height, width = rows.shape
    num_groups = point_coords.shape[0]
    if num_rows != num_groups * rows_per_group:
        raise ValueError(
            f"point_coords: {num_groups} coordinate sets x rows_per_group={rows_per_group} must cover "
            f"{num_rows} sampled rows"
        )
    grid = (2 * point_coords.to(dtype) - 1)[:, None]  # [G, 1, S, 2]
    sampled = F.grid_sample(
        rows.view(num_groups, rows_per_group, height, width),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [G, rows_per_group, 1, S]
    return sampled.reshape(num_rows, -1)


def point_mask_losses_per_mask_reference(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    target_index: torch.Tensor,
    point_coords: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask sigmoid BCE (mean over points) and dice (+1 smoothing) at `point_coords` [M, P, 2].

    mask_logits [M, h, w]; target_masks [T, H, W] bool/uint8; mask m is compared with target_masks[target_index[m]].
    Returns (bce [M], dice [M]) in the compute dtype; differentiable in mask_logits only.
    """
    dtype = compute_dtype(mask_logits.dtype)
    coords = point_coords.to(dtype)
    logits = sample_points_reference(mask_logits.to(dtype), coords)
    with torch.no_grad():
        targets = sample_points_reference(target_masks, coords, map_index=target_index)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)
    return bce, dice


def pairwise_mask_costs(
    point_logits: torch.Tensor, point_targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matcher costs between every prediction and every target sampled at the same points.

    point_logits [..., Q, P], point_targets [..., T, P] -> (cost_bce [..., Q, T], cost_dice [..., Q, T]).
    BCE(x, t) = softplus(x) - x * t, so the mean over points is one matrix product plus a row sum; dice is
    1 - (2 s.t + 1) / (sum s + sum t + 1) with s = sigmoid(x).
    """
    if point_logits.shape[-1] != point_targets.shape[-1]:
        raise ValueError(
            f"point_logits {tuple(point_logits.shape)} and point_targets {tuple(point_targets.shape)} must "
            "share the number of points (last dim)"
        )
    num_points = point_logits.shape[-1]
    targets_t = point_targets.to(point_logits.dtype).transpose(-1, -2)
    cost_bce = (F.softplus(point_logits).sum(-1, keepdim=True) - point_logits @ targets_t) / num_points
    probs = point_logits.sigmoid()
    numerator = 2 * (probs @ targets_t) + 1
    denominator = probs.sum(-1, keepdim=True) + targets_t.sum(-2, keepdim=True) + 1
    return cost_bce, 1 - numerator / denominator
