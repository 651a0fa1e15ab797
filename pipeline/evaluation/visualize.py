"""Pictures for evaluation reports: image / ground truth / prediction overlays and per-class bar charts.

Masks are coloured per segment (panoptic, instance) or per class (semantic) and blended over the image;
void / ignored pixels stay uncoloured. Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def color_labels(
    labels: np.ndarray, ignore: Sequence[int] = (0,), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct colours for the labels of a map: (uint8 RGB [H, W, 3], bool [H, W] coloured pixels).
    A label's colour depends only on its value and the seed, so the same class looks the same everywhere."""
    labels = np.asarray(labels)
    values, inverse = np.unique(labels, return_inverse=True)
    palette = np.array(
        [np.random.default_rng([seed, int(v) % 2**32]).integers(40, 256, size=3) for v in values],
        dtype=np.uint8,
    )
    colored = palette[inverse.reshape(labels.shape)]
    return colored, ~np.isin(labels, list(ignore))


def overlay(
    image: np.ndarray, labels: np.ndarray, ignore: Sequence[int] = (0,), alpha: float = 0.55
) -> np.ndarray:
    """The image with label colours blended in and label boundaries drawn in white."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape[:2] != np.shape(labels):
        raise ValueError(f"image {image.shape[:2]} and labels {np.shape(labels)} differ in size")
    colored, painted = color_labels(labels, ignore)
    blended = image.copy()
    blended[painted] = (1 - alpha) * image[painted] + alpha * colored[painted]
    blended[_boundaries(np.asarray(labels))] = 255
    return blended.clip(0, 255).astype(np.uint8)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge


def save_comparison(
    out_file: str | os.PathLike,
    examples: Sequence[Mapping],
    ignore: Sequence[int] = (0,),
    title: str | None = None,
) -> Path:
    """One row per example: image | ground truth overlay | prediction overlay.

    Each example maps "image" (uint8 RGB [H, W, 3]), "gt" and "pred" (int label maps [H, W]: segment ids or
    class ids) and optionally "name"."""
    if not examples:
        raise ValueError("examples must hold at least one image")
    figure, axes = plt.subplots(len(examples), 3, figsize=(12, 3.6 * len(examples)), squeeze=False)
    for row, example in zip(axes, examples):
        panels = (
            example["image"],
            overlay(example["image"], example["gt"], ignore),
            overlay(example["image"], example["pred"], ignore),
        )
        for axis, panel, label in zip(row, panels, ("image", "ground truth", "prediction")):
            axis.imshow(np.asarray(panel, dtype=np.uint8))
            axis.set_title(f"{example.get('name', '')} {label}".strip(), fontsize=10)
            axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, out_file)


def save_per_class_bars(
    out_file: str | os.PathLike, names: Sequence[str], values: Sequence[float], metric: str = "PQ"
) -> Path:
    """Horizontal bar per class (values as fractions, shown in %); NaN / negative (undefined) bars are
    left empty and marked n/a."""
    if len(names) != len(values) or not names:
        raise ValueError(
            f"names ({len(names)}) and values ({len(values)}) must be equally long and non-empty"
        )
    values = np.asarray(values, dtype=np.float64)
    defined = np.isfinite(values) & (values >= 0)
    figure, axis = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
    positions = np.arange(len(names))
    axis.barh(positions, np.where(defined, 100 * values, 0), color=np.where(defined, "tab:blue", "lightgray"))
    for position, value, ok in zip(positions, values, defined):
        axis.text(
            100 * value + 1 if ok else 1,
            position,
            f"{100 * value:.1f}" if ok else "n/a",
            va="center",
            fontsize=8,
        )
    axis.set_yticks(positions, labels=list(names), fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 110)
    axis.set_xlabel(f"{metric} (%)")
    axis.set_title(f"{metric} per class")
    figure.tight_layout()
    return _save(figure, out_file)


def _save(figure, out_file) -> Path:
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file, dpi=100)
    plt.close(figure)
    return out_file
