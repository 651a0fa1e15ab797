"""The paper's training augmentations on (image, segment-index map) pairs, driven by an explicit numpy RNG.

ade20k / cityscapes (detectron2 configs of OneFormer): short side drawn from {0.5, 0.6, ... 2.0} x base
(long side capped at max_size), random crop of crop_size (with the optional single-category-area retry rule),
SSD colour jitter, horizontal flip. coco_lsj: flip, ResizeScale 0.1-2.0 of the target size, fixed-size crop;
padding happens at batching. Resize-then-crop is done as one PIL resize of the source region that maps onto
the crop (`box=`), which samples the same pixel centres as resizing the whole image first, at a fraction of
the cost for large scales. Images resize bilinearly, index maps with nearest neighbour (as detectron2 does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PRESETS = ("ade20k", "cityscapes", "coco_lsj", "none")
CROP_RETRIES = 10


@dataclass(frozen=True)
class AugmentParams:
    preset: str
    crop_size: tuple[int, int]  # (height, width)
    resize_base: int
    scale_range: tuple[float, float]
    scale_choices: bool = True
    max_size_factor: float = 4.0
    category_max_area: float = 1.0
    color_jitter: bool = True
    horizontal_flip: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")

    def short_side_choices(self) -> list[int]:
        low, high = (round(s * 10) for s in self.scale_range)
        return [int(self.resize_base * step / 10) for step in range(low, high + 1)]


def _resize_region(array: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int], nearest: bool):
    """Resize the source region `box` (x0, y0, x1, y1, float) to `size` (height, width)."""
    if array.ndim == 2 and array.dtype == np.uint16:
        picture = Image.fromarray(array.astype(np.int32), mode="I")
    else:
        picture = Image.fromarray(array)
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    out = np.asarray(picture.resize((size[1], size[0]), resample=resample, box=box))
    return out.astype(array.dtype, copy=False)


def _short_side_scale(height: int, width: int, params: AugmentParams, rng: np.random.Generator) -> float:
    if params.scale_choices:
        short = float(rng.choice(params.short_side_choices()))
    else:
        short = rng.uniform(*params.scale_range) * params.resize_base
    scale = short / min(height, width)
    max_size = params.max_size_factor * params.resize_base
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return scale


def _lsj_scale(height: int, width: int, params: AugmentParams, rng: np.random.Generator) -> float:
    target = rng.uniform(*params.scale_range) * np.array(params.crop_size, np.float64)
    return float(min(target[0] / height, target[1] / width))


def _crop_offset(resized: tuple[int, int], crop: tuple[int, int], params: AugmentParams, rng) -> tuple[int, int]:
    if params.preset == "coco_lsj":  # FixedSizeCrop: offset = round(max_offset * U(0, 1))
        return tuple(int(round(max(r - c, 0) * rng.uniform())) for r, c in zip(resized, crop))
    return tuple(int(rng.integers(0, r - c + 1)) for r, c in zip(resized, crop))


def _dominant_fraction(index_map: np.ndarray, classes_of_value: np.ndarray) -> float:
    labelled = classes_of_value[index_map.ravel()]
    labelled = labelled[labelled >= 0]
    return 1.0 if labelled.size == 0 else np.bincount(labelled).max() / labelled.size


def resize_and_crop(image, index_map, classes_of_value, params: AugmentParams, rng: np.random.Generator):
    """Random rescale and crop; `classes_of_value` maps index-map values to classes (-1 void) for the
    category-area rule, which is checked on the source region of each candidate crop."""
    height, width = index_map.shape
    scale = (_lsj_scale if params.preset == "coco_lsj" else _short_side_scale)(height, width, params, rng)
    resized = (int(height * scale + 0.5), int(width * scale + 0.5))
    crop = (min(params.crop_size[0], resized[0]), min(params.crop_size[1], resized[1]))
    scale_y, scale_x = resized[0] / height, resized[1] / width
    for _ in range(CROP_RETRIES):
        top, left = _crop_offset(resized, crop, params, rng)
        box = (left / scale_x, top / scale_y, (left + crop[1]) / scale_x, (top + crop[0]) / scale_y)
        if params.category_max_area >= 1.0:
            break
        region = index_map[int(box[1]) : int(np.ceil(box[3])), int(box[0]) : int(np.ceil(box[2]))]
        if _dominant_fraction(region, classes_of_value) < params.category_max_area:
            break
    return _resize_region(image, box, crop, nearest=False), _resize_region(index_map, box, crop, nearest=True)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """uint8 clip(values * alpha + beta) through a 256-entry lookup table applied by PIL (several times
    faster than float arithmetic on the whole image, same result)."""
    table = np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8).tolist()
    picture = Image.fromarray(values)
    return np.asarray(picture.point(table * len(picture.getbands())))


def ssd_color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """detectron2's ColorAugSSDTransform: brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18
    (of OpenCV's 180), each with probability 1/2, contrast first or last at random."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(0.5, 1.5))
    apply_saturation, apply_hue = bool(rng.integers(2)), bool(rng.integers(2))
    if apply_saturation or apply_hue:
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        if apply_saturation:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        if apply_hue:  # PIL's hue spans 0-255 for 360 degrees, OpenCV's 0-180
            shift = int(round(rng.integers(-18, 19) * 256 / 180))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
        image = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if not contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(0.5, 1.5))
    return image


def augment(image, index_map, classes_of_value, params: AugmentParams, rng: np.random.Generator):
    """One training augmentation of an image (uint8 [H, W, 3]) and its index map; returns both, cropped."""
    if params.preset == "none":
        return image, index_map
    image, index_map = resize_and_crop(image, index_map, classes_of_value, params, rng)
    if params.color_jitter:
        image = ssd_color_jitter(image, rng)
    if params.horizontal_flip and rng.integers(2):
        image, index_map = image[:, ::-1], index_map[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(index_map)
