"""The compact per-image target and the three tasks' targets derived from it.

An image's panoptic annotation is stored as a *segment-index map* (0 = void, k = row k-1 of the image's
segment table) plus per-segment arrays: contiguous class, isthing, iscrowd. Any crop of the map yields every
task's targets by slicing and table lookups; nothing is re-derived from RGB ids after preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model.texts import TASKS
from pipeline.data.readers import ClassInfo


class BadSampleError(ValueError):
    """A raw sample that cannot become a correct target (the message says why)."""


@dataclass
class SegmentTable:
    """Per-segment arrays of one image, aligned with the segment-index map (row k <-> map value k+1)."""

    segment_ids: np.ndarray  # int64 [S], the ids of the raw panoptic PNG
    classes: np.ndarray  # int64 [S], contiguous class ids
    isthing: np.ndarray  # bool [S]
    iscrowd: np.ndarray  # bool [S]

    def __len__(self) -> int:
        return len(self.classes)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG decoding: id = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def encode_panoptic(ids: np.ndarray, segments: tuple[dict, ...] | list[dict], classes: ClassInfo):
    """Raw id map + JSON segments -> (segment-index map uint8/uint16 [H, W], SegmentTable).

    Raises BadSampleError for an id in the PNG missing from the JSON, an unknown category, more segments
    than uint16 can index, or an image with no labelled pixel. JSON segments absent from the PNG are kept
    out of the table (they have no pixels to supervise)."""
    category_lookup = {cid: index for index, cid in enumerate(classes.category_ids)}
    present_ids, inverse = np.unique(ids.ravel(), return_inverse=True)
    by_id = {segment["id"]: segment for segment in segments}
    missing = [int(i) for i in present_ids if i != 0 and int(i) not in by_id]
    if missing:
        raise BadSampleError(f"segment ids {missing[:5]} are in the PNG but not in the JSON segments_info")
    kept = [int(i) for i in present_ids if i != 0]
    if not kept:
        raise BadSampleError("no labelled pixel (the panoptic PNG is all void)")
    if len(kept) >= 2**16:
        raise BadSampleError(f"{len(kept)} segments exceed the uint16 segment-index map")
    unknown = sorted({by_id[i]["category_id"] for i in kept} - set(category_lookup))
    if unknown:
        raise BadSampleError(f"unknown category ids {unknown} (not in the JSON categories)")
    # present_ids is sorted, so void (0) if present is first: map position -> index (void -> 0).
    positions = np.arange(len(present_ids)) + (0 if present_ids[0] == 0 else 1)
    dtype = np.uint8 if len(kept) < 256 else np.uint16
    index_map = positions[inverse].reshape(ids.shape).astype(dtype)
    contiguous = np.array([category_lookup[by_id[i]["category_id"]] for i in kept], np.int64)
    table = SegmentTable(
        segment_ids=np.array(kept, np.int64),
        classes=contiguous,
        isthing=np.array([classes.isthing[c] for c in contiguous], bool),
        iscrowd=np.array([bool(by_id[i]["iscrowd"]) for i in kept], bool),
    )
    return index_map, table


# ------------------------------------------------------------------------------------------ tasks per dataset
def data_tasks(classes: ClassInfo) -> tuple[str, ...]:
    """The tasks the data gives targets for. Semantic and panoptic always: on data with no stuff class
    (instance annotations) panoptic is the things with the rest void and semantic covers the thing classes;
    on data with no thing class (semantic label PNGs) panoptic is one segment per stuff class present.
    Instance only with a thing class: without one its targets would always be empty."""
    return tuple(task for task in TASKS if task != "instance" or any(classes.isthing))


def task_thresholds_for_data(thresholds: tuple[float, float], classes: ClassInfo) -> tuple[float, float]:
    """The stream's cumulative task thresholds (semantic, instance) with a task the data does not support
    given no share: the others keep their proportions."""
    if "instance" in data_tasks(classes):
        return thresholds
    semantic, panoptic = thresholds[0], 1.0 - thresholds[1]
    if semantic + panoptic <= 0:
        raise ValueError(f"stream.task_thresholds {tuple(thresholds)} give every image the instance task, "
                         "but the data has no thing class")
    share = semantic / (semantic + panoptic)
    return (share, share)


def describe_tasks(thresholds: tuple[float, float], classes: ClassInfo) -> str:
    """One line for the log: each task's share and what it means on this data."""
    low, high = task_thresholds_for_data(thresholds, classes)
    shares = {"semantic": low, "instance": high - low, "panoptic": 1.0 - high}
    listed = ", ".join(f"{task} {shares[task]:.2f}" for task in data_tasks(classes))
    if not any(classes.isthing):
        meaning = "no thing class: no instance task; panoptic = the stuff segments"
    elif all(classes.isthing):
        meaning = "no stuff class: panoptic = things + void, semantic over the thing classes"
    else:
        meaning = "things and stuff"
    return f"{listed} ({classes.num_classes} classes, {meaning})"


