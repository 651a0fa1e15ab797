"""The standard prediction file formats, written the same way by evaluation (pipeline/evaluation) and by
prediction (model/predict.py): the COCO panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = void), COCO
compressed RLE for instance masks, and single-channel class-label PNGs.

Pure functions of numpy arrays: they live in model/ so that prediction, which must not import the pipeline,
writes exactly what evaluation writes and reads back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

MAX_SEGMENT_ID = 256**3 - 1


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] (0..2^24-1) -> uint8 RGB [H, W, 3] in the COCO panoptic encoding."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D [H, W], got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"ids must lie in [0, {MAX_SEGMENT_ID}], got range [{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def write_panoptic_png(path: str | os.PathLike, ids: np.ndarray) -> None:
    """Segment ids [H, W] as a COCO panoptic PNG (parent folders created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids_to_rgb(ids)).save(path)


def mask_to_rle(mask: np.ndarray) -> dict:
    """bool [H, W] -> COCO compressed RLE with str counts (JSON-serialisable)."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Class labels [H, W] as a single-channel PNG: 8-bit when every label fits, else 16-bit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    Image.fromarray(np.ascontiguousarray(labels.astype(dtype))).save(path)
