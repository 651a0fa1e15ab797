"""Turn OneFormer's raw predictions into semantic, panoptic and instance results, as the official OneFormer /
Mask2Former code does (not as the Hugging Face port does: its instance path builds a non-overlapping map
with a 0.5 score threshold; ours keeps the official top-k of overlapping masks with no threshold).

Every image goes through the same steps (``predict`` runs them all):
1. it is resized to the dataset's test size (detectron2's ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST), as
   the official test mapper does; ``INFERENCE_SIZES``), padded to the size divisibility with the pixel mean (0 after
   normalising, as the official model pads) and run through the model with its task;
2. its stride-4 mask logits are upsampled to the padded input size, cropped to the unpadded image size and
   resized to the original size (detectron2's ``sem_seg_postprocess``);
3. the task's rule combines class logits [Q, K+1] and mask logits [Q, H, W] into a result at the original size;
4. results are returned per image, one typed object per task.

The per-task functions work on one image's tensors, on CPU or GPU, without Python loops over pixels or
queries. ``postprocess`` is the batched entry point of steps 2-4.

Resampling: the official mapper resizes uint8 images with Pillow's bilinear filter; here float images are
resized with torch's bilinear filter with antialiasing, the closest tensor equivalent (the same triangle
filter, widened when shrinking). Measured on a 120x160 0-255 test image resized to 33x44 ... 640x853, they
differ by at most 1 grey level, 0.26-0.36 on average: Pillow's fixed-point weights and its rounding to uint8
(tests/test_inference.py pins the bound). Plain bilinear without antialiasing would differ by tens of grey
levels when shrinking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from model.texts import TASKS


@dataclass(frozen=True)
class InferenceThresholds:
    """Post-processing settings of one dataset (the official test configs)."""

    object_mask_threshold: float
    """Panoptic: a query is kept only if its top class probability exceeds this (and is not no-object)."""
    instance_top_k: int
    """Instance: number of (query, class) pairs kept per image before the thing-class filter."""
    overlap_threshold: float = 0.8
    """Panoptic: a segment is dropped when the pixels it wins cover less than this share of its own mask."""
    mask_probability_threshold: float = 0.5
    """Panoptic: a won pixel stays in a segment only if the segment's own mask probability reaches this."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.object_mask_threshold < 1.0:
            raise ValueError(f"object_mask_threshold must be in [0, 1), got {self.object_mask_threshold}")
        if self.instance_top_k < 1:
            raise ValueError(f"instance_top_k must be >= 1, got {self.instance_top_k}")
        if not 0.0 < self.overlap_threshold <= 1.0:
            raise ValueError(f"overlap_threshold must be in (0, 1], got {self.overlap_threshold}")


def thresholds_for(dataset: str) -> InferenceThresholds:
    """The official post-processing settings of `dataset` (from model.presets.DATASET_SETTINGS)."""
    from model.presets import DATASET_SETTINGS

    if dataset not in DATASET_SETTINGS:
        raise ValueError(f"dataset must be one of {sorted(DATASET_SETTINGS)}, got {dataset!r}")
    return thresholds_from_config(SimpleNamespace(**DATASET_SETTINGS[dataset]))


def thresholds_from_config(config) -> InferenceThresholds:
    """The settings a model config carries (`object_mask_threshold`, `overlap_threshold`, `test_topk`, as
    model.presets.OneFormerConfig has them)."""
    return InferenceThresholds(
        object_mask_threshold=config.object_mask_threshold,
        instance_top_k=config.test_topk,
        overlap_threshold=config.overlap_threshold,
    )


TTA_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
"""Multi-scale test short sides as factors of the test short side: the official TEST.AUG.MIN_SIZES are these
multiples of MIN_SIZE_TEST (ADE20K-640 320..1120, ADE20K-1280 640..2240, Cityscapes 512..1792)."""
COCO_TTA_FACTORS = (0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5)
"""OneFormer's COCO configs keep detectron2's default TEST.AUG.MIN_SIZES, 400..1200 by 100: these x 800."""


