"""Triton kernels for point-sampled mask losses and matcher costs.

Three kernels share one bilinear gather (zero padding, pixel centres at x * w - 0.5, as `point_sample`):
- `_sample_points_kernel`: sample rows of any map tensor (mask logits, or bool masks read as 0/1 bytes) at
  coordinate sets shared by groups of rows, with an optional row -> map indirection. The matcher and the
  importance sampling use it; bool targets are never copied to float.
- `_point_loss_forward_kernel`: per (mask, block of points) sample the logit and the target, and write the
  block's partial sums of BCE, sigmoid, target and sigmoid * target. Partial sums per block (not atomics) keep
  the forward deterministic.
- `_point_loss_backward_kernel`: recompute the same point values, form dLoss/dlogit per point from the per-mask
  sums and scatter it onto the low-resolution logit map with bilinear weights (atomics: points collide).
Everything accumulates in float32 (float64 when the logits are float64, for the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import KernelLaunch
from kernels.mask_losses.reference import compute_dtype

# Points per program, 8 per thread at 4 warps: 64-144 registers and no spills on sm_80 / sm_90a
# (python -m kernels.compile_check).
_BLOCK_POINTS = 1024
_NUM_WARPS = 4
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _bilinear_corners(px, py, height, width):
    """Integer corners, fractional weights and in-bounds flags of pixel coordinates (px, py)."""
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    fx = px - x0f
    fy = py - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    in_x0 = (x0 >= 0) & (x0 < width)
    in_x1 = (x1 >= 0) & (x1 < width)
    in_y0 = (y0 >= 0) & (y0 < height)
    in_y1 = (y1 >= 0) & (y1 < height)
    return x0, y0, x1, y1, fx, fy, in_x0, in_x1, in_y0, in_y1


@triton.jit
def _bilinear_gather(map_ptr, x, y, height, width, live, ACC: tl.constexpr):
    """Sample one map at normalised (x, y); `live` masks points that are padding or belong to no map."""
    px = x * width - 0.5
    py = y * height - 0.5
    x0, y0, x1, y1, fx, fy, in_x0, in_x1, in_y0, in_y1 = _bilinear_corners(px, py, height, width)
    v00 = tl.load(map_ptr + y0 * width + x0, mask=live & in_y0 & in_x0, other=0).to(ACC)
    v01 = tl.load(map_ptr + y0 * width + x1, mask=live & in_y0 & in_x1, other=0).to(ACC)
    v10 = tl.load(map_ptr + y1 * width + x0, mask=live & in_y1 & in_x0, other=0).to(ACC)
    v11 = tl.load(map_ptr + y1 * width + x1, mask=live & in_y1 & in_x1, other=0).to(ACC)
    top = v00 * (1 - fx) + v01 * fx
    bottom = v10 * (1 - fx) + v11 * fx
    return top * (1 - fy) + bottom * fy


@triton.jit
def _load_coords(coords_ptr, row_of_coords, offsets, num_points, valid, ACC: tl.constexpr):
    base = coords_ptr + row_of_coords.to(tl.int64) * num_points * 2
    x = tl.load(base + offsets * 2, mask=valid, other=0).to(ACC)
    y = tl.load(base + offsets * 2 + 1, mask=valid, other=0).to(ACC)
    return x, y


@triton.jit
def _sample_points_kernel(
    maps_ptr,
    map_index_ptr,
    coords_ptr,
    out_ptr,
    num_points,
    height,
    width,
    rows_per_group,
    HAS_INDEX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < num_points
    if HAS_INDEX:
        map_row = tl.load(map_index_ptr + row)
    else:
        map_row = row
    x, y = _load_coords(coords_ptr, row // rows_per_group, offsets, num_points, valid, ACC)
    map_ptr = maps_ptr + map_row.to(tl.int64) * height * width
    value = _bilinear_gather(map_ptr, x, y, height, width, valid & (map_row >= 0), ACC)
    tl.store(out_ptr + row.to(tl.int64) * num_points + offsets, value, mask=valid)


@triton.jit
def _point_values(
    logits_ptr,
    targets_ptr,
    target_index_ptr,
    coords_ptr,
    mask_row,
    offsets,
    valid,
    num_points,
    height,
    width,
    target_height,
    target_width,
    ACC: tl.constexpr,
):
    """Logit and target of mask `mask_row` at its points `offsets` (targets read from bool bytes as 0/1)."""
    x, y = _load_coords(coords_ptr, mask_row, offsets, num_points, valid, ACC)
    logit_map = logits_ptr + mask_row.to(tl.int64) * height * width
    logit = _bilinear_gather(logit_map, x, y, height, width, valid, ACC)
    target_row = tl.load(target_index_ptr + mask_row)
    target_map = targets_ptr + target_row.to(tl.int64) * target_height * target_width
    target = _bilinear_gather(target_map, x, y, target_height, target_width, valid, ACC)
    return x, y, logit, target


@triton.jit
def _point_loss_forward_kernel(
    logits_ptr,
    targets_ptr,
    target_index_ptr,
    coords_ptr,
    partial_ptr,
    num_points,
    height,
    width,
    target_height,
    target_width,
    num_blocks,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mask_row = tl.program_id(0)
    block = tl.program_id(1)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < num_points
    _, _, logit, target = _point_values(
        logits_ptr,
        targets_ptr,
        target_index_ptr,
        coords_ptr,
        mask_row,
        offsets,
        valid,
        num_points,
        height,
        width,
        target_height,
        target_width,
        ACC,
    )
    # Stable BCE with logits: softplus(x) - x * t = max(x, 0) - x * t + log(1 + exp(-|x|)).
    bce = tl.maximum(logit, 0) - logit * target + tl.log(1 + tl.exp(-tl.abs(logit)))
    prob = 1 / (1 + tl.exp(-logit))
    bce = tl.where(valid, bce, 0)
    prob = tl.where(valid, prob, 0)
    out = partial_ptr + (mask_row.to(tl.int64) * num_blocks + block) * 4
    tl.store(out, tl.sum(bce, axis=0))
    tl.store(out + 1, tl.sum(prob, axis=0))
    tl.store(out + 2, tl.sum(target, axis=0))
    tl.store(out + 3, tl.sum(prob * target, axis=0))


@triton.jit
def _point_loss_backward_kernel(
    logits_ptr,
    targets_ptr,
    target_index_ptr,
    coords_ptr,
    sums_ptr,
    grad_bce_ptr,
    grad_dice_ptr,
    grad_ptr,
    num_points,
    height,
    width,
    target_height,
    target_width,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    mask_row = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < num_points
    x, y, logit, target = _point_values(
        logits_ptr,
        targets_ptr,
        target_index_ptr,
        coords_ptr,
        mask_row,
        offsets,
        valid,
        num_points,
        height,
        width,
        target_height,
        target_width,
        ACC,
    )
    prob = 1 / (1 + tl.exp(-logit))
    sums = sums_ptr + mask_row.to(tl.int64) * 4
    sum_prob = tl.load(sums + 1)
    sum_target = tl.load(sums + 2)
    sum_overlap = tl.load(sums + 3)
    numerator = 2 * sum_overlap + 1
    denominator = sum_prob + sum_target + 1
    grad_bce = tl.load(grad_bce_ptr + mask_row).to(ACC)
    grad_dice = tl.load(grad_dice_ptr + mask_row).to(ACC)
    # bce_m = mean_p softplus(x) - x t; dice_m = 1 - N / D with N = 2 sum(s t) + 1, D = sum s + sum t + 1.
    d_bce = (prob - target) / num_points
    d_dice = (numerator - 2 * target * denominator) / (denominator * denominator) * prob * (1 - prob)
    grad_point = tl.where(valid, grad_bce * d_bce + grad_dice * d_dice, 0)

    px = x * width - 0.5
    py = y * height - 0.5
    x0, y0, x1, y1, fx, fy, in_x0, in_x1, in_y0, in_y1 = _bilinear_corners(px, py, height, width)
    grad_map = grad_ptr + mask_row.to(tl.int64) * height * width
    tl.atomic_add(grad_map + y0 * width + x0, grad_point * (1 - fx) * (1 - fy), mask=valid & in_y0 & in_x0)
    tl.atomic_add(grad_map + y0 * width + x1, grad_point * fx * (1 - fy), mask=valid & in_y0 & in_x1)
    tl.atomic_add(grad_map + y1 * width + x0, grad_point * (1 - fx) * fy, mask=valid & in_y1 & in_x0)
    tl.atomic_add(grad_map + y1 * width + x1, grad_point * fx * fy, mask=valid & in_y1 & in_x1)


def _as_bytes(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks are read as their 0/1 bytes; no float copy is made."""
    masks = masks.contiguous()
    return masks.view(torch.uint8) if masks.dtype == torch.bool else masks


