"""The paper's training augmentations on (image, segment-index map) pairs, driven by an explicit numpy RNG.

ade20k / cityscapes (detectron2 configs of OneFormer): short side drawn from {0.5, 0.6, ... 2.0} x base
(long side capped at max_size), random crop of crop_size (with the optional single-category-area retry rule),
SSD colour jitter, horizontal flip. coco_lsj: flip, ResizeScale 0.1-2.0 of the target size, fixed-size crop;
padding happens at batching. Resize-then-crop is done as one PIL resize of the source region that maps onto
the crop (`box=`), which samples the same pixel centres as resizing the whole image first, at a fraction of
the cost for large scales. Images resize bilinearly, index maps with nearest neighbour (as detectron2 does).

Speed (this runs once per training sample on the loader's CPU cores): images stay PIL images until the crop
is done, then become planar uint8 [3, H, W] so that every colour step is a contiguous 8/16-bit pass; the
flip rides on that copy (the jitter is per pixel, so flipping before it changes nothing), and brightness /
contrast steps are fused 256-entry tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PRESETS = ("ade20k", "cityscapes", "coco_lsj", "none")
CROP_RETRIES = 10
HSV_BLOCK_PIXELS = 1 << 16  # pixels per block of the hue/saturation pass: its int16 temporaries stay in cache
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32, (0.5, 1.5), (0.5, 1.5), 18


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


# ---------------------------------------------------------------------------------------------- geometry
def index_picture(index_map: np.ndarray) -> Image.Image:
    """A segment-index map as a PIL image: 8-bit maps as "L", 16-bit ones as 32-bit "I"."""
    return Image.fromarray(index_map.astype(np.int32) if index_map.dtype == np.uint16 else index_map)


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


def resize_and_crop(image: Image.Image, index_map: np.ndarray, classes_of_value, params: AugmentParams,
                    rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Random rescale and crop of an RGB PIL image and its index map (numpy); returns both as PIL images.
    `classes_of_value` maps index-map values to classes (-1 void) for the category-area rule, which is
    checked on the source region of each candidate crop."""
    height, width = index_map.shape
    if image.size != (width, height):
        raise ValueError(f"image size {image.size[::-1]} differs from index_map shape {index_map.shape}")
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
    size = (crop[1], crop[0])
    return (image.resize(size, Image.Resampling.BILINEAR, box=box),
            index_picture(index_map).resize(size, Image.Resampling.NEAREST, box=box))


# ---------------------------------------------------------------------------------------------- colour
def planes_of(picture: Image.Image, flip: bool = False) -> np.ndarray:
    """RGB PIL image -> contiguous, writable uint8 [3, H, W], mirrored left-right if `flip`: PIL's raw encoder
    writes one band at a time straight from its own buffer (the cheapest de-interleave at hand), and the
    mirroring rides on the copy out of it."""
    width, height = picture.size
    planes = np.empty((3, height, width), np.uint8)
    for channel, band in enumerate("RGB"):
        plane = np.frombuffer(picture.tobytes("raw", band), np.uint8).reshape(height, width)
        planes[channel] = plane[:, ::-1] if flip else plane
    return planes


def affine_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """The 256-entry uint8 table of the SSD transform's convert(): clip(v * alpha + beta, 0, 255) in float32,
    truncated to uint8 (a table lookup gives the same result as float arithmetic on the whole image)."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def apply_table(planes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 table lookup on any uint8 array, done by PIL's point() on a 2-D view (numpy's own fancy
    indexing by uint8 is several times slower)."""
    flat = np.ascontiguousarray(planes).reshape(-1, planes.shape[-1])
    return np.array(Image.fromarray(flat).point(table.tolist())).reshape(planes.shape)