@dataclass(frozen=True)
class InferenceSize:
    """The test-time resize of a dataset: ResizeShortestEdge to `short_side` with the long side capped at
    `max_size`, and the cap of the multi-scale views (the official TEST.AUG.MAX_SIZE)."""

    short_side: int
    max_size: int
    tta_max_size: int | None = None
    """Default: max_size x the largest TTA factor (the ADE20K configs' rule: 2560 x 1.75 = 4480)."""
    tta_factors: tuple[float, ...] = TTA_FACTORS
    """The multi-scale views' short sides as factors of short_side (official TEST.AUG.MIN_SIZES / MIN_SIZE_TEST)."""

    def __post_init__(self) -> None:
        if not 0 < self.short_side <= self.max_size:
            raise ValueError(f"test size needs 0 < short side <= max size, got ({self.short_side}, {self.max_size})")
        if self.tta_max_size is None:
            object.__setattr__(self, "tta_max_size", round(self.max_size * max(self.tta_factors)))
        if self.tta_max_size < 1:
            raise ValueError(f"tta_max_size must be >= 1, got {self.tta_max_size}")

    def tta_short_sides(self, factors: Sequence[float] | None = None) -> tuple[int, ...]:
        """The multi-scale views' short sides (official TEST.AUG.MIN_SIZES): `factors` (default: tta_factors)
        of the test short side."""
        factors = self.tta_factors if factors is None else factors
        return tuple(max(1, round(self.short_side * factor)) for factor in factors)


INFERENCE_SIZES: dict[str, InferenceSize] = {
    "ade20k": InferenceSize(640, 2560, tta_max_size=4480),
    "ade20k_1280": InferenceSize(1280, 5120, tta_max_size=8960),
    "coco": InferenceSize(800, 1333, tta_max_size=4000, tta_factors=COCO_TTA_FACTORS),  # detectron2's defaults
    "cityscapes": InferenceSize(1024, 2048, tta_max_size=4096),
}
"""The official MIN_SIZE_TEST / MAX_SIZE_TEST (and TEST.AUG.MAX_SIZE) per dataset, keyed like the model
config's `dataset` field."""


def inference_size_for(dataset: str) -> InferenceSize:
    """The official test-time resize of `dataset`."""
    if dataset not in INFERENCE_SIZES:
        raise ValueError(f"dataset must be one of {sorted(INFERENCE_SIZES)}, got {dataset!r}")
    return INFERENCE_SIZES[dataset]


def inference_size_from_config(config) -> InferenceSize:
    """The official test-time resize of the dataset a model config names (its `dataset` field)."""
    return inference_size_for(config.dataset)


def resolve_inference_size(config, test_size: tuple[int, int] | str | None = None) -> InferenceSize | None:
    """The size a model is evaluated at: test_size None -> the official test size of the model config's
    `dataset`; "none" -> each image at its own size (returns None); (short, max) -> that ResizeShortestEdge."""
    if test_size is None:
        return inference_size_from_config(config)
    if isinstance(test_size, str):
        if test_size.lower() != "none":
            raise ValueError(f"test size must be (short side, max size), 'none' or unset, got {test_size!r}")
        return None
    if len(test_size) != 2:
        raise ValueError(f"test size must be (short side, max size), got {tuple(test_size)}")
    return InferenceSize(int(test_size[0]), int(test_size[1]))


def resized_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge output shape: the short side becomes `short_side`, then both sides
    shrink together if the long side exceeds `max_size`; each side rounded half up."""
    scale = short_side / min(height, width)
    if height < width:
        new_height, new_width = float(short_side), width * scale
    else:
        new_height, new_width = height * scale, float(short_side)
    longest = max(new_height, new_width)
    if longest > max_size:
        new_height, new_width = new_height * max_size / longest, new_width * max_size / longest
    return int(new_height + 0.5), int(new_width + 0.5)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, h, w] float -> [3, H, W], bilinear with antialiasing (see the module docstring); same size: as is."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def resize_to_inference_size(image: torch.Tensor, size: InferenceSize | None) -> torch.Tensor:
    """The image the model sees: [3, h, w] resized to the test size, or unchanged when `size` is None."""
    if size is None:
        return image
    return resize_image(image, resized_shape(*image.shape[-2:], size.short_side, size.max_size))


@dataclass
class SemanticResult:
    scores: torch.Tensor
    """float [K, H, W]: per class, the sum over queries of class probability x mask probability."""
    labels: torch.Tensor
    """int64 [H, W]: the per-pixel argmax of ``scores``."""


@dataclass
class PanopticSegment:
    id: int
    """The segment's value in the id map (1, 2, ...; 0 is void)."""
    category_id: int
    """Contiguous class id in 0..K-1."""
    isthing: bool
    score: float
    """Class probability of the query that created the segment (merged stuff keeps the first query's)."""


