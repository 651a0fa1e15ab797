"""Panoptic quality (PQ, SQ, RQ), numerically identical to panopticapi's `pq_compute`, vectorised.

Rules (those of panopticapi.evaluation): a ground-truth and a predicted segment of the same category match
when IoU > 0.5, where the predicted pixels on void (id 0) leave the union; crowd ground-truth segments never
match; an unmatched ground-truth segment that is not crowd is a false negative; an unmatched predicted segment
is a false positive unless more than half of it lies on void plus the crowd region of its category (the last
crowd segment of that category in `segments_info`). pq_compute takes the ground-truth area from the JSON
`area`, as panopticapi does; the in-memory evaluator counts it from the pixels unless told otherwise. PQ = sum(IoU of matches) / (TP + FP/2 + FN/2) per class,
averaged over the classes with TP + FP + FN > 0.

Where panopticapi converts each PNG to uint32 channels, combines ids into uint64 and sorts every pixel twice
(np.unique), this code reads Pillow's 4-byte pixels in place as ids (one mask), cuts the raster order into
runs of equal (ground truth, prediction) id pairs (flat regions give a few thousand runs per image), maps the
run ids to segment slots by binary search in the few listed ids, and counts pairs with one bincount. Beyond
PNG decoding, which is most of the time left, a 480x640 image pair costs about 2 ms.

Merging is exact: TP/FP/FN are integers, and each image's IoU sum per class (added in panopticapi's (gt id,
pred id) order) is kept and the per-class totals are math.fsum of those parts, correctly rounded. The result
therefore does not depend on how the images were split between workers nor on the order the parts are merged
in; it can differ from panopticapi's running float sum in the last bits only.
"""

from __future__ import annotations

import math
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


