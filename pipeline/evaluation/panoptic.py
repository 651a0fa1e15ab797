"""Panoptic quality (PQ, SQ, RQ), numerically identical to panopticapi's `pq_compute`, vectorised.

Rules (those of panopticapi.evaluation): a ground-truth and a predicted segment of the same category match
when IoU > 0.5, where the predicted pixels on void (id 0) leave the union; crowd ground-truth segments never
match; an unmatched ground-truth segment that is not crowd is a false negative; an unmatched predicted segment
is a false positive unless more than half of it lies on void plus the crowd region of its category (the last
crowd segment of that category in `segments_info`). pq_compute takes the ground-truth area from the JSON
`area`, as panopticapi does; the in-memory evaluator counts it from the pixels unless told otherwise. PQ = sum(IoU of matches) / (TP + FP/2 + FN/2) per class,
averaged over the classes with TP + FP + FN > 0.

Where panopticapi pairs ids with np.unique over every pixel, this code first collapses each image into runs
of equal (ground truth, prediction) id pairs along the raster order (flat regions give a few thousand runs
per image) and works on those, so the per-image cost beyond PNG decoding is a few vectorised passes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.evaluation.panoptic_format import (
    EvaluationInputError,
    default_folder,
    load_json,
    read_panoptic_png,
)

IOU_THRESHOLD = 0.5
VOID_ID = 0


def count_id_pairs(gt_ids: np.ndarray, pred_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts of every (ground-truth id, predicted id) pair.

    Returns (gt_unique sorted [G], pred_unique sorted [P], counts int64 [G, P])."""
    gt_flat, pred_flat = np.ravel(gt_ids), np.ravel(pred_ids)
    changed = gt_flat[1:] != gt_flat[:-1]
    changed |= pred_flat[1:] != pred_flat[:-1]
    run_starts = np.concatenate(([0], np.flatnonzero(changed) + 1))
    run_lengths = np.diff(run_starts, append=gt_flat.size)
    gt_unique, gt_index = np.unique(gt_flat[run_starts], return_inverse=True)
    pred_unique, pred_index = np.unique(pred_flat[run_starts], return_inverse=True)
    pair_code = gt_index.ravel() * pred_unique.size + pred_index.ravel()
    counts = np.bincount(pair_code, weights=run_lengths, minlength=gt_unique.size * pred_unique.size)
    return (
        gt_unique.astype(np.int64),
        pred_unique.astype(np.int64),
        counts.astype(np.int64).reshape(gt_unique.size, pred_unique.size),
    )


class _Segments:
    """The segments_info of one side of one image as arrays, validated."""

    def __init__(self, segments_info: Sequence[Mapping], category_index: Mapping[int, int], where: str):
        self.ids = np.array([int(s["id"]) for s in segments_info], dtype=np.int64)
        unique_ids, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            raise EvaluationInputError(f"{where}: duplicate segment ids {unique_ids[counts > 1].tolist()}")
        if (self.ids == VOID_ID).any():
            raise EvaluationInputError(f"{where}: segment id 0 is reserved for void")
        unknown = sorted({s["category_id"] for s in segments_info} - set(category_index))
        if unknown:
            raise EvaluationInputError(f"{where}: unknown category ids {unknown}")
        self.category = np.array([category_index[s["category_id"]] for s in segments_info], dtype=np.int64)
        self.iscrowd = np.array([s.get("iscrowd", 0) == 1 for s in segments_info], dtype=bool)
        self.json_area = [s.get("area") for s in segments_info]

    def __len__(self) -> int:
        return self.ids.size


def _positions(unique_ids: np.ndarray, wanted_ids: np.ndarray) -> np.ndarray:
    """Index of each wanted id in sorted unique_ids, or -1 where absent."""
    position = np.searchsorted(unique_ids, wanted_ids).clip(max=max(unique_ids.size - 1, 0))
    found = unique_ids.size > 0 and unique_ids[position] == wanted_ids
    return np.where(found, position, -1)


def _check_prediction_ids(pred_unique: np.ndarray, pred: _Segments, where: str) -> None:
    painted = pred_unique[pred_unique != VOID_ID]
    without_entry = np.setdiff1d(painted, pred.ids)
    if without_entry.size:
        raise EvaluationInputError(
            f"{where}: segment ids {without_entry.tolist()} are in the prediction PNG but not in segments_info"
        )
    not_painted = np.setdiff1d(pred.ids, painted)
    if not_painted.size:
        raise EvaluationInputError(
            f"{where}: segment ids {not_painted.tolist()} are in segments_info but not in the prediction PNG"
        )