@dataclass
class PanopticResult:
    segment_ids: torch.Tensor
    """int32 [H, W]: segment id per pixel, 0 where void."""
    segments_info: list[PanopticSegment]


@dataclass
class InstanceResult:
    masks: torch.Tensor
    """bool [M, H, W], M <= top-k: overlapping binary masks (mask logit > 0)."""
    scores: torch.Tensor
    """float [M]: class probability x mean mask probability inside the binary mask."""
    labels: torch.Tensor
    """int64 [M]: contiguous thing class ids."""


def resize_mask_logits(
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """[Q, h, w] stride-4 logits -> [Q, H0, W0] at the original image size: upsample to the padded input,
    crop the padding off, resize to the size the image had before the test-time resize."""
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [Q, h, w], got shape {tuple(mask_logits.shape)}")
    if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
        raise ValueError(f"image_size {tuple(image_size)} exceeds padded_size {tuple(padded_size)}")
    upsampled = F.interpolate(mask_logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False)
    cropped = upsampled[:, :, : image_size[0], : image_size[1]]
    resized = F.interpolate(cropped, size=tuple(original_size), mode="bilinear", align_corners=False)
    return resized[0]


def _check_pair(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if class_logits.dim() != 2 or mask_logits.dim() != 3 or class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            "class_logits must be [Q, K+1] and mask_logits [Q, H, W] with the same Q, got "
            f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> SemanticResult:
    """Soft per-class score maps: no-object dropped after the softmax, masks through a sigmoid."""
    _check_pair(class_logits, mask_logits)
    class_probs = class_logits.float().softmax(-1)[:, :-1]
    mask_probs = mask_logits.float().sigmoid()
    scores = torch.einsum("qk,qhw->khw", class_probs, mask_probs)
    return SemanticResult(scores=scores, labels=scores.argmax(0))


def _as_thing_flags(is_thing: Sequence[bool] | torch.Tensor, num_classes: int, device) -> torch.Tensor:
    flags = torch.as_tensor(is_thing, dtype=torch.bool, device=device)
    if flags.shape != (num_classes,):
        raise ValueError(f"is_thing must hold one flag per class ({num_classes}), got shape {tuple(flags.shape)}")
    return flags


def _first_of_each_stuff_class(labels: torch.Tensor, valid: torch.Tensor, stuff: torch.Tensor) -> torch.Tensor:
    """For each kept query, the index of the query whose segment it joins: itself for things, the first
    valid query of the same class for stuff (stuff classes form one segment each)."""
    index = torch.arange(labels.numel(), device=labels.device)
    merge = (labels[:, None] == labels[None, :]) & stuff[:, None] & (valid & stuff)[None, :]
    has_earlier = merge.any(1)
    # argmax over a bool row returns its first True: the earliest valid stuff query of that class.
    return torch.where(has_earlier, merge.int().argmax(1), index)


def panoptic_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: Sequence[bool] | torch.Tensor,
    object_mask_threshold: float,
    overlap_threshold: float = 0.8,
    mask_probability_threshold: float = 0.5,
) -> PanopticResult:
    """Non-overlapping segments from confident queries; pixels nobody claims are void (0).

    The overlap test divides the area a query wins in the argmax by its own mask area (probability >= 0.5),
    exactly as the official code does; the won pixels the segment keeps are those where its own mask
    probability is also >= 0.5.
    """
    _check_pair(class_logits, mask_logits)
    num_classes = class_logits.shape[1] - 1
    thing_flags = _as_thing_flags(is_thing, num_classes, class_logits.device)
    scores, labels = class_logits.float().softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    scores, labels = scores[keep], labels[keep]
    mask_probs = mask_logits.float().sigmoid()[keep]
    height, width = mask_logits.shape[-2:]
    if labels.numel() == 0:
        empty = torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device)
        return PanopticResult(segment_ids=empty, segments_info=[])

    winner = (scores[:, None, None] * mask_probs).argmax(0)
    winner_prob = mask_probs.gather(0, winner[None])[0]
    in_segment = winner_prob >= mask_probability_threshold
    count = labels.numel()
    won_area = torch.bincount(winner.flatten(), minlength=count)
    own_area = (mask_probs >= mask_probability_threshold).flatten(1).sum(1)
    kept_area = torch.bincount(winner[in_segment], minlength=count)
    valid = (won_area > 0) & (own_area > 0) & (kept_area > 0)
    valid &= won_area.float() >= overlap_threshold * own_area.float().clamp(min=1)

    target = _first_of_each_stuff_class(labels, valid, ~thing_flags[labels])
    opens_segment = valid & (target == torch.arange(count, device=labels.device))
    segment_number = torch.cumsum(opens_segment.int(), 0)
    query_segment_id = torch.where(valid, segment_number[target], torch.zeros_like(segment_number))
    segment_ids = torch.where(in_segment, query_segment_id[winner], 0).to(torch.int32)

    segments_info = [
        PanopticSegment(
            id=int(segment_number[q]),
            category_id=int(labels[q]),
            isthing=bool(thing_flags[labels[q]]),
            score=float(scores[q]),
        )
        for q in opens_segment.nonzero().flatten().tolist()
    ]
    return PanopticResult(segment_ids=segment_ids, segments_info=segments_info)