def sample_points_triton(
    maps: torch.Tensor,
    point_coords: torch.Tensor,
    map_index: torch.Tensor | None = None,
    rows_per_group: int = 1,
) -> torch.Tensor:
    """Same contract as `sample_points_reference`, without materialising float maps."""
    dtype = compute_dtype(point_coords.dtype)
    maps = _as_bytes(maps)
    coords = point_coords.to(dtype).contiguous()
    num_groups, num_points, _ = coords.shape
    num_rows = num_groups * rows_per_group
    if map_index is None and maps.shape[0] != num_rows:
        raise ValueError(f"maps: {maps.shape[0]} rows, but point_coords x rows_per_group cover {num_rows}")
    out = torch.empty(num_rows, num_points, device=maps.device, dtype=dtype)
    if num_rows == 0 or num_points == 0:
        return out
    index = map_index.to(torch.int64).contiguous() if map_index is not None else None
    sample_points_launch(maps, index, coords, out, rows_per_group)()
    return out


def sample_points_launch(
    maps: torch.Tensor, map_index: torch.Tensor | None, coords: torch.Tensor, out: torch.Tensor, rows_per_group: int
) -> KernelLaunch:
    """The sampling kernel's launch: maps [N, H, W] (float, or uint8 bytes of bool masks), map_index [R] int64
    or None, coords [G, S, 2] and out [R, S] in the compute dtype."""
    num_rows, num_points = out.shape
    return KernelLaunch(
        _sample_points_kernel,
        grid=(num_rows, triton.cdiv(num_points, _BLOCK_POINTS)),
        # Without an index the kernel never reads the pointer; coords stands in for it.
        args=(maps, coords if map_index is None else map_index, coords, out, num_points, *maps.shape[-2:],
              rows_per_group),
        kwargs=dict(HAS_INDEX=map_index is not None, ACC=_TL_DTYPES[out.dtype], BLOCK=_BLOCK_POINTS,
                    num_warps=_NUM_WARPS),
    )  # fmt: skip


