"""Triton multi-scale deformable attention, forward and backward.

Layout of the work: a program owns BLOCK_ROWS consecutive (query, head) rows of one image and the whole head
dim of each row. Rows are flattened as `query * H + head`, the order of `sampling_locations`,
`attention_weights` and the output, so those are read and written as contiguous blocks; only the value
gathers are scattered, and each of those reads D contiguous channels of one pixel. Levels and points are one
runtime loop over the L*P samples: unrolled, the compiler hoisted the gathers of all samples and ran out of
registers (255 and spills; kernels/benchmarks/NOTES.md has the compiler's numbers).

Forward: per (level, point) the four bilinear corners are gathered, weighted and summed in fp32 registers.
Backward: the same gathers; grad_attn and grad_loc are reductions over D done in registers and written once
per (row, level, point); grad_value is scattered with atomics into an fp32 buffer (or the gradient itself
when value is fp32/fp64), cast to the input dtype at the end. See kernels/benchmarks/NOTES.md for why.
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

from kernels.launch import KernelLaunch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _bilinear_setup(loc_x, loc_y, height, width):
    """Corner pixel indices and interpolation weights for normalised (x, y); pixel centres at x*w - 0.5."""
    # Clamping keeps every corner of a far-away point outside the map (so it contributes nothing, as in
    # grid_sample) while keeping the float -> int conversion in range for inf or huge locations.
    x = tl.minimum(tl.maximum(loc_x * width - 0.5, -2.0), width + 1.0)
    y = tl.minimum(tl.maximum(loc_y * height - 0.5, -2.0), height + 1.0)
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    x0 = x_floor.to(tl.int32)
    y0 = y_floor.to(tl.int32)
    frac_x = x - x_floor
    frac_y = y - y_floor
    return x0, y0, frac_x, frac_y


@triton.jit
def _corner_offsets_and_mask(x, y, height, width, row_mask, ROW_STRIDE: tl.constexpr):
    inside = row_mask & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return (y * width + x) * ROW_STRIDE, inside


@triton.jit
def _gather_corner(level_value, pixel_offsets, inside, head_channel, channel_mask, ACC_DTYPE: tl.constexpr):
    ptrs = level_value + pixel_offsets[:, None] + head_channel
    return tl.load(ptrs, mask=inside[:, None] & channel_mask, other=0.0).to(ACC_DTYPE)


@triton.jit
def _ms_deform_attn_fwd_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_rows,
    num_values,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    SAMPLE_UNROLL: tl.constexpr,
):
    ROW_STRIDE: tl.constexpr = NUM_HEADS * HEAD_DIM
    SAMPLES: tl.constexpr = NUM_LEVELS * NUM_POINTS
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    channels = tl.arange(0, BLOCK_D)
    channel_mask = (channels < HEAD_DIM)[None, :]
    head_channel = ((rows % NUM_HEADS) * HEAD_DIM)[:, None] + channels[None, :]
    batch_rows = batch * num_rows + rows
    value_batch = value_ptr + batch * num_values * ROW_STRIDE

    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=ACC_DTYPE)
    for sample in tl.range(0, SAMPLES, loop_unroll_factor=SAMPLE_UNROLL):
        level = sample // NUM_POINTS
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        level_value = value_batch + tl.load(starts_ptr + level) * ROW_STRIDE
        loc_x = tl.load(loc_ptr + batch_rows * (2 * SAMPLES) + 2 * sample, mask=row_mask, other=0.0)
        loc_y = tl.load(loc_ptr + batch_rows * (2 * SAMPLES) + 2 * sample + 1, mask=row_mask, other=0.0)
        weight = tl.load(attn_ptr + batch_rows * SAMPLES + sample, mask=row_mask, other=0.0).to(ACC_DTYPE)
        x0, y0, frac_x, frac_y = _bilinear_setup(
            loc_x.to(ACC_DTYPE), loc_y.to(ACC_DTYPE), height.to(ACC_DTYPE), width.to(ACC_DTYPE)
        )
        # Fold the attention weight into the four bilinear weights: one multiply per corner per channel.
        w_x1 = frac_x
        w_x0 = 1.0 - frac_x
        w_y1 = frac_y * weight
        w_y0 = (1.0 - frac_y) * weight
        off, inside = _corner_offsets_and_mask(x0, y0, height, width, row_mask, ROW_STRIDE)
        acc += (w_y0 * w_x0)[:, None] * _gather_corner(
            level_value, off, inside, head_channel, channel_mask, ACC_DTYPE
        )
        off, inside = _corner_offsets_and_mask(x0 + 1, y0, height, width, row_mask, ROW_STRIDE)
        acc += (w_y0 * w_x1)[:, None] * _gather_corner(
            level_value, off, inside, head_channel, channel_mask, ACC_DTYPE
        )
        off, inside = _corner_offsets_and_mask(x0, y0 + 1, height, width, row_mask, ROW_STRIDE)
        acc += (w_y1 * w_x0)[:, None] * _gather_corner(
            level_value, off, inside, head_channel, channel_mask, ACC_DTYPE
        )
        off, inside = _corner_offsets_and_mask(x0 + 1, y0 + 1, height, width, row_mask, ROW_STRIDE)
        acc += (w_y1 * w_x1)[:, None] * _gather_corner(
            level_value, off, inside, head_channel, channel_mask, ACC_DTYPE
        )

    # Output [B, Lq, H*D] is [B, Lq*H, D]: the block's rows are one contiguous stretch.
    out_ptrs = out_ptr + batch_rows[:, None] * HEAD_DIM + channels[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & channel_mask)


@triton.jit
def _scatter_corner(grad_value_batch, pixel_offsets, inside, head_channel, channel_mask, contribution):
    ptrs = grad_value_batch + pixel_offsets[:, None] + head_channel
    tl.atomic_add(ptrs, contribution, mask=inside[:, None] & channel_mask, sem="relaxed")


@triton.jit
def _ms_deform_attn_bwd_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    num_rows,
    num_values,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    SAMPLE_UNROLL: tl.constexpr,
):
    ROW_STRIDE: tl.constexpr = NUM_HEADS * HEAD_DIM
    SAMPLES: tl.constexpr = NUM_LEVELS * NUM_POINTS
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    channels = tl.arange(0, BLOCK_D)
    channel_mask = (channels < HEAD_DIM)[None, :]
    head_channel = ((rows % NUM_HEADS) * HEAD_DIM)[:, None] + channels[None, :]
    batch_rows = batch * num_rows + rows
    value_batch = value_ptr + batch * num_values * ROW_STRIDE
    grad_value_batch = grad_value_ptr + batch * num_values * ROW_STRIDE

    grad_out = tl.load(
        grad_out_ptr + batch_rows[:, None] * HEAD_DIM + channels[None, :],
        mask=row_mask[:, None] & channel_mask,
        other=0.0,
    ).to(ACC_DTYPE)
    for sample in tl.range(0, SAMPLES, loop_unroll_factor=SAMPLE_UNROLL):
        level = sample // NUM_POINTS
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        height_f = height.to(ACC_DTYPE)
        width_f = width.to(ACC_DTYPE)
        level_offset = tl.load(starts_ptr + level) * ROW_STRIDE
        level_value = value_batch + level_offset
        level_grad_value = grad_value_batch + level_offset
        loc_x_ptr = loc_ptr + batch_rows * (2 * SAMPLES) + 2 * sample
        loc_x = tl.load(loc_x_ptr, mask=row_mask, other=0.0).to(ACC_DTYPE)
        loc_y = tl.load(loc_x_ptr + 1, mask=row_mask, other=0.0).to(ACC_DTYPE)
        weight = tl.load(attn_ptr + batch_rows * SAMPLES + sample, mask=row_mask, other=0.0).to(ACC_DTYPE)
        x0, y0, frac_x, frac_y = _bilinear_setup(loc_x, loc_y, height_f, width_f)
        w_x1 = frac_x
        w_x0 = 1.0 - frac_x
        w_y1 = frac_y
        w_y0 = 1.0 - frac_y

        off00, in00 = _corner_offsets_and_mask(x0, y0, height, width, row_mask, ROW_STRIDE)
        off01, in01 = _corner_offsets_and_mask(x0 + 1, y0, height, width, row_mask, ROW_STRIDE)
        off10, in10 = _corner_offsets_and_mask(x0, y0 + 1, height, width, row_mask, ROW_STRIDE)
        off11, in11 = _corner_offsets_and_mask(x0 + 1, y0 + 1, height, width, row_mask, ROW_STRIDE)
        v00 = _gather_corner(level_value, off00, in00, head_channel, channel_mask, ACC_DTYPE)
        v01 = _gather_corner(level_value, off01, in01, head_channel, channel_mask, ACC_DTYPE)
        v10 = _gather_corner(level_value, off10, in10, head_channel, channel_mask, ACC_DTYPE)
        v11 = _gather_corner(level_value, off11, in11, head_channel, channel_mask, ACC_DTYPE)

        # d(sample)/dx and d(sample)/dy in pixel units, out-of-map corners counting as zeros.
        top = w_x0[:, None] * v00 + w_x1[:, None] * v01
        bottom = w_x0[:, None] * v10 + w_x1[:, None] * v11
        sampled = w_y0[:, None] * top + w_y1[:, None] * bottom
        d_dx = w_y0[:, None] * (v01 - v00) + w_y1[:, None] * (v11 - v10)
        d_dy = bottom - top

        grad_weight = tl.sum(grad_out * sampled, axis=1)
        grad_x = weight * width_f * tl.sum(grad_out * d_dx, axis=1)
        grad_y = weight * height_f * tl.sum(grad_out * d_dy, axis=1)
        tl.store(
            grad_attn_ptr + batch_rows * SAMPLES + sample,
            grad_weight.to(grad_attn_ptr.dtype.element_ty),
            mask=row_mask,
        )
        grad_loc_x_ptr = grad_loc_ptr + batch_rows * (2 * SAMPLES) + 2 * sample
        tl.store(grad_loc_x_ptr, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)
        tl.store(grad_loc_x_ptr + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=row_mask)

        weighted_grad = grad_out * weight[:, None]
        gv = grad_value_ptr.dtype.element_ty
        _scatter_corner(
            level_grad_value, off00, in00, head_channel, channel_mask,
            (weighted_grad * (w_y0 * w_x0)[:, None]).to(gv),
        )  # fmt: skip
        _scatter_corner(
            level_grad_value, off01, in01, head_channel, channel_mask,
            (weighted_grad * (w_y0 * w_x1)[:, None]).to(gv),
        )  # fmt: skip
        _scatter_corner(
            level_grad_value, off10, in10, head_channel, channel_mask,
            (weighted_grad * (w_y1 * w_x0)[:, None]).to(gv),
        )  # fmt: skip
        _scatter_corner(
            level_grad_value, off11, in11, head_channel, channel_mask,
            (weighted_grad * (w_y1 * w_x1)[:, None]).to(gv),
        )  # fmt: skip


def _accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


# Elements of one [BLOCK_ROWS, BLOCK_D] tile per program. The backward holds five such tiles (grad_out and
# four corners) plus the scatter operands, and on sm_80 its atomics are scalar (one per element, vector on
# sm_90), so its tile is 8x smaller. Chosen from the compiler's register report (NOTES.md): with these and a
# runtime sample loop no kernel spills on sm_80 or sm_90a and every one stays at or under 128 registers.
FORWARD_TILE_ELEMENTS = 4096
BACKWARD_TILE_ELEMENTS = 512
NUM_WARPS = 4
SAMPLE_UNROLL = 1  # samples per loop iteration: 2 gives more loads in flight but 159 registers (sm_90a bf16)


def launch_config(num_rows: int, head_dim: int, backward: bool) -> dict[str, int]:
    """BLOCK_ROWS, BLOCK_D, SAMPLE_UNROLL and num_warps of a launch; see NOTES.md for the reasoning."""
    block_d = triton.next_power_of_2(head_dim)
    tile_elements = BACKWARD_TILE_ELEMENTS if backward else FORWARD_TILE_ELEMENTS
    block_rows = max(1, min(tile_elements // block_d, triton.next_power_of_2(num_rows)))
    return dict(BLOCK_ROWS=block_rows, BLOCK_D=block_d, SAMPLE_UNROLL=SAMPLE_UNROLL, num_warps=NUM_WARPS)


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"ms_deform_attn: {name} must be a tensor, got {type(tensor).__name__}")
        # The level layout may live on the host (it is tiny); it is moved to value's device for the kernel.
        if tensor.device != value.device and name not in ("spatial_shapes", "level_start_index"):
            raise ValueError(f"ms_deform_attn: {name} is on {tensor.device} but value is on {value.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"ms_deform_attn: {name} must be contiguous (call .contiguous() first)")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [B, Lv, H, D], got shape {tuple(value.shape)}")
    batch, num_values, heads, head_dim = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [L, 2], got shape {tuple(spatial_shapes.shape)}"
        )
    levels = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be [L={levels}], got shape {tuple(level_start_index.shape)}"
        )
    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ms_deform_attn: {name} must be int32 or int64, got {named[name].dtype}")
    loc_shape = tuple(sampling_locations.shape)
    if (
        len(loc_shape) != 6
        or loc_shape[0] != batch
        or loc_shape[2] != heads
        or loc_shape[3] != levels
        or loc_shape[5] != 2
    ):
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be [B={batch}, Lq, H={heads}, L={levels}, P, 2], "
            f"got shape {loc_shape}"
        )
    if tuple(attention_weights.shape) != loc_shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be {loc_shape[:5]} (sampling_locations without the last dim), "
            f"got shape {tuple(attention_weights.shape)}"
        )
    for name in ("value", "sampling_locations", "attention_weights"):
        if named[name].dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"ms_deform_attn: {name} dtype must be one of {SUPPORTED_DTYPES}, got {named[name].dtype}"
            )
    if num_values * heads * head_dim >= 2**31:
        raise ValueError(
            f"ms_deform_attn: one image's value has {num_values * heads * head_dim} elements (>= 2**31)"
        )
    if spatial_shapes.device.type == "cpu" and level_start_index.device.type == "cpu":
        # Value-dependent checks cost a device sync on GPU tensors, so they run only where they are free.
        _check_level_layout(spatial_shapes, level_start_index, num_values)


def _check_level_layout(
    spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_values: int
) -> None:
    sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
    if min(spatial_shapes.flatten().tolist()) <= 0:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {spatial_shapes.tolist()}")
    if sum(sizes) != num_values:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {spatial_shapes.tolist()} cover {sum(sizes)} positions but value has "
            f"Lv={num_values}"
        )
    expected_starts = [sum(sizes[:level]) for level in range(len(sizes))]
    if level_start_index.tolist() != expected_starts:
        raise ValueError(
            f"ms_deform_attn: level_start_index must be {expected_starts} for these spatial_shapes, "
            f"got {level_start_index.tolist()}"
        )


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    output = torch.empty((batch, num_queries, heads * head_dim), dtype=value.dtype, device=value.device)
    if output.numel() == 0:
        return output
    forward_launch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output)()
    return output


def _kernel_launch(kernel, value, sampling_locations, tensors, backward: bool) -> KernelLaunch:
    batch, num_values, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    num_rows = num_queries * heads
    config = launch_config(num_rows, head_dim, backward)
    return KernelLaunch(
        kernel,
        grid=(triton.cdiv(num_rows, config["BLOCK_ROWS"]), batch),
        args=(*tensors, num_rows, num_values),
        kwargs=dict(
            NUM_HEADS=heads, HEAD_DIM=head_dim, NUM_LEVELS=levels, NUM_POINTS=points,
            ACC_DTYPE=_accumulator_dtype(value.dtype), **config,
        ),
    )  # fmt: skip


def forward_launch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output
) -> KernelLaunch:
    """The forward kernel's launch for these tensors (real ones, or meta tensors for the compile check)."""
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output)
    return _kernel_launch(_ms_deform_attn_fwd_kernel, value, sampling_locations, tensors, backward=False)