def hue_saturation(planes: np.ndarray, saturation: float | None, hue_shift: int) -> np.ndarray:
    """HSV saturation scaling (S *= saturation, capped at 1) and hue rotation by hue_shift OpenCV units of 2
    degrees on planar uint8 RGB [3, H, W]: the SSD transform's saturation and hue steps (official code:
    cv2 HSV round trips), computed in the hexcone geometry with 16-bit integers instead of an 8-bit HSV
    round trip, so within one level of the exact real-valued transform (8-bit HSV storage, cv2's or PIL's,
    is off by up to several levels) and about 5x cheaper than PIL's conversions.

    A pixel is V = max, C = max - min and hue h in [0, 6) sectors; channel k is V - C * ramp(h + n_k) with
    n = (5, 3, 1) and ramp(x) = clip(2 - circular_distance(x, 2), 0, 1). Saturation scales C (at most V) and
    keeps h; hue adds to h. The position p = h * C keeps all of it integer."""
    if planes.ndim != 3 or planes.shape[0] != 3 or planes.dtype != np.uint8:
        raise ValueError(f"planes must be uint8 [3, H, W], got {planes.dtype} {list(planes.shape)}")
    out = np.empty(planes.shape, np.uint8)
    rows = max(1, HSV_BLOCK_PIXELS // planes.shape[2])
    scratch = _HsvScratch(rows * planes.shape[2])
    for top in range(0, planes.shape[1], rows):
        block, result = (array[:, top : top + rows].reshape(3, -1) for array in (planes, out))
        if hue_shift or saturation is None:
            _hue_saturation_block(block, saturation, hue_shift, scratch.sized(block.shape[1]), result)
        else:
            _saturation_block(block, saturation, scratch.sized(block.shape[1]), result)
    return out


class _HsvScratch:
    """Work buffers of one block, reused by every block: numpy's own temporaries of this size each cost an
    allocation that takes longer than the arithmetic on them."""

    def __init__(self, size: int):
        self.ints = np.empty((9, size), np.int16)
        self.floats = np.empty((3, size), np.float32)
        self.mask = np.empty(size, bool)
        self.ints[7], self.ints[8] = 0, 1

    def sized(self, size: int):
        return self.ints[:, :size], self.floats[:, :size], self.mask[:size]


def _select(target: np.ndarray, other: np.ndarray, mask: np.ndarray) -> None:
    """target = where(mask, other, target), in place on `other`: arithmetic beats np.copyto(where=) and
    np.where on the irregular masks of real images."""
    np.subtract(other, target, out=other)
    np.multiply(other, mask, out=other)
    np.add(target, other, out=target)


def _value_chroma_factor(saturation: float, value, chroma, temp, one, factor, cap) -> None:
    """factor = min(saturation, V / C): the scale of C (and of V - c) that multiplies S by `saturation`
    capped at 1. temp ends as max(C, 1)."""
    np.divide(value, np.maximum(chroma, one, out=temp), out=factor, dtype=np.float32)
    cap.fill(saturation)
    np.minimum(factor, cap, out=factor)


def _saturation_block(planes: np.ndarray, saturation: float, scratch, out) -> None:
    """Saturation alone needs no hue: every channel keeps V and moves its gap to V by the factor,
    c' = V - (V - c) * factor, about half the work of the general path."""
    ints, (factor, product, cap), _ = scratch
    red, green, blue, value, chroma, _, temp, _, one = ints
    gaps = ints[:3]
    np.copyto(gaps, planes)
    np.maximum(np.maximum(red, green, out=value), blue, out=value)
    np.subtract(value, np.minimum(np.minimum(red, green, out=chroma), blue, out=chroma), out=chroma)
    _value_chroma_factor(saturation, value, chroma, temp, one, factor, cap)
    np.subtract(value, gaps, out=gaps)
    for gap in gaps:
        np.copyto(gap, np.rint(np.multiply(gap, factor, out=product), out=product), casting="unsafe")
    np.copyto(out, np.subtract(value, gaps, out=gaps), casting="unsafe")


def _hue_saturation_block(planes: np.ndarray, saturation: float | None, hue_shift: int, scratch, out) -> None:
    """hue_saturation of uint8 [3, n] into `out`. Every step writes into the scratch buffers (out=), with
    array operands where numpy's scalar-operand loops are slow (maximum, minimum)."""
    ints, floats, mask = scratch
    red, green, blue, value, chroma, position, temp, zero, one = ints
    np.copyto(ints[:3], planes)
    np.maximum(np.maximum(red, green, out=value), blue, out=value)
    np.subtract(value, np.minimum(np.minimum(red, green, out=chroma), blue, out=chroma), out=chroma)
    np.subtract(red, green, out=position)  # blue is the maximum: p = 4C + r - g
    position += np.multiply(chroma, 4, out=temp)
    np.subtract(blue, red, out=temp)  # green is the maximum: p = 2C + b - r
    temp += chroma
    temp += chroma
    _select(position, temp, np.equal(value, green, out=mask))
    _select(position, np.subtract(green, blue, out=temp), np.equal(value, red, out=mask))  # in [-C, C]
    if saturation is not None:  # C scales by min(saturation, V / C): S * saturation capped at 1; p keeps p / C
        factor, scaled, cap = floats
        _value_chroma_factor(saturation, value, chroma, temp, one, factor, cap)
        np.rint(np.multiply(chroma, factor, out=scaled), out=scaled)
        np.divide(scaled, temp, out=factor, dtype=np.float32)
        np.copyto(position, np.rint(np.multiply(position, factor, out=factor), out=factor), casting="unsafe")
        np.copyto(chroma, scaled, casting="unsafe")
    if hue_shift:  # hue_shift / 30 sectors, rounded to whole position units
        np.multiply(chroma, 2 * abs(hue_shift), out=temp)
        np.floor_divide(np.add(temp, 30, out=temp), 60, out=temp)
        (np.add if hue_shift > 0 else np.subtract)(position, temp, out=position)
    np.multiply(chroma, 6, out=temp)
    position += np.multiply(temp, np.less(position, zero, out=mask), out=temp)  # now in [0, 6C)
    # Circular distance of h + n_k from 2 (in position units), unrolled per channel with the wrap folded in:
    # red |p - 3C|; green min(p + C, |p - 5C|); blue min(|p - C|, 7C - p). Channel = min + clip(d - C, 0, C).
    np.abs(np.subtract(position, np.multiply(chroma, 3, out=temp), out=red), out=red)
    np.abs(np.subtract(position, np.multiply(chroma, 5, out=temp), out=temp), out=temp)
    np.minimum(np.add(position, chroma, out=green), temp, out=green)
    np.abs(np.subtract(position, chroma, out=blue), out=blue)
    np.minimum(blue, np.subtract(np.multiply(chroma, 7, out=temp), position, out=temp), out=blue)
    low, distances = np.subtract(value, chroma, out=value), ints[:3]  # red, green, blue rows together
    distances -= chroma
    np.minimum(np.maximum(distances, zero, out=distances), chroma, out=distances)
    np.copyto(out, np.add(distances, low, out=distances), casting="unsafe")


@dataclass(frozen=True)
class JitterPlan:
    """The random draws of one SSD colour jitter (None / 0: step not applied)."""

    brightness: float | None
    contrast: float | None
    contrast_first: bool
    saturation: float | None
    hue_shift: int | None


def draw_jitter(rng: np.random.Generator) -> JitterPlan:
    """detectron2's ColorAugSSDTransform draws: brightness +-32, contrast and saturation x[0.5, 1.5], hue
    +-18 (of OpenCV's 180), each with probability 1/2, contrast first or last at random."""
    brightness = rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = rng.uniform(*CONTRAST_RANGE) if contrast_first and rng.integers(2) else None
    apply_saturation, apply_hue = bool(rng.integers(2)), bool(rng.integers(2))
    saturation = rng.uniform(*SATURATION_RANGE) if apply_saturation else None
    hue_shift = int(rng.integers(-HUE_DELTA, HUE_DELTA + 1)) if apply_hue else None
    if not contrast_first and rng.integers(2):
        contrast = rng.uniform(*CONTRAST_RANGE)
    return JitterPlan(brightness, contrast, contrast_first, saturation, hue_shift)


def _compose(first: np.ndarray | None, then: np.ndarray) -> np.ndarray:
    return then if first is None else then[first]


def apply_jitter(picture: Image.Image, plan: JitterPlan, flip: bool = False) -> np.ndarray:
    """The jitter of `plan` on an RGB PIL image -> planar uint8 [3, H, W] (mirrored if `flip`: every step is
    per pixel, so mirroring first changes nothing): brightness, contrast (if first), saturation and hue,
    contrast (if last), each step ending in uint8 as in the official transform. Table steps not separated by
    the hue/saturation step are fused into one lookup, done by PIL before the split."""
    table = affine_table(beta=plan.brightness) if plan.brightness is not None else None
    if plan.contrast_first and plan.contrast is not None:
        table = _compose(table, affine_table(alpha=plan.contrast))
    hsv_step = plan.saturation is not None or plan.hue_shift is not None
    if not plan.contrast_first and plan.contrast is not None and not hsv_step:
        table = _compose(table, affine_table(alpha=plan.contrast))
    if table is not None:
        picture = picture.point(table.tolist() * 3)
    planes = planes_of(picture, flip)
    if hsv_step:
        planes = hue_saturation(planes, plan.saturation, plan.hue_shift or 0)
        if not plan.contrast_first and plan.contrast is not None:
            planes = apply_table(planes, affine_table(alpha=plan.contrast))
    return planes


# ---------------------------------------------------------------------------------------------- together
def augment(image: Image.Image | np.ndarray, index_map: np.ndarray, classes_of_value, params: AugmentParams,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training augmentation of an RGB image (PIL, or uint8 [H, W, 3]) and its index map; returns planar
    uint8 [3, h, w] and the index map [h, w], both cropped and contiguous."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if params.preset == "none":
        return planes_of(picture), np.ascontiguousarray(index_map)
    picture, index = resize_and_crop(picture, index_map, classes_of_value, params, rng)
    plan = draw_jitter(rng) if params.color_jitter else None
    flip = bool(params.horizontal_flip and rng.integers(2))
    planes = planes_of(picture, flip) if plan is None else apply_jitter(picture, plan, flip)
    index = np.asarray(index)
    return planes, (index[:, ::-1] if flip else index).astype(index_map.dtype)
