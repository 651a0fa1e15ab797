"""A whole training step's Hungarian matcher costs and point-sampled mask losses (forward + backward), fused
Triton path against the unfused reference, on the shapes of ADE20K 640 (10 decoder predictions, Q=250,
12,544 points, B=2, K=150, mask logits 160x160, targets 640x640), and COCO 1024 (256x256, 1024x1024) when asked.

Implementations (same random draws for all, via one seeded generator per step):
- `reference_per_image`: Mask2Former's structure: reference ops, costs moved to the host per (layer, image),
  matched indices copied to the device per layer, float targets materialised at full resolution.
- `reference_batched`: reference ops in our batched structure (one device -> host transfer per step).
- `fused`: Triton sampling straight from bool masks, fused loss forward/backward, one transfer per step.
Besides time and peak memory, each row counts the step's host synchronisations (`host_syncs`, from
torch.cuda's sync debug mode). The step is launch- and sync-bound, not bandwidth-bound, so no GB/s is given.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from kernels.benchmarks import harness
from kernels.mask_losses import matching_costs, point_mask_losses

OP = "mask_losses"
DEVICE = "cuda"
LAYERS, QUERIES, POINTS, BATCH, CLASSES = 10, 250, 12544, 2, 150
# OneFormer's settings (model/criterion.py LossConfig; kernels/ does not import the model).
OVERSAMPLE_RATIO, IMPORTANCE_SAMPLE_RATIO = 3.0, 0.75
MATCHING = {"num_points": POINTS, "class_weight": 2.0, "bce_weight": 5.0, "dice_weight": 5.0}
# crop -> (mask logits at stride 4, targets at the crop); ADE20K 640 is the default
CROPS = {"ade20k_640": ((160, 160), (640, 640)), "coco_1024": ((256, 256), (1024, 1024))}
TARGETS_PER_IMAGE = {"main": (40, 25), "crowded": (100, 100)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "reference_per_image"
Inputs = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def make_inputs(
    targets_per_image: Sequence[int], dtype: torch.dtype, seed: int, crop: str = "ade20k_640"
) -> Inputs:
    """Per-layer class logits and mask logits (leaves with gradients), per-image labels and blobby bool masks."""
    pred_size, target_size = CROPS[crop]
    gen = torch.Generator(DEVICE).manual_seed(seed)
    pred_logits = [
        torch.randn(BATCH, QUERIES, CLASSES + 1, device=DEVICE, generator=gen).to(dtype)
        for _ in range(LAYERS)
    ]
    pred_masks = [
        (4 * torch.randn(BATCH, QUERIES, *pred_size, device=DEVICE, generator=gen))
        .to(dtype)
        .requires_grad_(True)
        for _ in range(LAYERS)
    ]
    labels, masks = [], []
    for count in targets_per_image:
        labels.append(torch.randint(0, CLASSES, (count,), device=DEVICE, generator=gen))
        coarse = torch.randn(count, 1, 12, 12, device=DEVICE, generator=gen)
        masks.append(F.interpolate(coarse, size=target_size, mode="bilinear")[:, 0] > 0.8)
    return pred_logits, pred_masks, labels, masks


def _solve(host_costs: np.ndarray, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    pred_index, target_index = linear_sum_assignment(host_costs[:, :count])
    return torch.as_tensor(pred_index), torch.as_tensor(target_index)


def match_per_image(pred_logits, pred_masks, labels, masks, generator) -> list[list[tuple]]:
    """Mask2Former's matcher loop: one cost matrix and one host transfer per (layer, image)."""
    assignments = []
    for layer_logits, layer_masks in zip(pred_logits, pred_masks):
        layer = []
        for image in range(BATCH):
            costs = matching_costs(
                [layer_logits[image : image + 1]],
                [layer_masks[image : image + 1]],
                [labels[image]],
                [masks[image]],
                **MATCHING,
                generator=generator,
                backend="reference",
            )
            layer.append(_solve(costs[0, 0].cpu().numpy(), len(labels[image])))
        assignments.append(layer)
    return assignments


def match_batched(pred_logits, pred_masks, labels, masks, generator, backend) -> list[list[tuple]]:
    costs = matching_costs(
        pred_logits, pred_masks, labels, masks, **MATCHING, generator=generator, backend=backend
    )
    host = costs.cpu().numpy()  # the step's one device -> host transfer
    return [
        [_solve(host[layer, image], len(labels[image])) for image in range(BATCH)] for layer in range(LAYERS)
    ]