def instance_inference(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    is_thing: Sequence[bool] | torch.Tensor,
    top_k: int,
) -> InstanceResult:
    """The top-k (query, class) pairs over all Q x K class probabilities, then thing classes only; masks may
    overlap and there is no NMS and no score threshold."""
    _check_pair(class_logits, mask_logits)
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    thing_flags = _as_thing_flags(is_thing, num_classes, class_logits.device)
    class_probs = class_logits.float().softmax(-1)[:, :-1]
    k = min(top_k, num_queries * num_classes)
    top_scores, flat_index = class_probs.flatten().topk(k)
    labels = flat_index % num_classes
    queries = flat_index // num_classes
    is_thing_pair = thing_flags[labels]
    top_scores, labels, queries = top_scores[is_thing_pair], labels[is_thing_pair], queries[is_thing_pair]

    selected_logits = mask_logits[queries].float()
    masks = selected_logits > 0
    mask_probs = selected_logits.sigmoid().flatten(1)
    binary = masks.flatten(1).float()
    mean_inside = (mask_probs * binary).sum(1) / (binary.sum(1) + 1e-6)
    return InstanceResult(masks=masks, scores=top_scores * mean_inside, labels=labels)


def postprocess(
    outputs: dict[str, torch.Tensor],
    tasks: Sequence[str],
    image_sizes: Sequence[tuple[int, int]],
    original_sizes: Sequence[tuple[int, int]],
    is_thing: Sequence[bool] | torch.Tensor,
    thresholds: InferenceThresholds,
    padded_size: tuple[int, int] | None = None,
) -> list[SemanticResult | PanopticResult | InstanceResult]:
    """One result per image, of the type its task asks for.

    outputs: the model's dict with "pred_logits" [B, Q, K+1] and "pred_masks" [B, Q, h, w] (stride 4).
    image_sizes: (H, W) of each image inside the padded batch; original_sizes: the (H, W) to return at.
    padded_size: (H, W) of the padded batch fed to the model; defaults to 4 x the mask size.
    Images are processed one at a time so that only one image's Q full-size masks are alive at once.
    """
    class_logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]
    batch = class_logits.shape[0]
    if mask_logits.dim() != 4 or mask_logits.shape[:2] != class_logits.shape[:2]:
        raise ValueError(
            f"pred_masks must be [B, Q, h, w] matching pred_logits [B, Q, K+1], got "
            f"{tuple(mask_logits.shape)} and {tuple(class_logits.shape)}"
        )
    for name, values in (("tasks", tasks), ("image_sizes", image_sizes), ("original_sizes", original_sizes)):
        if len(values) != batch:
            raise ValueError(f"{name} must have one entry per image ({batch}), got {len(values)}")
    if padded_size is None:
        padded_size = (4 * mask_logits.shape[-2], 4 * mask_logits.shape[-1])

    results = []
    for index, task in enumerate(tasks):
        masks = resize_mask_logits(mask_logits[index], padded_size, image_sizes[index], original_sizes[index])
        results.append(_infer_one(task, class_logits[index], masks, is_thing, thresholds))
    return results


