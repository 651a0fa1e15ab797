"""Overlay pictures of predictions with a legend of class names (model/predict.py draws one per image and
task).

Colours: one per class for semantic labels and stuff segments (the same class has the same colour in every
picture), a distinct one per instance for thing segments and instance masks. Pixels no segment covers keep
the image; segment boundaries are drawn in white. The legend lists each colour with its class name (and, for
instances, the score), largest regions first.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GOLDEN_RATIO_CONJUGATE = 0.618033988749895
ALPHA = 0.55
MIN_PICTURE_SIDE = 320
"""Small images are enlarged (nearest neighbour) until their short side reaches this, so that the legend text
stays readable beside them."""
LEGEND_ROWS = 24
FONT_SIZE = 14
ROW_HEIGHT = FONT_SIZE + 6


@dataclass(frozen=True)
class LegendEntry:
    value: int
    """The value of the segment map this entry colours (0 is never coloured)."""
    color: tuple[int, int, int]
    label: str


def class_color(class_id: int) -> tuple[int, int, int]:
    """A pastel colour per class (semantic labels, stuff): hues spread by the golden ratio, so neighbouring
    ids differ clearly; pale, so that the saturated instance colours stand out against them."""
    return _hsv_color(class_id * GOLDEN_RATIO_CONJUGATE, saturation=0.45, value=0.95)


def instance_color(index: int) -> tuple[int, int, int]:
    """A saturated colour per instance, from its own hue sequence with alternating brightness, so touching
    instances of one class stay apart."""
    return _hsv_color(0.13 + index * GOLDEN_RATIO_CONJUGATE, saturation=1.0, value=1.0 if index % 2 else 0.75)


def _hsv_color(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return round(255 * red), round(255 * green), round(255 * blue)


def overlay_picture(
    image: np.ndarray, segments: np.ndarray, legend: Sequence[LegendEntry], title: str
) -> Image.Image:
    """uint8 RGB image [H, W, 3] with each legend entry's pixels (segments == value) blended in its colour,
    white boundaries between values, and a legend panel on the right."""
    if image.shape[:2] != segments.shape:
        raise ValueError(f"image {image.shape[:2]} and segment map {segments.shape} differ in size")
    blended = image.astype(np.float32)
    for entry in legend:
        painted = segments == entry.value
        blended[painted] = (1 - ALPHA) * blended[painted] + ALPHA * np.asarray(entry.color, np.float32)
    blended[_boundaries(segments)] = 255
    picture = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    scale = max(1, -(-MIN_PICTURE_SIDE // min(picture.size)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return _with_legend(picture, legend, title)


def _boundaries(segments: np.ndarray) -> np.ndarray:
    edge = np.zeros(segments.shape, dtype=bool)
    edge[1:] |= segments[1:] != segments[:-1]
    edge[:, 1:] |= segments[:, 1:] != segments[:, :-1]
    return edge


def _with_legend(picture: Image.Image, legend: Sequence[LegendEntry], title: str) -> Image.Image:
    font = ImageFont.load_default(size=FONT_SIZE)
    shown = list(legend[:LEGEND_ROWS])
    lines = [entry.label for entry in shown]
    if len(legend) > LEGEND_ROWS:
        lines.append(f"... and {len(legend) - LEGEND_ROWS} more")
    text_width = max([font.getlength(text) for text in [title, *lines]], default=0)
    panel_width = int(text_width) + ROW_HEIGHT + 20
    height = max(picture.height, ROW_HEIGHT * (len(lines) + 2))
    canvas = Image.new("RGB", (picture.width + panel_width, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    left = picture.width + 8
    draw.text((left, 4), title, fill=(0, 0, 0), font=font)
    for row, text in enumerate(lines, start=1):
        top = 4 + row * ROW_HEIGHT
        if row <= len(shown):
            draw.rectangle(
                (left, top, left + FONT_SIZE, top + FONT_SIZE), fill=shown[row - 1].color, outline=(0, 0, 0)
            )
        draw.text((left + FONT_SIZE + 6, top), text, fill=(0, 0, 0), font=font)
    return canvas


def by_area(segments: np.ndarray, legend: Sequence[LegendEntry]) -> list[LegendEntry]:
    """The legend entries that cover any pixel, largest first."""
    areas = np.bincount(segments.ravel(), minlength=max((e.value for e in legend), default=0) + 1)
    present = [entry for entry in legend if areas[entry.value] > 0]
    return sorted(present, key=lambda entry: -areas[entry.value])
