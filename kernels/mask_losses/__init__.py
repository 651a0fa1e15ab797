"""Point-sampled mask losses and Hungarian-matcher costs (Mask2Former / OneFormer).

Public ops, each taking `backend=None | "reference" | "triton"` (see `kernels._backend.choose_backend`):
- `sample_points(maps, point_coords, map_index=None, rows_per_group=1)`: bilinear point sampling.
- `importance_sample_coords(mask_logits, num_points, ...)`: Mask2Former's uncertainty-based point choice.
- `point_mask_losses(mask_logits, target_masks, num_masks, ...) -> (loss_bce, loss_dice)`.
- `matching_costs(pred_logits_per_layer, pred_masks_per_layer, target_labels, target_masks, ...)`: the
  weighted cost matrices of every decoder layer and image of a step, padded into one [L, B, Q, Tmax] tensor
  so that the matcher moves them to the host once.
Random draws happen here, identically for both backends, so a seeded `torch.Generator` gives the same points
whichever backend computes on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels._backend import choose_backend
from kernels.mask_losses.reference import (
    compute_dtype,
    pairwise_mask_costs,
    point_mask_losses_per_mask_reference,
    sample_points_reference,
)

__all__ = [
    "importance_sample_coords",
    "matching_costs",
    "pairwise_mask_costs",
    "point_mask_losses",
    "sample_points",
]


def sample_points(
    maps: torch.Tensor,
    point_coords: torch.Tensor,
    map_index: torch.Tensor | None = None,
    rows_per_group: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """Sample maps [N, H, W] (float logits, or bool masks read as 0/1) at point_coords [G, S, 2] in [0, 1].

    Output row r (R = G * rows_per_group rows) reads map `map_index[r]` (r when None; -1 gives zeros) at
    coordinate set `r // rows_per_group`. Returns [R, S] in float32 (float64 for float64 coordinates).
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {tuple(maps.shape)}")
    if point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be [G, S, 2], got shape {tuple(point_coords.shape)}")
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
    chosen = choose_backend("sample_points", maps.device, backend)
    if chosen == "reference":
        return sample_points_reference(maps, point_coords, map_index, rows_per_group)
    from kernels.mask_losses.triton_kernels import sample_points_triton

    return sample_points_triton(maps, point_coords, map_index, rows_per_group)