def backward_launch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_out,
    grad_value, grad_loc, grad_attn,
) -> KernelLaunch:  # fmt: skip
    """The backward kernel's launch; grad_value is the fp32 (fp64) accumulation buffer."""
    tensors = (
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_out,
        grad_value, grad_loc, grad_attn,
    )  # fmt: skip
    return _kernel_launch(_ms_deform_attn_bwd_kernel, value, sampling_locations, tensors, backward=True)


def ms_deform_attn_backward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_out
):
    # Atomics accumulate in fp32 (or fp64): bf16/fp16 atomics round every one of the many adds per pixel.
    accumulate_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=accumulate_dtype, device=value.device)
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    if grad_out.numel() > 0 and grad_attn.numel() > 0:
        backward_launch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_out.contiguous(),
            grad_value, grad_loc, grad_attn,
        )()  # fmt: skip
    else:
        grad_loc.zero_()
        grad_attn.zero_()
    return grad_value.to(value.dtype), grad_loc, grad_attn


def compiled_kernel_report(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Registers, spills and the atomic instructions of both compiled kernels for these inputs (CUDA only):
    what the compiler made of the design, read without timing anything."""
    output = torch.empty(value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3],
                         dtype=value.dtype, device=value.device)  # fmt: skip
    accumulate_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    launches = {
        "fwd": forward_launch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output
        )(),
        "bwd": backward_launch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, torch.randn_like(output),
            torch.zeros(value.shape, dtype=accumulate_dtype, device=value.device),
            torch.empty_like(sampling_locations), torch.empty_like(attention_weights),
        )(),
    }  # fmt: skip
    report = {}
    for name, compiled in launches.items():
        ptx = compiled.asm.get("ptx", "")
        atomics = sorted(set(re.findall(r"\b(?:red|atom)\.[\w.]+", ptx)))
        report[name] = {
            "registers": getattr(compiled, "n_regs", None),
            "spills": getattr(compiled, "n_spills", None),
            "atomic_instructions": atomics,
        }
    return report


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_out
        )
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Triton multi-scale deformable attention, differentiable w.r.t. value, sampling_locations and
    attention_weights. Shapes and semantics as `ms_deform_attn_reference`; output in value's dtype, each
    gradient in its input's dtype, accumulation in fp32 (fp64 for fp64 inputs)."""
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    spatial_shapes = spatial_shapes.to(value.device)
    level_start_index = level_start_index.to(value.device)
    return _MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
