"""OneFormer's training loss: Hungarian-matched class and mask losses on every decoder prediction, plus the
query-text contrastive loss on the final object queries.

`OneFormerCriterion.forward` returns the UNWEIGHTED named terms ("loss_ce", "loss_mask", "loss_dice" for the
final prediction, "loss_ce_0".."loss_dice_8" for the aux predictions in order, "loss_contrastive"); the
weights, like every loss and matching setting, live in `LossConfig` alone and `weighted_total` applies them. All losses run in float32 whatever the
model's dtype. Per step the matcher makes one device -> host transfer and the matched indices one host ->
device transfer; the number of masks stays a device tensor (averaged over workers, clamped >= 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.mask_losses import point_mask_losses
from model.matcher import Assignment, HungarianMatcher


@dataclass(frozen=True)
class LossConfig:
    """The one place where OneFormer's loss and matching settings live; `build_matcher` and `build_criterion`
    hand them to the modules, which have no defaults of their own."""

    ce: float = 2.0
    """Class cross-entropy weight (in the loss and in the matching cost)."""
    mask: float = 5.0
    """Point-sampled sigmoid BCE weight of the matched masks (loss and matching cost)."""
    dice: float = 5.0
    """Point-sampled dice (+1 smoothing) weight of the matched masks (loss and matching cost)."""
    contrastive: float = 0.5
    """Query-text contrastive loss weight (image-to-text plus text-to-image cross-entropy)."""
    no_object_weight: float = 0.1
    """Weight of the no-object class inside the class cross-entropy."""
    num_points: int = 112 * 112
    """Points per mask for the losses and per image for the matching costs."""
    oversample_ratio: float = 3.0
    """Candidate points per chosen point for the losses' uncertainty sampling."""
    importance_sample_ratio: float = 0.75
    """Share of the loss points taken from the most uncertain candidates (the rest uniform)."""

    def __post_init__(self) -> None:
        if self.num_points <= 0:
            raise ValueError(f"num_points must be positive, got {self.num_points}")
        if self.oversample_ratio < 1.0:
            raise ValueError(f"oversample_ratio must be >= 1, got {self.oversample_ratio}")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")

    def weight_of(self, term: str) -> float:
        """Weight of a term named like "loss_ce", "loss_dice_3" or "loss_contrastive"."""
        if not term.startswith("loss_"):
            raise ValueError(f"loss term names start with 'loss_', got {term!r}")
        kind = term[len("loss_") :].split("_")[0]
        if kind not in ("ce", "mask", "dice", "contrastive"):
            raise ValueError(f"unknown loss term {term!r}")
        return getattr(self, kind)

    def build_matcher(self, backend: str | None = None) -> HungarianMatcher:
        return HungarianMatcher(self.ce, self.mask, self.dice, self.num_points, backend=backend)

    def build_criterion(self, num_classes: int, backend: str | None = None) -> OneFormerCriterion:
        return OneFormerCriterion(
            num_classes, self.build_matcher(backend), self.no_object_weight, self.num_points,
            self.oversample_ratio, self.importance_sample_ratio, backend=backend,
        )


def weighted_total(terms: dict[str, torch.Tensor], weights: LossConfig) -> torch.Tensor:
    """The training objective: sum of weight x term over the criterion's named terms."""
    if not terms:
        raise ValueError("terms is empty: nothing to sum")
    return sum(weights.weight_of(name) * value for name, value in terms.items())


