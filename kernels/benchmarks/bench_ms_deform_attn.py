"""Multi-scale deformable attention: our Triton kernels against the grid_sample reference, torch.compile of the
reference and, where an installed package provides it, the original Deformable DETR CUDA kernel.

Shapes are the pixel-decoder encoder's (queries = value tokens, 3 levels, H=8, D=32, P=4) at the crops of
docs/kernels.md. Sampling locations are realistic rather than uniform: each query samples around its own position
with offsets of a few pixels per level, as a trained encoder does, so cache behaviour is representative.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

import torch

from kernels.benchmarks import harness
from kernels.ms_deform_attn import ms_deform_attn
from kernels.ms_deform_attn.reference import ms_deform_attn_reference_static
from kernels.ms_deform_attn.triton_kernels import compiled_kernel_report

OP = "ms_deform_attn"
DEVICE = "cuda"  # the harness refuses to run without CUDA; a CPU smoke run may patch this
HEADS, HEAD_DIM, POINTS = 8, 32, 4
# case -> (levels as (h, w), batch sizes)
SHAPES: dict[str, tuple[list[tuple[int, int]], tuple[int, ...]]] = {
    "ade20k_512": ([(64, 64), (32, 32), (16, 16)], (2,)),
    "ade20k_640": ([(80, 80), (40, 40), (20, 20)], (2, 1, 4, 8)),
    "ade20k_1280": ([(160, 160), (80, 80), (40, 40)], (2,)),
    "coco_1024": ([(128, 128), (64, 64), (32, 32)], (2,)),
    "cityscapes_512x1024": ([(64, 128), (32, 64), (16, 32)], (2,)),
}
MAIN_CASE = ("ade20k_640", 2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_DTYPES = ("bf16", "fp32")
ORIGINAL_IM2COL_STEP = 64
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # value, locations, weights, grad_out


def compulsory_bytes(
    batch: int, queries: int, num_values: int, levels: int, dtype: torch.dtype, backward: bool
) -> int:
    """Each input read once and each output written once (the formula of docs/kernels.md for H=8, D=32, P=4).
    The backward adds: value, locations, weights and grad_out read; their three gradients written."""
    size = torch.tensor([], dtype=dtype).element_size()
    value = num_values * HEADS * HEAD_DIM * size
    locations = queries * HEADS * levels * POINTS * 2 * size
    weights = queries * HEADS * levels * POINTS * size
    output = queries * HEADS * HEAD_DIM * size
    forward = value + locations + weights + output
    if not backward:
        return batch * forward
    return batch * (forward + 2 * value + 2 * locations + 2 * weights + output)


def level_layout(levels: list[tuple[int, int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(dim=1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def query_positions(levels: list[tuple[int, int]]) -> torch.Tensor:
    """Normalised (x, y) pixel centre of every query (all pixels of all levels) [Lq, 2]."""
    positions = []
    for height, width in levels:
        ys, xs = torch.meshgrid(
            (torch.arange(height, device=DEVICE) + 0.5) / height,
            (torch.arange(width, device=DEVICE) + 0.5) / width,
            indexing="ij",
        )
        positions.append(torch.stack([xs.flatten(), ys.flatten()], dim=-1))
    return torch.cat(positions)


def make_inputs(levels: list[tuple[int, int]], batch: int, dtype: torch.dtype, requires_grad: bool) -> Inputs:
    num_values = sum(h * w for h, w in levels)
    queries = num_values
    value = torch.randn(batch, num_values, HEADS, HEAD_DIM, device=DEVICE)
    level_sizes = torch.tensor([[w, h] for h, w in levels], device=DEVICE, dtype=torch.float32)
    # Offsets of (p + 1) pixels in a random direction per head, plus noise: Deformable DETR's initialisation.
    spread = torch.arange(1, POINTS + 1, device=DEVICE, dtype=torch.float32).view(1, 1, 1, 1, POINTS, 1)
    offsets = torch.randn(batch, queries, HEADS, len(levels), POINTS, 2, device=DEVICE) * spread
    locations = query_positions(levels).view(1, queries, 1, 1, 1, 2) + offsets / level_sizes.view(
        1, 1, 1, len(levels), 1, 2
    )
    logits = torch.randn(batch, queries, HEADS, len(levels) * POINTS, device=DEVICE)
    weights = logits.softmax(-1).view(batch, queries, HEADS, len(levels), POINTS)
    grad_out = torch.randn(batch, queries, HEADS * HEAD_DIM, device=DEVICE)
    tensors = [t.to(dtype).contiguous() for t in (value, locations, weights, grad_out)]
    for tensor in tensors[:3]:
        tensor.requires_grad_(requires_grad)
    return tuple(tensors)


def find_original_cuda_kernel() -> tuple[str, Callable[..., torch.Tensor]] | None:
    """The original Deformable DETR CUDA op from an installed package, as a differentiable callable."""
    try:
        module = importlib.import_module("mmcv.ops.multi_scale_deform_attn")
        function = module.MultiScaleDeformableAttnFunction
        return "mmcv", lambda *args: function.apply(*args, ORIGINAL_IM2COL_STEP)
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        pass
    try:
        msda = importlib.import_module("MultiScaleDeformableAttention")
    except Exception:  # noqa: BLE001
        return None

    class OriginalFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights):
            ctx.save_for_backward(value, shapes, starts, locations, weights)
            return msda.ms_deform_attn_forward(
                value, shapes, starts, locations, weights, ORIGINAL_IM2COL_STEP
            )

        @staticmethod
        def backward(ctx, grad_out):
            value, shapes, starts, locations, weights = ctx.saved_tensors
            grad_value, grad_locations, grad_weights = msda.ms_deform_attn_backward(
                value, shapes, starts, locations, weights, grad_out.contiguous(), ORIGINAL_IM2COL_STEP
            )
            return grad_value, None, None, grad_locations, grad_weights

    return "MultiScaleDeformableAttention", OriginalFunction.apply


def implementations(levels: list[tuple[int, int]], with_compile: bool) -> dict[str, Callable]:
    """name -> fn(value, locations, weights) -> output, each given the level layout where it is cheapest."""
    shapes_gpu, starts_gpu = level_layout(levels, DEVICE)
    starts_host = level_layout(levels, "cpu")[1].tolist()
    impls: dict[str, Callable] = {
        "triton": lambda v, loc, w: ms_deform_attn(v, shapes_gpu, starts_gpu, loc, w, backend="triton"),
        "reference": lambda v, loc, w: ms_deform_attn_reference_static(v, levels, starts_host, loc, w),
    }
    if with_compile:
        compiled = torch.compile(ms_deform_attn_reference_static, dynamic=False)
        impls["compiled_reference"] = lambda v, loc, w: compiled(v, levels, starts_host, loc, w)
    original = find_original_cuda_kernel()
    if original is not None:
        _, fn = original
        # The original kernel is fp32/fp64 only; the official code runs the whole pixel decoder in fp32, so
        # that is the honest baseline for every dtype.
        impls["cuda_original_fp32"] = lambda v, loc, w: fn(
            v.float(), shapes_gpu, starts_gpu, loc.float(), w.float()
        )
    return impls


def forward_only(impl: Callable) -> Callable:
    def run(value, locations, weights, grad_out):
        with torch.no_grad():
            return impl(value, locations, weights)

    return run


def forward_backward(impl: Callable) -> Callable:
    def run(value, locations, weights, grad_out):
        output = impl(value, locations, weights)
        # autograd.grad returns fresh gradients: no accumulation kernel into .grad on repeated calls.
        return (output, *torch.autograd.grad(output, (value, locations, weights), grad_out.to(output.dtype)))

    return run


def worst_error(results: Any, expected: tuple[torch.Tensor, ...]) -> float:
    results = results if isinstance(results, tuple) else (results,)
    return max(harness.relative_l2_error(actual, reference) for actual, reference in zip(results, expected))


def float64_expected(levels, inputs: Inputs, backward: bool) -> tuple[torch.Tensor, ...]:
    starts = level_layout(levels, "cpu")[1].tolist()
    value, locations, weights, grad_out = (t.detach().double().requires_grad_(backward) for t in inputs)

    def reference(v, loc, w):
        return ms_deform_attn_reference_static(v, levels, starts, loc, w)

    run = forward_backward(reference) if backward else forward_only(reference)
    results = run(value, locations, weights, grad_out)
    return tuple(t.detach() for t in (results if isinstance(results, tuple) else (results,)))


def bench_case(
    case: str, batch: int, dtype_name: str, quick: bool, with_compile: bool | None = None
) -> list[dict[str, Any]]:
    """Rows of every implementation at one shape; torch.compile of the reference (slow to compile) only at
    the main case unless `with_compile` says otherwise."""
    levels, _ = SHAPES[case]
    dtype = DTYPES[dtype_name]
    num_values = sum(h * w for h, w in levels)
    with_compile = (case, batch) == MAIN_CASE if with_compile is None else with_compile
    impls = implementations(levels, with_compile)
    rows = []
    for backward in (False, True):
        pass_name = "fwd+bwd" if backward else "fwd"
        input_sets = [make_inputs(levels, batch, dtype, backward) for _ in range(3 if quick else 4)]
        expected = float64_expected(levels, input_sets[0], backward)
        for impl_name, impl in impls.items():
            run = forward_backward(impl) if backward else forward_only(impl)
            rows.append(
                harness.result_row(
                    op=OP,
                    case=f"{case} B={batch}",
                    dtype=dtype_name,
                    pass_name=pass_name,
                    impl=impl_name,
                    time_ms=harness.time_ms(run, input_sets, rep_ms=150 if quick else 300),
                    compulsory_bytes=compulsory_bytes(
                        batch, num_values, num_values, len(levels), dtype, backward
                    ),
                    peak_mem_mb=harness.peak_memory_mb(run, input_sets[0]),
                    rel_err=worst_error(run(*input_sets[0]), expected),
                    dispatch_us=harness.host_dispatch_us(run, input_sets[0]),
                )
            )
        del input_sets, expected
        torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    original = find_original_cuda_kernel()
    print(
        f"original CUDA kernel: {original[0] if original else 'not available (no mmcv / MultiScaleDeformableAttention)'}"
    )
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cases = (
        [MAIN_CASE]
        if args.quick
        else [(case, batch) for case, (_, batches) in SHAPES.items() for batch in batches]
    )
    dtype_names = QUICK_DTYPES if args.quick else tuple(DTYPES)
    rows = []
    for case, batch in cases:
        for dtype_name in dtype_names:
            rows.extend(bench_case(case, batch, dtype_name, args.quick))
    harness.add_speedups(rows, baselines=("reference", "compiled_reference", "cuda_original_fp32"))
    print_compiled_kernels(dtype_names)
    return rows


def print_compiled_kernels(dtype_names) -> None:
    """Registers, spills and atomic instruction forms (vector or scalar) of the kernels at the main shape."""
    levels = SHAPES[MAIN_CASE[0]][0]
    shapes, starts = level_layout(levels, DEVICE)
    for dtype_name in dtype_names:
        value, locations, weights, _ = make_inputs(
            levels, MAIN_CASE[1], DTYPES[dtype_name], requires_grad=False
        )
        report = compiled_kernel_report(value, shapes, starts, locations, weights)
        print(f"compiled kernels, {dtype_name}: {report}")
