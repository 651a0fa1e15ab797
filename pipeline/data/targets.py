"""The compact per-image target and the three tasks' targets derived from it.

An image's panoptic annotation is stored as a *segment-index map* (0 = void, k = row k-1 of the image's
segment table) plus per-segment arrays: contiguous class, isthing, iscrowd. Any crop of the map yields every
task's targets by slicing and table lookups; nothing is re-derived from RGB ids after preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.readers import ClassInfo

TASKS = ("semantic", "instance", "panoptic")
TASK_PADDING_TEXT = {"semantic": "a semantic photo", "instance": "an instance photo", "panoptic": "a panoptic photo"}


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


def task_targets(index_map: np.ndarray | torch.Tensor, table: SegmentTable, task: str):
    """Targets of one task on a (cropped) segment-index map: (labels int64 [T], masks bool [T, H, W]).

    semantic: one mask per class present (things and stuff of a class merged), in class order;
    instance: thing segments only; panoptic: every segment; crowd segments are dropped for every task and
    segments with no pixel left are skipped."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    index_map = torch.as_tensor(np.asarray(index_map).astype(np.int64)) if isinstance(index_map, np.ndarray) \
        else index_map.long()
    num_segments = len(table)
    keep = ~torch.from_numpy(table.iscrowd)
    if task == "instance":
        keep &= torch.from_numpy(table.isthing)
    counts = torch.bincount(index_map.reshape(-1), minlength=num_segments + 1)[1:]
    keep &= counts > 0
    classes = torch.from_numpy(table.classes)
    if task == "semantic":
        # Lookup table: map value -> class (void and dropped segments -> -1), then one mask per class.
        class_of_value = torch.full((num_segments + 1,), -1, dtype=torch.int64)
        class_of_value[1:][keep] = classes[keep]
        class_map = class_of_value[index_map]
        labels = torch.unique(classes[keep])
        masks = class_map.unsqueeze(0) == labels.view(-1, 1, 1)
        return labels, masks
    values = torch.nonzero(keep).view(-1) + 1
    masks = index_map.unsqueeze(0) == values.view(-1, 1, 1)
    return classes[values - 1], masks


def text_list(labels: torch.Tensor | np.ndarray, task: str, class_names: tuple[str, ...], num_slots: int):
    """SPEC's text list: num_slots entries of the task's padding text; then, walking classes in dataset
    order, each GT mask overwrites the next slot with "a photo with a {class}" until the slots run out."""
    texts = [TASK_PADDING_TEXT[task]] * num_slots
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    slot = 0
    for class_id in np.nonzero(counts)[0]:
        for _ in range(int(counts[class_id])):
            if slot >= num_slots:
                return texts
            texts[slot] = f"a photo with a {class_names[class_id]}"
            slot += 1
    return texts


class TextTokenTable:
    """Token rows of every distinct text a list can hold (K class texts + 3 padding texts), tokenized once,
    so building an image's [num_slots, 77] token block is a gather rather than BPE on every string."""

    def __init__(self, class_names: tuple[str, ...], num_slots: int):
        from model.tokenizer import tokenize

        self.class_names = tuple(class_names)
        self.num_slots = num_slots
        self.class_tokens = tokenize([f"a photo with a {name}" for name in self.class_names])
        self.padding_tokens = {task: tokenize([TASK_PADDING_TEXT[task]])[0] for task in TASKS}

    def tokens(self, labels: torch.Tensor, task: str) -> torch.Tensor:
        """int64 [num_slots, 77]: equal to tokenize(text_list(labels, task, ...))."""
        block = self.padding_tokens[task].expand(self.num_slots, -1).clone()
        ordered = torch.sort(torch.as_tensor(labels, dtype=torch.int64)).values[: self.num_slots]
        block[: len(ordered)] = self.class_tokens[ordered]
        return block
