"""Convergence: the tiny OneFormer, trained with the real criterion, memorises a handful of synthetic images
on the CPU, and panoptic inference then recovers their segments."""

from __future__ import annotations

import pytest
import torch

from model import build_model
from model.criterion import LossConfig, training_loss
from model.inference import panoptic_inference
from model.tokenizer import tokenize

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64
# Class 0 is stuff ("ground"), classes 1..3 are things; each has its own colour.
CLASS_NAMES = ("ground", "red square", "green disc", "blue bar")
IS_THING = (False, True, True, True)
COLOURS = torch.tensor([[90.0, 90.0, 90.0], [230.0, 40.0, 40.0], [40.0, 200.0, 60.0], [50.0, 70.0, 230.0]])
STEPS = 100


def thing_mask(kind: int, cy: int, cx: int, radius: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    if kind == 1:
        return ((ys - cy).abs() <= radius) & ((xs - cx).abs() <= radius)
    if kind == 2:
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
    return ((ys - cy).abs() <= radius // 2) & ((xs - cx).abs() <= radius + 4)


def synthetic_image(things: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, dict]:
    """An image of non-overlapping things on ground, and its panoptic target (ground first)."""
    labels, masks = [0], []
    ground = torch.ones(SIZE, SIZE, dtype=torch.bool)
    for kind, cy, cx, radius in things:
        mask = thing_mask(kind, cy, cx, radius) & ground
        ground &= ~mask
        labels.append(kind)
        masks.append(mask)
    masks.insert(0, ground)
    target = {"labels": torch.tensor(labels), "masks": torch.stack(masks)}
    image = (COLOURS[target["labels"]][:, :, None, None] * target["masks"][:, None].float()).sum(0)
    return image, target


DATASET = [
    [(1, 20, 20, 10), (2, 44, 44, 10)],
    [(3, 16, 32, 10), (2, 46, 18, 9)],
    [(1, 40, 40, 12)],
    [(2, 18, 44, 11), (3, 46, 24, 9), (1, 16, 14, 6)],
]


def texts_for(target: dict, num_texts: int) -> torch.Tensor:
    """The text list of the panoptic task (model/texts.py): padding text, overwritten by one entry per GT mask."""
    texts = ["a panoptic photo"] * num_texts
    for slot, label in enumerate(target["labels"].tolist()[:num_texts]):
        texts[slot] = f"a photo with a {CLASS_NAMES[label]}"
    return tokenize(texts)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum().clamp(min=1)).item()


@pytest.mark.slow  # trains for about 45 s
def test_tiny_model_overfits_synthetic_images_and_recovers_their_segments():
    torch.manual_seed(0)
    model = build_model("tiny", training=True, num_classes=len(CLASS_NAMES))
    loss_config = LossConfig(num_points=1024)
    criterion = loss_config.build_criterion(len(CLASS_NAMES))
    samples = [synthetic_image(things) for things in DATASET]
    images = torch.stack([image for image, _ in samples])
    targets = [target for _, target in samples]
    num_texts = model.num_queries - model.text_mapper.num_context
    text_tokens = torch.stack([texts_for(target, num_texts) for target in targets])
    tasks = ["panoptic"] * len(samples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)

    model.train()
    losses = []
    for _ in range(STEPS):
        loss, _ = training_loss(model, criterion, loss_config, images, tasks, text_tokens, targets, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 4, f"loss fell only from {first:.2f} to {last:.2f}"

    model.eval()
    with torch.no_grad():
        outputs = model(images, tasks)
    upsampled = torch.nn.functional.interpolate(outputs["pred_masks"], size=(SIZE, SIZE), mode="bilinear")
    ious = []
    for index, target in enumerate(targets):
        result = panoptic_inference(outputs["pred_logits"][index], upsampled[index], IS_THING, 0.5)
        for label, gt_mask in zip(target["labels"].tolist(), target["masks"]):
            candidates = [
                mask_iou(result.segment_ids == segment.id, gt_mask)
                for segment in result.segments_info
                if segment.category_id == label
            ]
            ious.append(max(candidates, default=0.0))
    recovered = sum(iou > 0.7 for iou in ious)
    assert recovered >= 0.8 * len(ious), f"segment IoUs {[round(i, 2) for i in ious]}"
