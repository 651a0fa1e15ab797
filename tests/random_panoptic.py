"""Random COCO-panoptic ground truth and imperfect predictions, for checking the evaluators against the
reference implementations (panopticapi, pycocotools) in tests and benchmarks/bench_pq.py.

Ground truth: stuff bands, thing rectangles and ellipses painted over them (occluding each other), crowd
thing regions and void blocks. Predictions: every ground-truth segment shifted by a few pixels, sometimes
relabelled or dropped, crowd regions split into several instances, spurious blobs (partly on void), and
unpainted (void) gaps. One thing category never occurs in the ground truth and one is never predicted, so
classes absent from one side are exercised. Segment ids are random 24-bit values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.evaluation.panoptic_format import MAX_SEGMENT_ID, write_panoptic_png

CATEGORIES = (
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 7, "name": "dog", "isthing": 1, "color": [120, 80, 20]},
    {"id": 8, "name": "ghost", "isthing": 1, "color": [250, 250, 0]},  # predicted only
    {"id": 12, "name": "kite", "isthing": 1, "color": [0, 200, 200]},  # never predicted
    {"id": 90, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 95, "name": "grass", "isthing": 0, "color": [60, 160, 60]},
    {"id": 101, "name": "road", "isthing": 0, "color": [128, 64, 128]},
)
_GT_THINGS = (1, 3, 7, 12)
_PRED_THINGS = (1, 3, 7, 8)
_STUFF = (90, 95, 101)


def _shape_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    ry, rx = rng.integers(height // 16 + 2, height // 4 + 3), rng.integers(width // 16 + 2, width // 4 + 3)
    ys, xs = np.ogrid[:height, :width]
    if rng.random() < 0.5:
        return (np.abs(ys - cy) <= ry) & (np.abs(xs - cx) <= rx)
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1


def _unique_ids(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.choice(np.arange(1, MAX_SEGMENT_ID + 1, 4099), size=count, replace=False)


def _segments_from_layout(layout: np.ndarray, labels: list[tuple[int, int]], rng) -> tuple[np.ndarray, list]:
    """layout: painter index per pixel (-1 = void); labels[i] = (category_id, iscrowd). Gives random ids."""
    present, areas = np.unique(layout[layout >= 0], return_counts=True)
    ids = _unique_ids(rng, present.size)
    id_map = np.zeros(layout.shape, dtype=np.int64)
    segments = []
    for index, area, segment_id in zip(present, areas, ids):
        id_map[layout == index] = segment_id
        category_id, iscrowd = labels[index]
        segments.append(
            {"id": int(segment_id), "category_id": category_id, "iscrowd": iscrowd, "area": int(area)}
        )
    return id_map, segments


def random_ground_truth(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, list, np.ndarray, list]:
    """(ids [H, W], segments_info, painter layout [H, W] with -1 on void, (category_id, iscrowd) per painter)."""
    layout = np.full((height, width), -1, dtype=np.int64)
    labels: list[tuple[int, int]] = []
    bounds = np.sort(rng.choice(np.arange(1, height), size=2, replace=False))
    for top, bottom in zip((0, *bounds), (*bounds, height)):
        layout[top:bottom] = len(labels)
        labels.append((int(rng.choice(_STUFF)), 0))
    for _ in range(rng.integers(3, 9)):
        layout[_shape_mask(rng, height, width)] = len(labels)
        labels.append((int(rng.choice(_GT_THINGS)), int(rng.random() < 0.15)))
    for _ in range(rng.integers(0, 3)):
        top, left = rng.integers(0, height), rng.integers(0, width)
        layout[top : top + height // 8, left : left + width // 8] = -1
    ids, segments = _segments_from_layout(layout, labels, rng)
    return ids, segments, layout, labels


def random_prediction(
    rng: np.random.Generator, gt_layout: np.ndarray, gt_labels: list
) -> tuple[np.ndarray, list]:
    height, width = gt_layout.shape
    layout = np.full((height, width), -1, dtype=np.int64)
    labels: list[tuple[int, int]] = []
    for index in rng.permutation(len(gt_labels)):
        category_id, iscrowd = gt_labels[index]
        if rng.random() < 0.1:
            continue
        mask = np.roll(
            gt_layout == index,
            tuple(rng.integers(-(height // 24) - 1, height // 24 + 2, size=2)),
            axis=(0, 1),
        )
        if category_id not in _PRED_THINGS + _STUFF or rng.random() < 0.1:
            category_id = int(rng.choice(_PRED_THINGS + _STUFF))
        pieces = 3 if iscrowd else 1  # a crowd region is predicted as several instances
        for piece in range(pieces):
            columns = slice(piece * width // pieces, (piece + 1) * width // pieces)
            piece_mask = np.zeros_like(mask)
            piece_mask[:, columns] = mask[:, columns]
            layout[piece_mask] = len(labels)
            labels.append((category_id, 0))
    for _ in range(rng.integers(0, 4)):
        layout[_shape_mask(rng, height, width)] = len(labels)
        labels.append((int(rng.choice(_PRED_THINGS)), 0))
    top, left = rng.integers(0, height), rng.integers(0, width)
    layout[top : top + height // 10, left : left + width // 10] = -1
    ids, segments = _segments_from_layout(layout, labels, rng)
    for segment in segments:
        del segment["iscrowd"], segment["area"]
    return ids, segments


def write_random_panoptic_dataset(
    out_dir: str | Path, num_images: int, seed: int = 0, height: int = 64, width: int = 80
) -> dict:
    """Write gt.json + gt/ and pred.json + pred/ (COCO panoptic) under out_dir; returns their paths."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    gt_document = {"images": [], "annotations": [], "categories": [dict(c) for c in CATEGORIES]}
    pred_document = {"annotations": []}
    for image_id in range(1, num_images + 1):
        gt_ids, gt_segments, layout, labels = random_ground_truth(rng, height, width)
        pred_ids, pred_segments = random_prediction(rng, layout, labels)
        file_name = f"{image_id:012d}.png"
        write_panoptic_png(out / "gt" / file_name, gt_ids)
        write_panoptic_png(out / "pred" / file_name, pred_ids)
        gt_document["images"].append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width}
        )
        gt_document["annotations"].append(
            {"image_id": image_id, "file_name": file_name, "segments_info": gt_segments}
        )
        pred_document["annotations"].append(
            {"image_id": image_id, "file_name": file_name, "segments_info": pred_segments}
        )
    (out / "gt.json").write_text(json.dumps(gt_document))
    (out / "pred.json").write_text(json.dumps(pred_document))
    return {
        "gt_json": out / "gt.json",
        "gt_folder": out / "gt",
        "pred_json": out / "pred.json",
        "pred_folder": out / "pred",
    }