def flat_indices(layer: list[tuple], counts: Sequence[int]) -> torch.Tensor:
    """[3, M]: batch index, query index, row in the concatenated targets."""
    offsets = np.cumsum([0, *counts[:-1]])
    return torch.stack(
        [
            torch.cat([torch.full_like(pred, image) for image, (pred, _) in enumerate(layer)]),
            torch.cat([pred for pred, _ in layer]),
            torch.cat([target + int(offset) for (_, target), offset in zip(layer, offsets)]),
        ]
    )


def make_step(impl: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """fn(pred_logits, pred_masks, labels, masks) -> (loss terms [2 * LAYERS], *mask-logit gradients)."""
    backend = "triton" if impl == "fused" else "reference"

    def step(pred_logits, pred_masks, labels, masks):
        generator = torch.Generator(DEVICE).manual_seed(0)
        counts = [len(layer_labels) for layer_labels in labels]
        all_masks = torch.cat(masks)
        num_masks = torch.full((), float(sum(counts)), device=DEVICE).clamp(min=1)
        if impl == BASELINE:
            assignments = match_per_image(pred_logits, pred_masks, labels, masks, generator)
            per_layer = [flat_indices(layer, counts).to(DEVICE) for layer in assignments]  # a sync per layer
        else:
            assignments = match_batched(pred_logits, pred_masks, labels, masks, generator, backend)
            host = torch.cat([flat_indices(layer, counts) for layer in assignments], dim=1)
            host = host.pin_memory() if DEVICE == "cuda" else host
            sizes = [sum(len(pred) for pred, _ in layer) for layer in assignments]
            per_layer = host.to(DEVICE, non_blocking=True).split(sizes, dim=1)
        terms = []
        for layer_masks, (batch_index, query_index, target_index) in zip(pred_masks, per_layer):
            terms.extend(
                point_mask_losses(
                    layer_masks[batch_index, query_index],
                    all_masks,
                    num_masks,
                    num_points=POINTS,
                    oversample_ratio=OVERSAMPLE_RATIO,
                    importance_sample_ratio=IMPORTANCE_SAMPLE_RATIO,
                    generator=generator,
                    target_index=target_index,
                    backend=backend,
                )
            )
        terms = torch.stack(terms)
        return (terms.detach(), *torch.autograd.grad(terms.sum(), pred_masks))

    return step


def count_host_syncs(fn: Callable, inputs: Sequence[Any]) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def float64_expected(inputs: Inputs, impl: str) -> tuple[torch.Tensor, ...]:
    """The reference in float64 with the same structure, hence the same random draws, as `impl`."""
    pred_logits, pred_masks, labels, masks = inputs
    upcast = [m.detach().double().requires_grad_(True) for m in pred_masks]
    reference = BASELINE if impl == BASELINE else "reference_batched"
    results = make_step(reference)([t.double() for t in pred_logits], upcast, labels, masks)
    return tuple(t.detach() for t in results)


def worst_error(results: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    return max(harness.relative_l2_error(a, e) for a, e in zip(results, expected))


def bench_case(case: str, dtype_name: str, quick: bool, crop: str = "ade20k_640") -> list[dict[str, Any]]:
    targets = TARGETS_PER_IMAGE[case]
    input_sets = [make_inputs(targets, DTYPES[dtype_name], seed, crop) for seed in range(2 if quick else 3)]
    rows = []
    for impl in (BASELINE, "reference_batched", "fused"):
        step = make_step(impl)
        error = worst_error(step(*input_sets[0]), float64_expected(input_sets[0], impl))
        syncs = count_host_syncs(step, input_sets[0])
        row = harness.result_row(
            op=OP,
            case=f"{case} T={targets}" if crop == "ade20k_640" else f"{crop} {case} T={targets}",
            dtype=dtype_name,
            pass_name="step fwd+bwd",
            impl=impl,
            time_ms=harness.time_ms(
                step, input_sets, warmup_ms=100 if quick else 200, rep_ms=500 if quick else 1500
            ),
            peak_mem_mb=harness.peak_memory_mb(step, input_sets[0]),
            rel_err=error,
            dispatch_us=harness.host_dispatch_us(step, input_sets[0], calls=3),
            host_syncs=syncs,
        )
        print(
            f"{OP} {case} {dtype_name} {impl}: {row['time_ms']:.2f} ms, {row['peak_mem_mb']:.0f} MB peak, "
            f"{syncs} host syncs, rel err {error:.1e}"
        )
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    cases = [("main", "fp32")] if args.quick else [(c, d) for c in TARGETS_PER_IMAGE for d in DTYPES]
    rows = []
    for case, dtype_name in cases:
        rows.extend(bench_case(case, dtype_name, args.quick))
    harness.add_speedups(rows, [BASELINE])
    return rows