class _PointMaskLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask_logits, target_bytes, target_index, point_coords):
        dtype = compute_dtype(mask_logits.dtype)
        num_masks, height, width = mask_logits.shape
        num_points = point_coords.shape[1]
        num_blocks = triton.cdiv(num_points, _BLOCK_POINTS)
        partial = torch.empty(num_masks, num_blocks, 4, device=mask_logits.device, dtype=dtype)
        point_loss_forward_launch(mask_logits, target_bytes, target_index, point_coords, partial)()
        sums = partial.sum(dim=1)  # [M, 4]: bce, sigmoid, target, sigmoid * target
        ctx.save_for_backward(mask_logits, target_bytes, target_index, point_coords, sums)
        bce = sums[:, 0] / num_points
        dice = 1 - (2 * sums[:, 3] + 1) / (sums[:, 1] + sums[:, 2] + 1)
        return bce, dice

    @staticmethod
    def backward(ctx, grad_bce, grad_dice):
        mask_logits, target_bytes, target_index, point_coords, sums = ctx.saved_tensors
        dtype = sums.dtype
        num_masks, height, width = mask_logits.shape
        grad_bce = torch.zeros_like(sums[:, 0]) if grad_bce is None else grad_bce.to(dtype).contiguous()
        grad_dice = torch.zeros_like(sums[:, 0]) if grad_dice is None else grad_dice.to(dtype).contiguous()
        grad_logits = torch.zeros(num_masks, height, width, device=mask_logits.device, dtype=dtype)
        point_loss_backward_launch(
            mask_logits, target_bytes, target_index, point_coords, sums, grad_bce, grad_dice, grad_logits
        )()
        return grad_logits.to(mask_logits.dtype), None, None, None


def point_loss_forward_launch(mask_logits, target_bytes, target_index, point_coords, partial) -> KernelLaunch:
    """The loss forward's launch: logits [M, h, w], target bytes [T, H, W], target_index [M] int64,
    point_coords [M, P, 2] and the per-block partial sums [M, blocks, 4], both in the compute dtype."""
    num_masks, num_blocks, _ = partial.shape
    return KernelLaunch(
        _point_loss_forward_kernel,
        grid=(num_masks, num_blocks),
        args=(mask_logits, target_bytes, target_index, point_coords, partial, point_coords.shape[1],
              *mask_logits.shape[-2:], *target_bytes.shape[-2:], num_blocks),
        kwargs=dict(ACC=_TL_DTYPES[partial.dtype], BLOCK=_BLOCK_POINTS, num_warps=_NUM_WARPS),
    )  # fmt: skip


def point_loss_backward_launch(
    mask_logits, target_bytes, target_index, point_coords, sums, grad_bce, grad_dice, grad_logits
) -> KernelLaunch:
    """The loss backward's launch: the forward's tensors, the per-mask sums [M, 4], the upstream gradients of
    both losses [M] and the gradient buffer [M, h, w] (compute dtype)."""
    num_masks, num_points = point_coords.shape[:2]
    return KernelLaunch(
        _point_loss_backward_kernel,
        grid=(num_masks, triton.cdiv(num_points, _BLOCK_POINTS)),
        args=(mask_logits, target_bytes, target_index, point_coords, sums, grad_bce, grad_dice, grad_logits,
              num_points, *mask_logits.shape[-2:], *target_bytes.shape[-2:]),
        kwargs=dict(ACC=_TL_DTYPES[grad_logits.dtype], BLOCK=_BLOCK_POINTS, num_warps=_NUM_WARPS),
    )  # fmt: skip


def point_mask_losses_per_mask_triton(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    target_index: torch.Tensor,
    point_coords: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `point_mask_losses_per_mask_reference`, fused into one forward and one backward kernel."""
    dtype = compute_dtype(mask_logits.dtype)
    return _PointMaskLossFunction.apply(
        mask_logits.contiguous(),
        _as_bytes(target_masks),
        target_index.to(torch.int64).contiguous(),
        point_coords.to(dtype).contiguous(),
    )