def training_loss(
    model: nn.Module, criterion: OneFormerCriterion, losses: LossConfig, images: torch.Tensor, tasks: Sequence[str],
    text_tokens: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]], generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective of one micro-batch, as the trainer computes it: forward with the task token and
    the texts, the matched terms, their weighted total. Returns (total, unweighted terms)."""
    terms = criterion(model(images, tasks, text_tokens), targets, generator=generator)
    return weighted_total(terms, losses), terms


def _distributed_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def contrastive_loss(
    object_queries: torch.Tensor, text_queries: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """OneFormer's query-text contrastive loss for object_queries, text_queries [B, N, D] and logit_scale (log).

    Each image's N x D queries are flattened and L2-normalised (likewise the text queries); the local rows are
    scored against the batch gathered from every worker, with gradients flowing back through the gather, so
    averaging the workers' losses (as DDP averages gradients) gives the loss of the whole global batch.
    """
    if object_queries.shape[0] != text_queries.shape[0] or object_queries.dim() != 3:
        raise ValueError(
            f"object_queries {tuple(object_queries.shape)} and text_queries {tuple(text_queries.shape)} "
            "must both be [B, N, D] with the same B"
        )
    images = F.normalize(object_queries.float().flatten(1), dim=-1)
    texts = F.normalize(text_queries.float().flatten(1), dim=-1)
    rank, world_size = _distributed_world()
    if world_size > 1:
        from torch.distributed.nn.functional import all_gather

        all_images = torch.cat(all_gather(images))
        all_texts = torch.cat(all_gather(texts))
    else:
        all_images, all_texts = images, texts
    scale = logit_scale.float().exp().clamp(max=100)
    labels = torch.arange(images.shape[0], device=images.device) + rank * images.shape[0]
    image_to_text = F.cross_entropy(scale * images @ all_texts.T, labels)
    text_to_image = F.cross_entropy(scale * texts @ all_images.T, labels)
    return image_to_text + text_to_image


class OneFormerCriterion(nn.Module):
    """Matched class/mask losses on the final and every aux prediction, plus the contrastive loss.

    forward(outputs, targets) takes the model's output dict ("pred_logits", "pred_masks", "aux_outputs", and
    for the contrastive term "object_queries", "text_queries", "logit_scale") and the loss targets (list of
    B dicts: "labels" int64 [T], "masks" bool [T, H, W]); returns the unweighted terms.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        no_object_weight: float,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.backend = backend
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(
        self,
        outputs: dict,
        targets: Sequence[dict[str, torch.Tensor]],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        layers = [*outputs.get("aux_outputs", []), outputs]
        suffixes = [f"_{i}" for i in range(len(layers) - 1)] + [""]
        self._check_targets(outputs, targets)
        assignments = self.matcher(layers, targets, generator=generator)
        device = outputs["pred_logits"].device
        matched = self._matched_indices_on_device(assignments, targets, device)
        num_masks = self._num_masks_over_workers(targets, device)
        all_labels = torch.cat([target["labels"] for target in targets]).to(device)
        all_masks = torch.cat([target["masks"] for target in targets]).to(device)

        terms: dict[str, torch.Tensor] = {}
        for layer, suffix, (batch_index, pred_index, target_index) in zip(layers, suffixes, matched):
            terms[f"loss_ce{suffix}"] = self._class_loss(
                layer["pred_logits"], batch_index, pred_index, all_labels[target_index]
            )
            loss_mask, loss_dice = point_mask_losses(
                layer["pred_masks"][batch_index, pred_index],
                all_masks,
                num_masks,
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
                generator=generator,
                target_index=target_index,
                backend=self.backend,
            )
            terms[f"loss_mask{suffix}"] = loss_mask.float()
            terms[f"loss_dice{suffix}"] = loss_dice.float()
        if "object_queries" in outputs:
            terms["loss_contrastive"] = contrastive_loss(
                outputs["object_queries"], outputs["text_queries"], outputs["logit_scale"]
            )
        return terms

    def _check_targets(self, outputs: dict, targets: Sequence[dict[str, torch.Tensor]]) -> None:
        batch = outputs["pred_logits"].shape[0]
        if len(targets) != batch:
            raise ValueError(f"targets has {len(targets)} entries but the batch has {batch} images")
        if outputs["pred_logits"].shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {outputs['pred_logits'].shape[-1]} classes, expected num_classes + 1 = "
                f"{self.num_classes + 1}"
            )
        for image, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"targets[{image}]: masks {tuple(masks.shape)} must be [T, H, W] with T = len(labels) "
                    f"= {labels.shape[0]}"
                )

    @staticmethod
    def _matched_indices_on_device(
        assignments: list[list[Assignment]], targets: Sequence[dict[str, torch.Tensor]], device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (batch_index, pred_index, index into the concatenated targets), moved in ONE copy."""
        offsets = [0]
        for target in targets[:-1]:
            offsets.append(offsets[-1] + int(target["labels"].shape[0]))
        per_layer, sizes = [], []
        for layer in assignments:
            batch_index = torch.cat([torch.full_like(pred, image) for image, (pred, _) in enumerate(layer)])
            pred_index = torch.cat([pred for pred, _ in layer])
            target_index = torch.cat([tgt + offset for (_, tgt), offset in zip(layer, offsets)])
            per_layer.append(torch.stack([batch_index, pred_index, target_index]))
            sizes.append(int(pred_index.shape[0]))
        host = torch.cat(per_layer, dim=1)
        if device.type == "cuda":
            host = host.pin_memory()
        on_device = host.to(device, non_blocking=True)
        return [tuple(chunk) for chunk in on_device.split(sizes, dim=1)]

    @staticmethod
    def _num_masks_over_workers(
        targets: Sequence[dict[str, torch.Tensor]], device: torch.device
    ) -> torch.Tensor:
        """Masks in the local batch averaged over workers, clamped >= 1; a device tensor, so no host sync."""
        # A fill on the device, not torch.tensor(..., device=...): that would copy from pageable host memory.
        num_masks = torch.full((), float(sum(int(t["labels"].shape[0]) for t in targets)), device=device)
        _, world_size = _distributed_world()
        if world_size > 1:
            dist.all_reduce(num_masks)
        return (num_masks / world_size).clamp(min=1)

    def _class_loss(
        self,
        pred_logits: torch.Tensor,
        batch_index: torch.Tensor,
        pred_index: torch.Tensor,
        matched_labels: torch.Tensor,
    ) -> torch.Tensor:
        """Cross-entropy over K+1 classes; unmatched queries target no-object (id K), weighted 0.1."""
        target_classes = torch.full(
            pred_logits.shape[:2], self.num_classes, dtype=torch.int64, device=pred_logits.device
        )
        target_classes[batch_index, pred_index] = matched_labels
        if self.class_weights.device != pred_logits.device:
            # Callers need not move the criterion: the buffer follows the outputs once, not every step.
            self.class_weights = self.class_weights.to(pred_logits.device)
        return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, self.class_weights)