class PanopticEvaluator:
    """Accumulates PQ statistics image by image, in memory; mergeable across workers.

    categories: COCO category dicts with "id" and "isthing" ("name" is kept for reports). Results keep
    panopticapi's structure: {"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {...}}}.
    gt_area_from_json: take a ground-truth segment's area from its "area" entry (panopticapi's rule, used by
    pq_compute) instead of counting its pixels; leave False when the id maps were resized or cropped.
    """

    def __init__(self, categories: Sequence[Mapping], gt_area_from_json: bool = False):
        self.gt_area_from_json = gt_area_from_json
        if not categories:
            raise ValueError("categories must be a non-empty list of COCO category dicts")
        self.categories = [dict(c) for c in categories]
        self.category_ids = [c["id"] for c in self.categories]
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"categories has duplicate ids: {self.category_ids}")
        self.category_index = {cid: i for i, cid in enumerate(self.category_ids)}
        self.isthing = np.array([c.get("isthing", 0) == 1 for c in self.categories], dtype=bool)
        num = len(self.categories)
        self.iou_sum = np.zeros(num, dtype=np.float64)
        self.tp = np.zeros(num, dtype=np.int64)
        self.fp = np.zeros(num, dtype=np.int64)
        self.fn = np.zeros(num, dtype=np.int64)
        self.num_images = 0

    def update(
        self,
        gt_ids,
        gt_segments: Sequence[Mapping],
        pred_ids,
        pred_segments: Sequence[Mapping],
        image_id=None,
    ) -> None:
        """Add one image: segment-id maps [H, W] (numpy or torch, 0 = void) with their segments_info lists."""
        where = f"image {image_id}" if image_id is not None else f"image #{self.num_images}"
        gt_ids, pred_ids = _as_id_array(gt_ids, "gt_ids"), _as_id_array(pred_ids, "pred_ids")
        if gt_ids.shape != pred_ids.shape:
            raise EvaluationInputError(
                f"{where}: ground truth is {gt_ids.shape[0]}x{gt_ids.shape[1]} pixels but the prediction is "
                f"{pred_ids.shape[0]}x{pred_ids.shape[1]}"
            )
        gt = _Segments(gt_segments, self.category_index, f"{where} (ground truth)")
        pred = _Segments(pred_segments, self.category_index, f"{where} (prediction)")
        gt_unique, pred_unique, counts = count_id_pairs(gt_ids, pred_ids)
        _check_prediction_ids(pred_unique, pred, f"{where} (prediction)")
        self._accumulate(gt, pred, gt_unique, pred_unique, counts)
        self.num_images += 1

    def _accumulate(self, gt: _Segments, pred: _Segments, gt_unique, pred_unique, counts) -> None:
        # A zero row stands for ground-truth ids absent from the PNG (and for void when there is none).
        counts = np.vstack([counts, np.zeros((1, counts.shape[1]), dtype=np.int64)])
        gt_rows = _positions(gt_unique, gt.ids)
        void_row = _positions(gt_unique, np.array([VOID_ID]))[0]
        pred_cols = _positions(pred_unique, pred.ids)
        intersection = counts[gt_rows][:, pred_cols]  # [G, P]; row -1 is the zero row
        pred_on_void = counts[void_row, pred_cols]
        pred_area = counts[:, pred_cols].sum(axis=0)
        pixel_area = counts[gt_rows].sum(axis=1)
        gt_area = pixel_area
        if self.gt_area_from_json:
            gt_area = np.array(
                [p if a is None else a for a, p in zip(gt.json_area, pixel_area)], dtype=np.float64
            )

        candidate = (
            (intersection > 0) & ~gt.iscrowd[:, None] & (gt.category[:, None] == pred.category[None, :])
        )
        union = pred_area[None, :] + gt_area[:, None] - intersection - pred_on_void[None, :]
        iou = np.divide(intersection, union, out=np.zeros(intersection.shape), where=candidate)
        matched = candidate & (iou > IOU_THRESHOLD)
        gt_match, pred_match = np.nonzero(matched)
        np.add.at(self.tp, gt.category[gt_match], 1)
        np.add.at(self.iou_sum, gt.category[gt_match], iou[gt_match, pred_match])

        missed = ~matched.any(axis=1) & ~gt.iscrowd
        np.add.at(self.fn, gt.category[missed], 1)

        ignored_pixels = pred_on_void + self._crowd_overlap(gt, pred, intersection)
        ignored = ignored_pixels / np.maximum(pred_area, 1) > 0.5
        false_positive = ~matched.any(axis=0) & ~ignored
        np.add.at(self.fp, pred.category[false_positive], 1)

    def _crowd_overlap(self, gt: _Segments, pred: _Segments, intersection: np.ndarray) -> np.ndarray:
        """Pixels of each predicted segment on the crowd region of its category (panopticapi keeps the last
        crowd segment of a category listed in segments_info)."""
        crowd_row_of_category = np.full(len(self.categories), -1, dtype=np.int64)
        for row in np.flatnonzero(gt.iscrowd):
            crowd_row_of_category[gt.category[row]] = row
        crowd_rows = crowd_row_of_category[pred.category]
        has_crowd = crowd_rows >= 0
        overlap = np.zeros(len(pred), dtype=np.int64)
        overlap[has_crowd] = intersection[crowd_rows[has_crowd], np.flatnonzero(has_crowd)]
        return overlap

    def merge(self, other: PanopticEvaluator) -> PanopticEvaluator:
        """Add another evaluator's statistics (same categories) into this one; returns self."""
        if other.category_ids != self.category_ids or other.gt_area_from_json != self.gt_area_from_json:
            raise ValueError("cannot merge PanopticEvaluators built with different categories or area rules")
        self.iou_sum += other.iou_sum
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.num_images += other.num_images
        return self

    def compute(self) -> dict:
        """panopticapi's result structure. Where panopticapi divides by zero (no class of a group seen) this
        returns zeros with n = 0."""
        results: dict = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            selected = np.ones_like(self.isthing) if isthing is None else self.isthing == isthing
            results[name], per_class = self._average(selected)
            if name == "All":
                results["per_class"] = per_class
        return results

    def _average(self, selected: np.ndarray) -> tuple[dict, dict]:
        per_class, totals, n = {}, np.zeros(3), 0
        for index in np.flatnonzero(selected):
            tp, fp, fn, iou = self.tp[index], self.fp[index], self.fn[index], self.iou_sum[index]
            category_id = self.category_ids[index]
            if tp + fp + fn == 0:
                per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denominator = tp + 0.5 * fp + 0.5 * fn
            scores = np.array([iou / denominator, iou / tp if tp else 0.0, tp / denominator])
            per_class[category_id] = dict(zip(("pq", "sq", "rq"), map(float, scores)))
            totals += scores
        averages = totals / n if n else totals
        return {
            "pq": float(averages[0]),
            "sq": float(averages[1]),
            "rq": float(averages[2]),
            "n": n,
        }, per_class