def _rand_coords(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    # Always drawn in float32, so a float64 reference run sees exactly the points of the float32 run.
    coords = torch.rand(*shape, 2, device=like.device, generator=generator)
    return coords.to(compute_dtype(like.dtype))


@torch.no_grad()
def importance_sample_coords(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mask2Former's point choice for mask_logits [M, h, w] -> point_coords [M, num_points, 2].

    Draws int(oversample_ratio * num_points) uniform candidates per mask, keeps the
    int(importance_sample_ratio * num_points) whose sampled logit is closest to 0 (uncertainty = -|logit|),
    then appends uniform random points for the rest. Draw order (float32): candidates [M, S, 2], then the rest.
    """
    if num_points <= 0:
        raise ValueError(f"num_points must be positive, got {num_points}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    if oversample_ratio < 1.0:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = _rand_coords((num_masks, num_candidates), mask_logits, generator)
    candidate_logits = sample_points(mask_logits, candidates, backend=backend)
    uncertain = torch.topk(-candidate_logits.abs(), k=num_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, uncertain[..., None].expand(-1, -1, 2))
    rest = _rand_coords((num_masks, num_points - num_uncertain), mask_logits, generator)
    return torch.cat([chosen, rest], dim=1)


def point_mask_losses(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    num_masks: float | torch.Tensor,
    num_points: int | None = None,
    oversample_ratio: float | None = None,
    importance_sample_ratio: float | None = None,
    point_coords: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    target_index: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask2Former's point-sampled mask losses -> (loss_bce, loss_dice), both scalars in float32 (float64 for
    float64 logits).

    mask_logits [M, h, w] (any float dtype); target_masks [T, H, W] bool/uint8 (T == M unless `target_index`
    [M] says which target each mask is compared with). Points are `point_coords` [M, P, 2] when given, else
    chosen by `importance_sample_coords`. loss_bce = sum over masks of the mean BCE over points / num_masks;
    loss_dice = sum of (1 - (2 s.t + 1) / (sum s + sum t + 1)) / num_masks. Gradient flows to mask_logits only.
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [M, h, w], got shape {tuple(mask_logits.shape)}")
    if target_masks.dim() != 3:
        raise ValueError(f"target_masks must be [T, H, W], got shape {tuple(target_masks.shape)}")
    if target_masks.is_floating_point():
        raise ValueError(f"target_masks must be bool or uint8 0/1 masks, got dtype {target_masks.dtype}")
    num_pred = mask_logits.shape[0]
    if target_index is None:
        if target_masks.shape[0] != num_pred:
            raise ValueError(
                f"target_masks has {target_masks.shape[0]} masks but mask_logits has {num_pred}; "
                "pass target_index to pair them"
            )
        target_index = torch.arange(num_pred, device=mask_logits.device)
    elif target_index.shape != (num_pred,):
        raise ValueError(f"target_index must be [{num_pred}], got shape {tuple(target_index.shape)}")
    if num_pred == 0:
        zero = mask_logits.sum().to(compute_dtype(mask_logits.dtype)) * 0
        return zero, zero.clone()
    chosen = choose_backend("point_mask_losses", mask_logits.device, backend)
    if point_coords is None:
        if None in (num_points, oversample_ratio, importance_sample_ratio):
            raise ValueError("without point_coords, num_points, oversample_ratio and importance_sample_ratio are "
                             "required (the loss settings live in the caller's config, not here)")
        point_coords = importance_sample_coords(
            mask_logits.detach(), num_points, oversample_ratio, importance_sample_ratio, generator, chosen
        )
    elif point_coords.shape[:1] != (num_pred,) or point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be [{num_pred}, P, 2], got shape {tuple(point_coords.shape)}")
    if chosen == "reference":
        bce, dice = point_mask_losses_per_mask_reference(
            mask_logits, target_masks, target_index, point_coords
        )
    else:
        from kernels.mask_losses.triton_kernels import point_mask_losses_per_mask_triton

        bce, dice = point_mask_losses_per_mask_triton(mask_logits, target_masks, target_index, point_coords)
    return bce.sum() / num_masks, dice.sum() / num_masks


def _padded_target_index(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """[B, Tmax] row of each image's targets in the concatenated target tensor, -1 where padded."""
    # Built on the device: a host -> device copy of pageable memory would be a host sync.
    max_targets = max(counts, default=0)
    index = torch.full((len(counts), max_targets), -1, dtype=torch.int64, device=device)
    start = 0
    for image, count in enumerate(counts):
        index[image, :count] = torch.arange(start, start + count, device=device)
        start += count
    return index


@torch.no_grad()
def matching_costs(
    pred_logits_per_layer: Sequence[torch.Tensor],
    pred_masks_per_layer: Sequence[torch.Tensor],
    target_labels: Sequence[torch.Tensor],
    target_masks: Sequence[torch.Tensor],
    num_points: int,
    class_weight: float,
    bce_weight: float,
    dice_weight: float,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted Hungarian costs of every decoder layer and image -> [L, B, Q, Tmax] float32 on the device.

    pred_logits_per_layer: L tensors [B, Q, K+1]; pred_masks_per_layer: L tensors [B, Q, h, w];
    target_labels: B tensors [T_b]; target_masks: B bool tensors [T_b, H, W]. Entry [l, b, q, j] (j < T_b) is
    class_weight * -softmax(logits)[q, label_j] + bce_weight * BCE + dice_weight * dice, on num_points uniform
    points drawn per (layer, image) and shared by all masks of the image (draw order: one [B, P, 2] per layer);
    columns j >= T_b are padding. Computed in float32 whatever the model's dtype.
    """
    if len(pred_logits_per_layer) != len(pred_masks_per_layer):
        raise ValueError(
            f"got {len(pred_logits_per_layer)} pred_logits layers but {len(pred_masks_per_layer)} pred_masks layers"
        )
    if len(target_labels) != len(target_masks):
        raise ValueError(f"got {len(target_labels)} target_labels but {len(target_masks)} target_masks")
    device = pred_masks_per_layer[0].device
    batch, num_queries = pred_masks_per_layer[0].shape[:2]
    if len(target_masks) != batch:
        raise ValueError(f"targets describe {len(target_masks)} images but the predictions {batch}")
    counts = [int(labels.shape[0]) for labels in target_labels]
    max_targets = max(counts, default=0)
    target_rows = _padded_target_index(counts, device)  # [B, Tmax]
    all_masks = torch.cat(list(target_masks)) if sum(counts) else None
    labels = torch.zeros(batch, max_targets, dtype=torch.int64, device=device)
    for image, image_labels in enumerate(target_labels):
        labels[image, : counts[image]] = image_labels.to(device)

    costs = torch.zeros(len(pred_masks_per_layer), batch, num_queries, max_targets, device=device)
    if max_targets == 0:
        return costs
    for layer, (pred_logits, pred_masks) in enumerate(zip(pred_logits_per_layer, pred_masks_per_layer)):
        coords = torch.rand(batch, num_points, 2, device=device, generator=generator)
        point_logits = sample_points(
            pred_masks.reshape(batch * num_queries, *pred_masks.shape[-2:]),
            coords,
            rows_per_group=num_queries,
            backend=backend,
        ).view(batch, num_queries, num_points)
        point_targets = sample_points(
            all_masks, coords, map_index=target_rows.flatten(), rows_per_group=max_targets, backend=backend
        ).view(batch, max_targets, num_points)
        cost_bce, cost_dice = pairwise_mask_costs(point_logits, point_targets)
        probs = pred_logits.float().softmax(-1)
        cost_class = -torch.gather(probs, 2, labels[:, None, :].expand(-1, num_queries, -1))
        costs[layer] = class_weight * cost_class + bce_weight * cost_bce + dice_weight * cost_dice
    return costs