class _ChangeBuffers:
    """Two reusable boolean buffers for the run detection of _id_runs: fresh arrays of a few hundred KB
    per image cost page faults that take longer than the comparisons themselves."""

    def __init__(self):
        self.size = -1

    def get(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size != self.size:
            self.size, self.changed, self.scratch = size, np.empty(size, bool), np.empty(size, bool)
        return self.changed, self.scratch

    def __reduce__(self):  # a pickled evaluator (sent between workers) carries no scratch memory
        return _ChangeBuffers, ()


def _id_runs(
    gt_ids: np.ndarray, pred_ids: np.ndarray, buffers: _ChangeBuffers
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The raster order cut into runs of one (ground-truth id, predicted id) pair: (gt id int64 [R],
    pred id int64 [R], length [R]). Flat segments give a few thousand runs per image, so everything after
    this one pass over the pixels works on small arrays."""
    gt_flat, pred_flat = np.ravel(gt_ids), np.ravel(pred_ids)
    if gt_flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    changed, scratch = buffers.get(gt_flat.size - 1)
    np.not_equal(gt_flat[1:], gt_flat[:-1], out=changed)
    changed |= np.not_equal(pred_flat[1:], pred_flat[:-1], out=scratch)
    run_starts = np.flatnonzero(changed)
    run_starts += 1
    run_starts = np.concatenate(([0], run_starts))
    run_lengths = np.diff(run_starts, append=gt_flat.size)
    return gt_flat[run_starts].astype(np.int64), pred_flat[run_starts].astype(np.int64), run_lengths


def count_id_pairs(gt_ids: np.ndarray, pred_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts of every (ground-truth id, predicted id) pair.

    Returns (gt_unique sorted [G], pred_unique sorted [P], counts int64 [G, P])."""
    gt_runs, pred_runs, run_lengths = _id_runs(gt_ids, pred_ids, _ChangeBuffers())
    gt_unique, gt_index = np.unique(gt_runs, return_inverse=True)
    pred_unique, pred_index = np.unique(pred_runs, return_inverse=True)
    pair_code = gt_index.ravel() * pred_unique.size + pred_index.ravel()
    counts = np.bincount(pair_code, weights=run_lengths, minlength=gt_unique.size * pred_unique.size)
    return gt_unique, pred_unique, counts.astype(np.int64).reshape(gt_unique.size, pred_unique.size)


class _Segments:
    """The segments_info of one side of one image as arrays, validated.

    A few dozen segments per image: plain Python checks here cost less than numpy's per-call overhead."""

    def __init__(self, segments_info: Sequence[Mapping], category_index: Mapping[int, int], where: str):
        ids = [int(s["id"]) for s in segments_info]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise EvaluationInputError(f"{where}: duplicate segment ids {repeated}")
        if VOID_ID in ids:
            raise EvaluationInputError(f"{where}: segment id 0 is reserved for void")
        unknown = sorted({s["category_id"] for s in segments_info} - category_index.keys())
        if unknown:
            raise EvaluationInputError(f"{where}: unknown category ids {unknown}")
        self.ids = np.array(ids, dtype=np.int64)
        self.category = np.array([category_index[s["category_id"]] for s in segments_info], dtype=np.int64)
        self.iscrowd = np.array([s.get("iscrowd", 0) == 1 for s in segments_info], dtype=bool)
        self.json_area = [s.get("area") for s in segments_info]

        # Slots: segment i -> i, void -> len(ids), an id without an entry -> len(ids) + 1.
        keys = np.concatenate((self.ids, [VOID_ID]))
        order = np.argsort(keys)
        self.sorted_keys, self.slot_of_sorted = keys[order], order

    def __len__(self) -> int:
        return self.ids.size

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id (segment index, void or unlisted), by binary search in the few listed ids."""
        position = np.searchsorted(self.sorted_keys, ids).clip(max=self.sorted_keys.size - 1)
        listed = self.sorted_keys[position] == ids
        return np.where(listed, self.slot_of_sorted[position], len(self) + 1)


def _check_prediction_ids(pred_runs: np.ndarray, pred_slots: np.ndarray, pred: _Segments, pred_area, where):
    unlisted = np.unique(pred_runs[pred_slots == len(pred) + 1])
    if unlisted.size:
        raise EvaluationInputError(
            f"{where}: segment ids {unlisted.tolist()} are in the prediction PNG but not in segments_info"
        )
    unpainted = np.sort(pred.ids[pred_area == 0])
    if unpainted.size:
        raise EvaluationInputError(
            f"{where}: segment ids {unpainted.tolist()} are in segments_info but not in the prediction PNG"
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
        self.iou_parts: list[tuple[np.ndarray, np.ndarray]] = []
        """Per image with matches: (class indices, that image's IoU sum of each); see iou_sum."""
        self.tp = np.zeros(num, dtype=np.int64)
        self.fp = np.zeros(num, dtype=np.int64)
        self.fn = np.zeros(num, dtype=np.int64)
        self.num_images = 0
        self._change_buffers = _ChangeBuffers()

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
        gt_runs, pred_runs, run_lengths = _id_runs(gt_ids, pred_ids, self._change_buffers)
        gt_slots, pred_slots = gt.slots(gt_runs), pred.slots(pred_runs)
        # pixels[g, p]: ground-truth slot g (segments, void, unlisted) against prediction slot p
        num_gt, num_pred = len(gt) + 2, len(pred) + 2
        pixels = np.bincount(
            gt_slots * num_pred + pred_slots, weights=run_lengths, minlength=num_gt * num_pred
        ).astype(np.int64).reshape(num_gt, num_pred)
        pred_area = pixels[:, : len(pred)].sum(axis=0)
        _check_prediction_ids(pred_runs, pred_slots, pred, pred_area, f"{where} (prediction)")
        self._accumulate(gt, pred, pixels, pred_area)
        self.num_images += 1

    def _accumulate(self, gt: _Segments, pred: _Segments, pixels: np.ndarray, pred_area: np.ndarray) -> None:
        intersection = pixels[: len(gt), : len(pred)]  # [G, P] in segments_info order
        pred_on_void = pixels[len(gt), : len(pred)]
        gt_area = pixels[: len(gt)].sum(axis=1)
        if self.gt_area_from_json:
            gt_area = np.array([p if a is None else a for a, p in zip(gt.json_area, gt_area)], dtype=np.int64)

        candidate = (
            (intersection > 0) & ~gt.iscrowd[:, None] & (gt.category[:, None] == pred.category[None, :])
        )
        gt_match, pred_match = np.nonzero(candidate)
        match_intersection = intersection[gt_match, pred_match]
        union = (
            pred_area[pred_match] + gt_area[gt_match] - match_intersection - pred_on_void[pred_match]
        )
        iou = match_intersection / union
        matched = iou > IOU_THRESHOLD
        # panopticapi adds the IoUs of an image in increasing (gt id, pred id) order; the same order makes
        # the float sums bit-identical. A ground-truth segment matches at most one prediction (IoU > 0.5).
        gt_match, pred_match, iou = gt_match[matched], pred_match[matched], iou[matched]
        order = np.argsort(gt.ids[gt_match], kind="stable")
        match_category = gt.category[gt_match[order]]
        np.add.at(self.tp, match_category, 1)
        if match_category.size:
            image_iou = np.zeros(len(self.categories), dtype=np.float64)
            np.add.at(image_iou, match_category, iou[order])
            matched_classes = np.unique(match_category)
            self.iou_parts.append((matched_classes, image_iou[matched_classes]))

        gt_matched = np.zeros(len(gt), dtype=bool)
        gt_matched[gt_match] = True
        np.add.at(self.fn, gt.category[~gt_matched & ~gt.iscrowd], 1)

        pred_matched = np.zeros(len(pred), dtype=bool)
        pred_matched[pred_match] = True
        ignored_pixels = pred_on_void + self._crowd_overlap(gt, pred, intersection)
        ignored = ignored_pixels / np.maximum(pred_area, 1) > 0.5
        np.add.at(self.fp, pred.category[~pred_matched & ~ignored], 1)

    def _crowd_overlap(self, gt: _Segments, pred: _Segments, intersection: np.ndarray) -> np.ndarray:
        """Pixels of each predicted segment on the crowd region of its category (panopticapi keeps the last
        crowd segment of a category listed in segments_info)."""
        crowd_row_of_category = np.full(len(self.categories), -1, dtype=np.int64)
        for row in np.flatnonzero(gt.iscrowd):
            crowd_row_of_category[gt.category[row]] = row
        pred_crowd_rows = crowd_row_of_category[pred.category]
        has_crowd = pred_crowd_rows >= 0
        overlap = np.zeros(len(pred), dtype=np.int64)
        overlap[has_crowd] = intersection[pred_crowd_rows[has_crowd], np.flatnonzero(has_crowd)]
        return overlap

    @property
    def iou_sum(self) -> np.ndarray:
        """float64 [K]: per class, the IoU sum of its matches, math.fsum over the images' parts (exact
        before the one final rounding, so any split and merge order gives the same bits)."""
        per_class: list[list[float]] = [[] for _ in self.categories]
        for classes, sums in self.iou_parts:
            for index, value in zip(classes.tolist(), sums.tolist()):
                per_class[index].append(value)
        return np.array([math.fsum(values) for values in per_class], dtype=np.float64)

    def defined_classes(self) -> np.ndarray:
        """bool [K]: classes whose PQ is defined (seen as TP, FP or FN at least once)."""
        return (self.tp + self.fp + self.fn) > 0

    def merge(self, other: PanopticEvaluator) -> PanopticEvaluator:
        """Add another evaluator's statistics (same categories) into this one; returns self."""
        if other.category_ids != self.category_ids or other.gt_area_from_json != self.gt_area_from_json:
            raise ValueError("cannot merge PanopticEvaluators built with different categories or area rules")
        # Not in place: arrays that came through Ray are read-only views of its object store.
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        self.iou_parts = self.iou_parts + other.iou_parts
        self.num_images += other.num_images
        return self

    def compute(self) -> dict:
        """panopticapi's result structure. Where panopticapi divides by zero (no class of a group seen) this
        returns zeros with n = 0."""
        results: dict = {}
        iou_sum = self.iou_sum
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            selected = np.ones_like(self.isthing) if isthing is None else self.isthing == isthing
            results[name], per_class = self._average(selected, iou_sum)
            if name == "All":
                results["per_class"] = per_class
        return results

    def _average(self, selected: np.ndarray, iou_sum: np.ndarray) -> tuple[dict, dict]:
        per_class, totals, n = {}, np.zeros(3), 0
        for index in np.flatnonzero(selected):
            tp, fp, fn, iou = self.tp[index], self.fp[index], self.fn[index], iou_sum[index]
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


def _read_pair(
    gt_annotation: Mapping,
    pred_annotation: Mapping,
    gt_folder: Path,
    pred_folder: Path,
    buffers: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> tuple[np.ndarray, np.ndarray]:
    """(ground-truth ids, predicted ids), decoded into `buffers` where their shapes fit."""
    image_id = gt_annotation["image_id"]
    paths = (gt_folder / gt_annotation["file_name"], pred_folder / pred_annotation["file_name"])
    for path, side in zip(paths, ("ground truth", "prediction")):
        if not path.is_file():
            raise EvaluationInputError(f"image {image_id}: {side} PNG {path} is missing")
    return read_panoptic_png(paths[0], out=buffers[0]), read_panoptic_png(paths[1], out=buffers[1])


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
    gt_json = load_json(gt_json_file, keys=("annotations", "categories"))
    pred_json = load_json(pred_json_file, keys=("annotations",))
    gt_folder = default_folder(gt_json_file) if gt_folder is None else Path(gt_folder)
    pred_folder = default_folder(pred_json_file) if pred_folder is None else Path(pred_folder)
    for folder, side in ((gt_folder, "ground truth"), (pred_folder, "prediction")):
        if not folder.is_dir():
            raise EvaluationInputError(f"{side} folder {folder} does not exist")
    pairs = match_annotations(gt_json, pred_json)
    evaluator = PanopticEvaluator(gt_json["categories"], gt_area_from_json=True)

    def add(pair, ids):
        gt_annotation, pred_annotation = pair
        evaluator.update(
            ids[0],
            gt_annotation["segments_info"],
            ids[1],
            pred_annotation["segments_info"],
            image_id=gt_annotation["image_id"],
        )

    if num_threads <= 1:
        ids = (None, None)
        for pair in pairs:  # one pair of id buffers, refilled image after image
            ids = _read_pair(*pair, gt_folder, pred_folder, buffers=ids)
            add(pair, ids)
        return evaluator.compute()

    def read(pair):
        return _read_pair(*pair, gt_folder, pred_folder)

    chunk = 16 * num_threads  # bounds the decoded images held in memory at once
    with ThreadPoolExecutor(num_threads) as pool:
        for start in range(0, len(pairs), chunk):
            chunk_pairs = pairs[start : start + chunk]
            for pair, ids in zip(chunk_pairs, pool.map(read, chunk_pairs)):
                add(pair, ids)
    return evaluator.compute()
