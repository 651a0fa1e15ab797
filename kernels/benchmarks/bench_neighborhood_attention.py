"""Neighborhood attention with relative positional bias: the FlexAttention path against the gather reference
(eager, and torch.compile of it), at DiNAT-L's shapes for ADE20K 640 and COCO 1024's first stage (kernel 11;
per stage and dilation, maps padded to kernel*dilation where the block pads them, as DiNAT does), forward and
forward+backward.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch

from kernels.benchmarks import harness
from kernels.neighborhood_attention import neighborhood_attention
from kernels.neighborhood_attention.reference import neighborhood_attention_reference

OP = "neighborhood_attention"
DEVICE = "cuda"
KERNEL_SIZE, HEAD_DIM, BATCH = 11, 32, 2
# case -> (map side after DiNAT's padding, heads, dilation); ADE20K 640: stages at 160, 80, 40, 20
SHAPES: dict[str, tuple[int, int, int]] = {
    "s1_d1_160": (160, 6, 1),
    "s1_d20_220": (220, 6, 20),
    "s2_d1_80": (80, 12, 1),
    "s2_d5_80": (80, 12, 5),
    "s2_d10_110": (110, 12, 10),
    "s3_d1_40": (40, 24, 1),
    "s3_d3_40": (40, 24, 3),
    "s3_d5_55": (55, 24, 5),
    "s4_d1_20": (20, 48, 1),
    "s4_d2_22": (22, 48, 2),
    # COCO 1024: the first stage at 256x256, the largest sequence (65,536 tokens) of the real configs
    "coco1024_s1_d1_256": (256, 6, 1),
    "coco1024_s1_d20_256": (256, 6, 20),
}
QUICK_CASES = ("s1_d1_160", "s1_d20_220", "s3_d3_40")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(side: int, heads: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (BATCH, heads, side, side, HEAD_DIM)
    tensors = [torch.randn(shape, generator=generator, device=DEVICE, dtype=dtype) for _ in range(4)]
    rpb = 0.1 * torch.randn(heads, 2 * KERNEL_SIZE - 1, 2 * KERNEL_SIZE - 1, generator=generator, device=DEVICE)
    return [*tensors, rpb.to(dtype)]  # q, k, v, grad_out, rpb


@functools.cache
def compiled_reference():
    return torch.compile(neighborhood_attention_reference, dynamic=False)


def implementations(dilation: int) -> dict[str, Any]:
    def call(backend_fn):
        def forward(q, k, v, grad_out, rpb):
            return backend_fn(q, k, v, KERNEL_SIZE, dilation, rpb)
        return forward

    return {
        "reference": call(neighborhood_attention_reference),
        "reference_compiled": call(lambda *a: compiled_reference()(*a)),
        "flex": call(lambda q, k, v, ks, d, rpb: neighborhood_attention(q, k, v, ks, d, rpb, backend="flex")),
    }


def forward_backward(forward):
    def run(q, k, v, grad_out, rpb):
        out = forward(q, k, v, grad_out, rpb)
        return torch.autograd.grad(out, (q, k, v, rpb), grad_out)
    return run


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cases = QUICK_CASES if args.quick else tuple(SHAPES)
    dtypes = ("bf16",) if args.quick else tuple(DTYPES)
    for case in cases:
        side, heads, dilation = SHAPES[case]
        tokens = BATCH * heads * side * side
        flops_fwd = 4 * tokens * KERNEL_SIZE**2 * HEAD_DIM
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            input_sets = [make_inputs(side, heads, dtype, args.seed + i) for i in range(3)]
            exact = [t[:1].double() for t in input_sets[0][:3]]
            expected = neighborhood_attention_reference(*exact, KERNEL_SIZE, dilation, input_sets[0][4].double())
            for impl, forward in implementations(dilation).items():
                for pass_name in ("fwd", "fwd+bwd"):
                    rows.append(measure(case, dtype_name, pass_name, impl, forward, input_sets, expected,
                                        tokens, flops_fwd, dtype))
                torch.cuda.empty_cache()
            del input_sets, expected, exact
    harness.add_speedups(rows, baselines=("reference", "reference_compiled"))
    return rows


def measure(case, dtype_name, pass_name, impl, forward, input_sets, expected, tokens, flops_fwd, dtype):
    element = torch.finfo(dtype).bits // 8
    if pass_name == "fwd":
        fn, sets, tensors_moved, flops = forward, input_sets, 4, flops_fwd
    else:
        fn = forward_backward(forward)
        sets = [[t.detach().requires_grad_(i in (0, 1, 2, 4)) for i, t in enumerate(s)] for s in input_sets]
        tensors_moved, flops = 12, 3.5 * flops_fwd  # q,k,v,out,grad read again; dq,dk,dv written
    try:
        time = harness.time_ms(fn, sets)
        peak = harness.peak_memory_mb(fn, sets[0])
        dispatch = harness.host_dispatch_us(fn, sets[0], calls=5)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return harness.result_row(op=OP, case=case, dtype=dtype_name, pass_name=pass_name, impl=impl,
                                  time_ms=None, note="out of memory")
    error = None
    if pass_name == "fwd":
        with torch.no_grad():
            error = harness.relative_l2_error(fn(*input_sets[0])[:1], expected)
    return harness.result_row(
        op=OP, case=case, dtype=dtype_name, pass_name=pass_name, impl=impl, time_ms=time,
        compulsory_bytes=tensors_moved * tokens * HEAD_DIM * element, peak_mem_mb=peak, rel_err=error,
        dispatch_us=dispatch, tflops=flops / (time * 1e-3) / 1e12,
    )