def _as_id_array(ids, name: str) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch tensor
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [H, W], got dtype {ids.dtype} shape {ids.shape}")
    return ids


def match_annotations(gt_json: Mapping, pred_json: Mapping) -> list[tuple[dict, dict]]:
    """(ground truth, prediction) annotation pairs in ground-truth order; every ground-truth image needs
    exactly one prediction and every prediction a ground-truth image."""
    predictions: dict = {}
    for annotation in pred_json["annotations"]:
        image_id = annotation["image_id"]
        if image_id in predictions:
            raise EvaluationInputError(f"image {image_id}: more than one prediction annotation")
        predictions[image_id] = annotation
    gt_image_ids = {annotation["image_id"] for annotation in gt_json["annotations"]}
    unknown = [image_id for image_id in predictions if image_id not in gt_image_ids]
    if unknown:
        raise EvaluationInputError(
            f"predictions for unknown image ids {unknown[:10]} (not in the ground truth)"
        )
    missing = [a["image_id"] for a in gt_json["annotations"] if a["image_id"] not in predictions]
    if missing:
        raise EvaluationInputError(f"no prediction for images {missing[:10]}")
    return [(annotation, predictions[annotation["image_id"]]) for annotation in gt_json["annotations"]]


def _read_pair(gt_annotation: Mapping, pred_annotation: Mapping, gt_folder: Path, pred_folder: Path):
    image_id = gt_annotation["image_id"]
    for folder, annotation, side in (
        (gt_folder, gt_annotation, "ground truth"),
        (pred_folder, pred_annotation, "prediction"),
    ):
        if not (folder / annotation["file_name"]).is_file():
            raise EvaluationInputError(
                f"image {image_id}: {side} PNG {folder / annotation['file_name']} is missing"
            )
    return read_panoptic_png(gt_folder / gt_annotation["file_name"]), read_panoptic_png(
        pred_folder / pred_annotation["file_name"]
    )


def pq_compute(
    gt_json_file: str | os.PathLike,
    pred_json_file: str | os.PathLike,
    gt_folder: str | os.PathLike | None = None,
    pred_folder: str | os.PathLike | None = None,
    num_threads: int = 1,
) -> dict:
    """panopticapi.evaluation.pq_compute's arguments and result, in one process.

    num_threads > 1 decodes PNGs in that many threads (Pillow releases the GIL while decoding) while the
    calling thread accumulates; the statistics are the same for any value."""
    gt_json, pred_json = load_json(gt_json_file), load_json(pred_json_file)
    gt_folder = default_folder(gt_json_file) if gt_folder is None else Path(gt_folder)
    pred_folder = default_folder(pred_json_file) if pred_folder is None else Path(pred_folder)
    for folder, side in ((gt_folder, "ground truth"), (pred_folder, "prediction")):
        if not folder.is_dir():
            raise EvaluationInputError(f"{side} folder {folder} does not exist")
    pairs = match_annotations(gt_json, pred_json)
    evaluator = PanopticEvaluator(gt_json["categories"], gt_area_from_json=True)

    def read(pair):
        return _read_pair(pair[0], pair[1], gt_folder, pred_folder)

    chunk = 16 * max(1, num_threads)  # bounds the decoded images held in memory at once
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for start in range(0, len(pairs), chunk):
            chunk_pairs = pairs[start : start + chunk]
            images = pool.map(read, chunk_pairs) if num_threads > 1 else map(read, chunk_pairs)
            for (gt_annotation, pred_annotation), (gt_ids, pred_ids) in zip(chunk_pairs, images):
                evaluator.update(
                    gt_ids,
                    gt_annotation["segments_info"],
                    pred_ids,
                    pred_annotation["segments_info"],
                    image_id=gt_annotation["image_id"],
                )
    return evaluator.compute()