def _infer_one(task, class_logits, mask_logits, is_thing, thresholds):
    if task == "semantic":
        return semantic_inference(class_logits, mask_logits)
    if task == "panoptic":
        return panoptic_inference(
            class_logits,
            mask_logits,
            is_thing,
            thresholds.object_mask_threshold,
            thresholds.overlap_threshold,
            thresholds.mask_probability_threshold,
        )
    if task == "instance":
        return instance_inference(class_logits, mask_logits, is_thing, thresholds.instance_top_k)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def predict(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    tasks: Sequence[str],
    is_thing: Sequence[bool] | torch.Tensor,
    thresholds: InferenceThresholds,
    size: InferenceSize | None = None,
    size_divisibility: int = 32,
) -> list[SemanticResult | PanopticResult | InstanceResult]:
    """The official test path for images of any size: each [3, H0, W0] RGB 0-255 image is resized to the test
    `size` (None: kept as is), the batch is padded to `size_divisibility` with the model's pixel mean (0 after
    normalising), the model runs once with one task per image, and every result comes back at (H0, W0).
    Run the model in eval mode; its outputs are post-processed in fp32."""
    if len(tasks) != len(images):
        raise ValueError(f"tasks must have one entry per image ({len(images)}), got {len(tasks)}")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    pad_value = _pixel_mean_of(model).reshape(3, 1, 1)
    inputs = [resize_to_inference_size(image.to(pad_value.device, torch.float32), size) for image in images]
    batch = _pad_batch(inputs, pad_value.float(), size_divisibility)
    with torch.no_grad():
        outputs = model(batch.to(pad_value.dtype), list(tasks))
    outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_masks")}
    return postprocess(outputs, list(tasks), [tuple(i.shape[-2:]) for i in inputs],
                       [tuple(i.shape[-2:]) for i in images], is_thing, thresholds, padded_size=tuple(batch.shape[-2:]))


def semantic_multiscale_flip(
    model: torch.nn.Module,
    images: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    scales: Sequence[float] | None = None,
    flip: bool = True,
    size_divisibility: int = 32,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    size: InferenceSize | None = None,
) -> list[torch.Tensor]:
    """Semantic test-time augmentation as the official Mask2Former/OneFormer SemanticSegmentorWithTTA does it:
    the semantic scores [K, H0, W0] of each image averaged over every scale, each with and without a
    horizontal flip (flipped back before averaging), all at the original size.

    images: float [B, 3, H, W] RGB 0-255, a padded batch; image_sizes: the valid (h, w) of each image.
    size given (the official path): each image is first resized to the test size, and scale s is then the
    official DatasetMapperTTA view of that image, ResizeShortestEdge(s x size.short_side, size.tta_max_size)
    (ADE20K-640: short sides 320..1120, long side at most 4480). size None: scale s resizes the valid image
    to (int(h s + 0.5), int(w s + 0.5)), factors of the image as given. scales default: the size's official
    factors (size.tta_factors), TTA_FACTORS when size is None. Resizing is `resize_image`; an
    unchanged size is left untouched. Each augmented batch is padded to `size_divisibility` with the model's
    pixel mean (what the official code's zero padding after normalisation is) and run with the "semantic"
    task. original_sizes: the (H0, W0) to return at; defaults to image_sizes. Run the model in eval mode.
    """
    if scales is None:
        scales = TTA_FACTORS if size is None else size.tta_factors
    _check_tta_arguments(images, image_sizes, scales, size_divisibility, original_sizes)
    images = images.to(_pixel_mean_of(model).device)
    original_sizes = list(image_sizes if original_sizes is None else original_sizes)
    crops = [images[index, :, :height, :width] for index, (height, width) in enumerate(image_sizes)]
    pad_value = _pixel_mean_of(model).reshape(3, 1, 1).to(images)
    totals: list[torch.Tensor | None] = [None] * len(crops)
    flips = (False, True) if flip else (False,)
    for resized in _multiscale_views(crops, scales, size):
        for flipped in flips:
            views = [image.flip(-1) for image in resized] if flipped else resized
            all_scores = _semantic_scores(model, views, pad_value, size_divisibility, original_sizes)
            for index, scores in enumerate(all_scores):
                scores = scores.flip(-1) if flipped else scores
                totals[index] = scores if totals[index] is None else totals[index] + scores
    count = len(scales) * len(flips)
    return [total / count for total in totals]