@dataclass
class TargetPlan:
    """Which masks one task's targets hold, so that rendering them is at most one table lookup and T
    comparisons: mask t is `lookup(index_map) == match[t]`, the lookup being `value_to_rank` (semantic: map
    value -> 1 + rank of its class among the labels, 0 for none) or, without one, the map itself."""

    labels: torch.Tensor  # int64 [T]
    match: np.ndarray  # [T]
    value_to_rank: np.ndarray | None = None  # uint8 / uint16 [S + 1]


def _value_counts(index_map: np.ndarray, num_values: int) -> np.ndarray:
    """Pixel count per map value. Segment maps are long runs of one value, so a single histogram is a chain
    of increments of one counter; for 8-bit maps PIL counts the bytes as four interleaved RGBA bands (four
    independent chains, summed after), which is faster than numpy's or torch's bincount."""
    flat = np.ascontiguousarray(index_map).reshape(-1)
    if index_map.dtype != np.uint8:
        return np.bincount(flat, minlength=num_values)[:num_values]
    whole = flat.size - flat.size % 4
    counts = np.bincount(flat[whole:], minlength=256)
    if whole:
        quads = Image.frombuffer("RGBA", (whole // 4, 1), flat[:whole], "raw", "RGBA", 0, 1)
        counts += np.asarray(quads.histogram()).reshape(4, 256).sum(0)
    return counts[:num_values]


def plan_targets(index_map: np.ndarray, table: SegmentTable, task: str) -> TargetPlan:
    """semantic: one mask per class present (things and stuff of a class merged), in class order;
    instance: thing segments only; panoptic: every segment; crowd segments are dropped for every task and
    segments with no pixel left are skipped."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if index_map.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"index_map must be uint8 or uint16, got {index_map.dtype}")
    num_segments = len(table)
    keep = ~table.iscrowd & (_value_counts(index_map, num_segments + 1)[1:] > 0)
    if task == "instance":
        keep &= table.isthing
    if task != "semantic":  # one mask per kept segment, matched by its own map value
        return TargetPlan(torch.from_numpy(table.classes[keep]), np.nonzero(keep)[0] + 1)
    labels, rank = np.unique(table.classes[keep], return_inverse=True)
    value_to_rank = np.zeros(num_segments + 1, np.uint8 if num_segments < 256 else np.uint16)
    value_to_rank[1:][keep] = rank.reshape(-1) + 1
    return TargetPlan(torch.from_numpy(labels.astype(np.int64)), np.arange(1, len(labels) + 1), value_to_rank)


def render_masks(index_map: np.ndarray, plan: TargetPlan, padded_shape: tuple[int, int] | None = None):
    """bool [T, H, W] masks of a plan; with padded_shape, at that size with the padding in no mask."""
    height, width = padded_shape or index_map.shape
    if height < index_map.shape[0] or width < index_map.shape[1]:
        raise ValueError(f"padded_shape {padded_shape} is smaller than the index map {index_map.shape}")
    lookup = plan.value_to_rank
    if lookup is None:
        row_map = index_map
    elif lookup.dtype == np.uint8 and index_map.dtype == np.uint8:  # PIL's point() is the fast uint8 table
        table = lookup.tolist() + [0] * (256 - len(lookup))
        row_map = np.asarray(Image.fromarray(np.ascontiguousarray(index_map)).point(table))
    else:
        row_map = lookup[index_map]
    if row_map.shape != (height, width):
        padded = np.zeros((height, width), row_map.dtype)
        padded[: row_map.shape[0], : row_map.shape[1]] = row_map
        row_map = padded
    return torch.from_numpy(row_map[None] == plan.match.astype(row_map.dtype)[:, None, None])


def task_targets(index_map: np.ndarray | torch.Tensor, table: SegmentTable, task: str,
                 padded_shape: tuple[int, int] | None = None):
    """Targets of one task on a (cropped) segment-index map: (labels int64 [T], masks bool [T, H, W]); see
    plan_targets for which masks, render_masks for padded_shape."""
    index_map = np.asarray(index_map)
    if index_map.dtype not in (np.uint8, np.uint16):
        if index_map.size and (index_map.min() < 0 or index_map.max() > len(table)):
            raise ValueError(f"index_map values must lie in [0, {len(table)}], got {index_map.min()}..{index_map.max()}")
        index_map = index_map.astype(np.uint8 if len(table) < 256 else np.uint16)
    plan = plan_targets(index_map, table, task)
    return plan.labels, render_masks(index_map, plan, padded_shape)
