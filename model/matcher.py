"""Hungarian matching between predictions and ground-truth masks, for every decoder layer of a step at once.

Costs (Mask2Former / OneFormer): class 2 x (minus the softmax probability of the GT class), sigmoid BCE 5 and
dice 5 on 12,544 uniform points shared by all masks of an image, in float32, without gradients. The cost
matrices of all layers and images are built on the device in one batched pass and moved to the host in ONE
transfer (one host sync per step instead of one per layer and image); scipy solves each assignment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from kernels.mask_losses import matching_costs

Assignment = tuple[torch.Tensor, torch.Tensor]
# A cost this large marks a NaN/inf entry (diverged outputs): the solver still runs and avoids the pair.
_UNUSABLE_COST = 1e8


def solve_assignments(costs: torch.Tensor, targets_per_image: Sequence[int]) -> list[list[Assignment]]:
    """costs [L, B, Q, Tmax] on any device -> per layer, per image, (pred_indices, target_indices) int64 CPU
    tensors sorted by prediction index. Only the first targets_per_image[b] columns of image b are real."""
    host_costs = costs.detach().to("cpu", torch.float32).numpy()  # the step's one host sync
    host_costs = np.nan_to_num(host_costs, nan=_UNUSABLE_COST, posinf=_UNUSABLE_COST, neginf=-_UNUSABLE_COST)
    assignments = []
    for layer_costs in host_costs:
        layer = []
        for image_costs, count in zip(layer_costs, targets_per_image):
            pred_indices, target_indices = linear_sum_assignment(image_costs[:, :count])
            layer.append(
                (
                    torch.as_tensor(pred_indices, dtype=torch.int64),
                    torch.as_tensor(target_indices, dtype=torch.int64),
                )
            )
        assignments.append(layer)
    return assignments


class HungarianMatcher(nn.Module):
    """Matches predictions to targets for each decoder layer.

    forward(layer_outputs, targets) takes a list of per-layer dicts with "pred_logits" [B, Q, K+1] and
    "pred_masks" [B, Q, h, w], and the loss targets (list of B dicts with "labels" int64 [T] and "masks" bool
    [T, H, W]); returns, per layer, per image, (pred_indices, target_indices) int64 CPU tensors.
    """

    def __init__(
        self,
        class_weight: float,
        bce_weight: float,
        dice_weight: float,
        num_points: int,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_points <= 0:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.class_weight = class_weight
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.backend = backend

    @torch.no_grad()
    def forward(
        self,
        layer_outputs: Sequence[dict[str, torch.Tensor]],
        targets: Sequence[dict[str, torch.Tensor]],
        generator: torch.Generator | None = None,
    ) -> list[list[Assignment]]:
        costs = matching_costs(
            [output["pred_logits"] for output in layer_outputs],
            [output["pred_masks"] for output in layer_outputs],
            [target["labels"] for target in targets],
            [target["masks"] for target in targets],
            num_points=self.num_points,
            class_weight=self.class_weight,
            bce_weight=self.bce_weight,
            dice_weight=self.dice_weight,
            generator=generator,
            backend=self.backend,
        )
        return solve_assignments(costs, [int(target["labels"].shape[0]) for target in targets])