def _multiscale_views(crops: list[torch.Tensor], scales: Sequence[float], size: InferenceSize | None):
    """Per scale, the list of resized crops (see semantic_multiscale_flip)."""
    if size is None:
        for scale in scales:
            yield [_rescale_image(crop, scale) for crop in crops]
        return
    at_test_size = [resize_to_inference_size(crop, size) for crop in crops]
    for short_side in size.tta_short_sides(scales):
        yield [resize_image(image, resized_shape(*image.shape[-2:], short_side, size.tta_max_size))
               for image in at_test_size]


def _semantic_scores(model, views, pad_value, size_divisibility, original_sizes) -> list[torch.Tensor]:
    """Semantic scores [K, H0, W0] of [3, h, w] images, run as one padded batch with the semantic task."""
    batch = _pad_batch(views, pad_value, size_divisibility)
    with torch.no_grad():
        outputs = model(batch, ["semantic"] * len(views))
    scores = []
    for index, view in enumerate(views):
        masks = resize_mask_logits(
            outputs["pred_masks"][index], batch.shape[-2:], view.shape[-2:], original_sizes[index]
        )
        scores.append(semantic_inference(outputs["pred_logits"][index], masks).scores)
    return scores


def _check_tta_arguments(images, image_sizes, scales, size_divisibility, original_sizes) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if len(image_sizes) != images.shape[0]:
        raise ValueError(f"image_sizes must have one (h, w) per image ({images.shape[0]}), got {len(image_sizes)}")
    for height, width in image_sizes:
        if not (0 < height <= images.shape[2] and 0 < width <= images.shape[3]):
            raise ValueError(
                f"image_sizes entry {(height, width)} must be positive and within the batch {tuple(images.shape[2:])}"
            )
    if original_sizes is not None and len(original_sizes) != images.shape[0]:
        raise ValueError(
            f"original_sizes must have one (h, w) per image ({images.shape[0]}), got {len(original_sizes)}"
        )
    if len(scales) == 0:
        raise ValueError("scales must hold at least one scale, got an empty sequence")
    if any(not scale > 0 for scale in scales):
        raise ValueError(f"scales must all be positive, got {tuple(scales)}")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")


def _pixel_mean_of(model: torch.nn.Module) -> torch.Tensor:
    """The model's pixel mean (the padding that normalises to 0), looking inside DDP / DeepSpeed wrappers."""
    for candidate in (model, getattr(model, "module", None)):
        mean = getattr(candidate, "pixel_mean", None)
        if isinstance(mean, torch.Tensor) and mean.numel() == 3:
            return mean
    raise ValueError(f"model must carry a 3-value pixel_mean buffer (as OneFormer does), got {type(model).__name__}")


def _rescale_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """[3, h, w] -> [3, int(h s + 0.5), int(w s + 0.5)] (detectron2's rounding); scale 1 is the identity."""
    height, width = image.shape[-2:]
    return resize_image(image, (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))))


def _pad_batch(images: Sequence[torch.Tensor], pad_value: torch.Tensor, size_divisibility: int) -> torch.Tensor:
    """Stack [3, h_i, w_i] images top-left into one [B, 3, H, W] batch, H and W multiples of size_divisibility."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    height, width = (-(-side // size_divisibility) * size_divisibility for side in (height, width))
    batch = pad_value.expand(len(images), 3, height, width).clone()
    for index, image in enumerate(images):
        batch[index, :, : image.shape[-2], : image.shape[-1]] = image
    return batch
