"""Validation of a model on the evaluation shards: each metric with the task token it belongs to (PQ with
panoptic, AP with instance, mIoU with semantic), computed in memory by pipeline.evaluation.

A Validator is plain picklable state, so ranks or Ray workers can each evaluate a slice of the shards and
send their Validator (Ray return value, torch.distributed gather_object) to one place to `merge`; merged
results equal those of one Validator that saw every image, bit for bit. Optionally it keeps the first few
images per task for pictures (`save_pictures`) and writes predictions in the standard formats
(`predictions_folder`, then `write_predictions` once after merging) that `python -m pipeline.evaluate
panoptic|instance|semantic` re-scores to the same numbers:

    panoptic_gt.json + panoptic_gt/*.png   ground truth, COCO panoptic (dataset category ids, pixel areas)
    panoptic.json + panoptic/*.png         panoptic predictions, COCO panoptic
    instances.json                         instance predictions, COCO results with RLE masks
    semantic_gt/*.png, semantic/*.png      class-label PNGs (255 = ignore in the ground truth)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.inference import InferenceThresholds, SemanticResult, postprocess, semantic_multiscale_flip
from pipeline.data.readers import ClassInfo
from pipeline.evaluation.instance import InstanceEvaluator
from pipeline.evaluation.panoptic import PanopticEvaluator
from pipeline.evaluation.panoptic_format import write_panoptic_png
from pipeline.evaluation.semantic import SemanticEvaluator
from pipeline.evaluation.visualize import save_comparison, save_per_class_bars

TASK_OF_METRIC = {"pq": "panoptic", "ap": "instance", "miou": "semantic"}
IGNORE_LABEL = 255
DEFAULT_MULTISCALE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
PICTURE_INSTANCE_MIN_SCORE = 0.5
"""Instance predictions overlap and are not thresholded; pictures show only those scoring at least this."""


def categories_of(classes: ClassInfo) -> list[dict]:
    """COCO-style categories keyed by the contiguous id, which is what inference returns."""
    return [{"id": index, "name": name, "isthing": int(thing)}
            for index, (name, thing) in enumerate(zip(classes.names, classes.isthing))]


def ground_truth_segments(index_map: np.ndarray, table) -> list[dict]:
    """segments_info of one evaluation sample: value v > 0 of the index map is row v - 1 of its table."""
    present = [int(v) for v in np.unique(index_map) if v > 0]
    return [{"id": v, "category_id": int(table.classes[v - 1]), "iscrowd": int(table.iscrowd[v - 1]),
             "isthing": int(table.isthing[v - 1])} for v in present]


def semantic_ground_truth(index_map: np.ndarray, table) -> np.ndarray:
    """Class per pixel (crowd regions keep their class), void -> IGNORE_LABEL."""
    lookup = np.concatenate([[IGNORE_LABEL], np.asarray(table.classes, np.int64)])
    return lookup[index_map]


def coco_image_id(image_id: str) -> int | str:
    """Shards keep image ids as strings; COCO files use ints where the dataset does."""
    return int(image_id) if str(image_id).isdigit() else str(image_id)


def png_name(image_id: str) -> str:
    """COCO's zero-padded name for numeric ids, else the id with path-unsafe characters replaced."""
    converted = coco_image_id(image_id)
    if isinstance(converted, int):
        return f"{converted:012d}.png"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", converted) + ".png"


class ExactPanopticTally:
    """PanopticEvaluator statistics whose merge is exact: TP/FP/FN are integers, and each image's IoU sum
    per class is kept and added with math.fsum (correctly rounded), so the result does not depend on how
    the images were split between workers or in what order the parts are merged."""

    def __init__(self, categories: Sequence[dict]):
        self.categories = [dict(c) for c in categories]
        PanopticEvaluator(self.categories)  # validates the categories once
        self.tp, self.fp, self.fn = (np.zeros(len(self.categories), np.int64) for _ in range(3))
        self.iou_parts: list[tuple[np.ndarray, np.ndarray]] = []  # (class indices, IoU sums) per image
        self.num_images = 0

    def update(self, gt_ids, gt_segments, pred_ids, pred_segments, image_id=None) -> None:
        single = PanopticEvaluator(self.categories)
        single.update(gt_ids, gt_segments, pred_ids, pred_segments, image_id=image_id)
        self.tp, self.fp, self.fn = self.tp + single.tp, self.fp + single.fp, self.fn + single.fn
        matched = np.flatnonzero(single.tp)
        self.iou_parts.append((matched, single.iou_sum[matched]))
        self.num_images += 1

    def merge(self, other: ExactPanopticTally) -> ExactPanopticTally:
        if other.categories != self.categories:
            raise ValueError("cannot merge panoptic statistics built with different categories")
        # Not in place: arrays that came through Ray are read-only views of its object store.
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        self.iou_parts = self.iou_parts + other.iou_parts
        self.num_images += other.num_images
        return self

    def evaluator(self) -> PanopticEvaluator:
        """A PanopticEvaluator holding these statistics (its compute gives panopticapi's structure)."""
        evaluator = PanopticEvaluator(self.categories)
        evaluator.tp, evaluator.fp, evaluator.fn = self.tp.copy(), self.fp.copy(), self.fn.copy()
        per_class: list[list[float]] = [[] for _ in self.categories]
        for classes, sums in self.iou_parts:
            for index, value in zip(classes.tolist(), sums.tolist()):
                per_class[index].append(value)
        evaluator.iou_sum = np.array([math.fsum(values) for values in per_class], dtype=np.float64)
        evaluator.num_images = self.num_images
        return evaluator

    def defined(self) -> np.ndarray:
        """Classes whose PQ is defined (seen as TP, FP or FN at least once)."""
        return (self.tp + self.fp + self.fn) > 0


class Validator:
    """Accumulates the requested metrics over evaluation batches.

    pictures: keep this many images per task (image, ground truth, prediction) for `save_pictures`.
    semantic_multiscale: semantic predictions from model.inference.semantic_multiscale_flip over
        `multiscale_scales` (factors of the original size), with horizontal flips when `multiscale_flip`.
    predictions_folder: write every prediction (and the ground truth) there in the standard formats; call
        `write_predictions` once after the last batch (after merging, when workers share the folder).
    """

    def __init__(
        self,
        classes: ClassInfo,
        thresholds: InferenceThresholds,
        metrics: list[str],
        *,
        pictures: int = 0,
        semantic_multiscale: bool = False,
        multiscale_scales: Sequence[float] = DEFAULT_MULTISCALE_SCALES,
        multiscale_flip: bool = True,
        size_divisibility: int = 32,
        predictions_folder: str | os.PathLike | None = None,
    ):
        unknown = sorted(set(metrics) - set(TASK_OF_METRIC))
        if unknown:
            raise ValueError(f"metrics must be among {sorted(TASK_OF_METRIC)}, got {unknown}")
        if pictures < 0:
            raise ValueError(f"pictures must be >= 0, got {pictures}")
        if semantic_multiscale:
            if not multiscale_scales or min(multiscale_scales) <= 0:
                raise ValueError(f"multiscale_scales must be positive factors, got {tuple(multiscale_scales)}")
        self.classes = classes
        self.thresholds = thresholds
        self.metrics = [m for m in metrics if m != "ap" or any(classes.isthing)]
        self.pictures = pictures
        self.semantic_multiscale = semantic_multiscale
        self.multiscale_scales = tuple(float(s) for s in multiscale_scales)
        self.multiscale_flip = multiscale_flip
        self.size_divisibility = size_divisibility
        self.predictions_folder = None if predictions_folder is None else Path(predictions_folder)
        categories = categories_of(classes)
        self.evaluators = {
            "pq": ExactPanopticTally(categories) if "pq" in self.metrics else None,
            "ap": InstanceEvaluator(categories) if "ap" in self.metrics else None,
            "miou": SemanticEvaluator(classes.num_classes, IGNORE_LABEL, list(classes.names)) if "miou" in self.metrics else None,
        }
        self.examples: dict[str, list[dict]] = {TASK_OF_METRIC[m]: [] for m in self.metrics}
        self.records: dict[str, list[dict]] = {"images": [], "panoptic_gt": [], "panoptic": []}
        self.num_images = 0

    # ------------------------------------------------------------------------------------------ batches
    @torch.no_grad()
    def add_batch(self, model: torch.nn.Module, batch: dict, device: torch.device, dtype: torch.dtype) -> None:
        images = batch["images"].to(device=device, dtype=dtype)
        sizes = [(int(size[0]), int(size[1])) for size in batch["image_sizes"]]
        samples = [
            _Sample(str(image_id), index_map.numpy(), table, batch["images"][i, :, : size[0], : size[1]])
            for i, (image_id, index_map, table, size) in enumerate(
                zip(batch["image_ids"], batch["index_maps"], batch["segments"], sizes))
        ]
        if self.predictions_folder is not None:
            for sample in samples:
                self._write_ground_truth(sample)
        for metric in self.metrics:
            for sample, result in zip(samples, self._predict(model, images, sizes, TASK_OF_METRIC[metric])):
                self._add(metric, sample, result)
        self.num_images += len(samples)

    def _predict(self, model, images: torch.Tensor, sizes: list[tuple[int, int]], task: str) -> list:
        if task == "semantic" and self.semantic_multiscale:
            probabilities = semantic_multiscale_flip(
                model, images, sizes, scales=self.multiscale_scales, flip=self.multiscale_flip,
                size_divisibility=self.size_divisibility)
            return [SemanticResult(scores=p, labels=p.argmax(0)) for p in probabilities]
        outputs = model(images, [task] * len(sizes))
        outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_masks")}
        return postprocess(outputs, [task] * len(sizes), sizes, sizes, list(self.classes.isthing),
                           self.thresholds, padded_size=tuple(images.shape[-2:]))

    def _add(self, metric: str, sample: _Sample, result) -> None:
        {"pq": self._add_panoptic, "ap": self._add_instance, "miou": self._add_semantic}[metric](sample, result)

    def _add_panoptic(self, sample: _Sample, result) -> None:
        predicted = [{"id": s.id, "category_id": s.category_id, "isthing": int(s.isthing)} for s in result.segments_info]
        segment_ids = result.segment_ids.cpu().numpy()
        self.evaluators["pq"].update(sample.index_map, sample.gt_segments, segment_ids, predicted, image_id=sample.image_id)
        self._keep_example("panoptic", sample, sample.index_map, segment_ids)
        if self.predictions_folder is not None:
            write_panoptic_png(self.predictions_folder / "panoptic" / png_name(sample.image_id), segment_ids)
            segments = [{"id": s.id, "category_id": self.classes.category_ids[s.category_id], "score": s.score}
                        for s in result.segments_info]
            self.records["panoptic"].append({"image_id": coco_image_id(sample.image_id),
                                             "file_name": png_name(sample.image_id), "segments_info": segments})

    def _add_instance(self, sample: _Sample, result) -> None:
        masks, scores = result.masks.cpu().numpy(), result.scores.cpu().numpy()
        self.evaluators["ap"].update(sample.image_id, sample.index_map, sample.gt_segments, masks, scores,
                                     result.labels.cpu().numpy())
        if self._wants_example("instance"):
            thing = np.concatenate([[False], sample.table.isthing & ~sample.table.iscrowd])[sample.index_map]
            self._keep_example("instance", sample, np.where(thing, sample.index_map, 0), instance_map(masks, scores))

    def _add_semantic(self, sample: _Sample, result) -> None:
        labels = result.labels.cpu().numpy()
        ground_truth = semantic_ground_truth(sample.index_map, sample.table)
        self.evaluators["miou"].update(labels, ground_truth, image_id=sample.image_id)
        # Shifted by one so that class 0 gets a colour and void (0) none.
        self._keep_example("semantic", sample, np.where(ground_truth == IGNORE_LABEL, 0, ground_truth + 1), labels + 1)
        if self.predictions_folder is not None:
            _write_label_png(self.predictions_folder / "semantic" / png_name(sample.image_id), labels)

    def _wants_example(self, task: str) -> bool:
        return len(self.examples[task]) < self.pictures

    def _keep_example(self, task: str, sample: _Sample, gt: np.ndarray, pred: np.ndarray) -> None:
        if self._wants_example(task):
            self.examples[task].append({"name": sample.image_id, "image": sample.picture(),
                                        "gt": np.asarray(gt), "pred": np.asarray(pred)})

    def _write_ground_truth(self, sample: _Sample) -> None:
        folder, name = self.predictions_folder, png_name(sample.image_id)
        height, width = sample.index_map.shape
        self.records["images"].append({"id": coco_image_id(sample.image_id), "file_name": name,
                                       "height": height, "width": width})
        if "miou" in self.metrics:
            _write_label_png(folder / "semantic_gt" / name, semantic_ground_truth(sample.index_map, sample.table))
        if "pq" in self.metrics or "ap" in self.metrics:
            raw_ids = np.concatenate([[0], sample.table.segment_ids])[sample.index_map]
            write_panoptic_png(folder / "panoptic_gt" / name, raw_ids)
            areas = np.bincount(sample.index_map.ravel(), minlength=len(sample.table) + 1)
            segments = [{"id": int(sample.table.segment_ids[s["id"] - 1]),
                         "category_id": self.classes.category_ids[s["category_id"]],
                         "iscrowd": s["iscrowd"], "area": int(areas[s["id"]])} for s in sample.gt_segments]
            self.records["panoptic_gt"].append({"image_id": coco_image_id(sample.image_id), "file_name": name,
                                                "segments_info": segments})

    # ------------------------------------------------------------------------------------------ combining
    def merge(self, other: Validator) -> Validator:
        """Add another Validator's images (a disjoint part of the split, same settings) into this one;
        returns self. Pictures keep this one's first, then the other's, up to `pictures` per task."""
        mine = (self.classes, self.thresholds, self.metrics, self.semantic_multiscale, self.multiscale_scales, self.multiscale_flip)
        theirs = (other.classes, other.thresholds, other.metrics, other.semantic_multiscale, other.multiscale_scales, other.multiscale_flip)
        if mine != theirs:
            raise ValueError("cannot merge Validators with different classes, thresholds, metrics or multi-scale settings")
        for metric, evaluator in self.evaluators.items():
            if evaluator is not None:
                evaluator.merge(other.evaluators[metric])
        for task, examples in self.examples.items():
            examples += other.examples[task][: max(self.pictures - len(examples), 0)]
        for name, records in self.records.items():
            records += other.records[name]
        self.num_images += other.num_images
        return self

    # ------------------------------------------------------------------------------------------ results
    def compute_details(self) -> dict[str, dict]:
        """Full results per task: "panoptic" (panopticapi's structure, per class by contiguous id),
        "instance" (COCO segm stats, per-class AP by contiguous id), "semantic" (mIoU, per-class IoU, ...)."""
        details: dict[str, dict] = {}
        if self.evaluators["pq"] is not None:
            details["panoptic"] = self.evaluators["pq"].evaluator().compute()
        if self.evaluators["ap"] is not None:
            details["instance"] = self.evaluators["ap"].compute()
        if self.evaluators["miou"] is not None:
            details["semantic"] = self.evaluators["miou"].compute()
        return details

    def compute(self, details: dict[str, dict] | None = None) -> dict[str, float]:
        """Flat headline numbers: PQ/SQ/RQ (all, things, stuff), AP, mIoU and pixel accuracy, in percent."""
        return summarize(self.compute_details() if details is None else details)

    def save_pictures(self, folder: str | os.PathLike, details: dict[str, dict] | None = None) -> list[Path]:
        """Write `<task>_examples.png` (image | ground truth | prediction, one row per kept image) for every
        task with kept images, and the per-class bar charts pq_per_class.png, ap_per_class.png and
        iou_per_class.png of the computed metrics (`details` from compute_details, computed if not given)."""
        folder = Path(folder)
        paths = [save_comparison(folder / f"{task}_examples.png", examples, ignore=(0,),
                                 title=f"{task}: image | ground truth | prediction")
                 for task, examples in self.examples.items() if examples]
        details = self.compute_details() if details is None else details
        names = list(self.classes.names)
        if "panoptic" in details:
            defined = self.evaluators["pq"].defined()
            values = [details["panoptic"]["per_class"][k]["pq"] if defined[k] else math.nan for k in range(len(names))]
            paths.append(save_per_class_bars(folder / "pq_per_class.png", names, values, "PQ"))
        if "instance" in details:
            things = [k for k, thing in enumerate(self.classes.isthing) if thing]
            values = [details["instance"]["per_class"][k] for k in things]
            paths.append(save_per_class_bars(folder / "ap_per_class.png", [names[k] for k in things], values, "AP"))
        if "semantic" in details:
            paths.append(save_per_class_bars(folder / "iou_per_class.png", names, details["semantic"]["per_class_iou"], "IoU"))
        return paths

    def write_predictions(self) -> dict[str, Path]:
        """Write the JSON files beside the PNGs written batch by batch; returns them by name
        ("panoptic_gt", "panoptic", "instances")."""
        if self.predictions_folder is None:
            raise ValueError("write_predictions needs a Validator built with predictions_folder")
        folder = self.predictions_folder
        folder.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        categories = [{"id": cid, "name": name, "isthing": int(thing)}
                      for cid, name, thing in zip(self.classes.category_ids, self.classes.names, self.classes.isthing)]
        if "pq" in self.metrics or "ap" in self.metrics:
            written["panoptic_gt"] = _write_json(folder / "panoptic_gt.json", {
                "images": self.records["images"], "annotations": self.records["panoptic_gt"], "categories": categories})
        if "pq" in self.metrics:
            written["panoptic"] = _write_json(folder / "panoptic.json", {
                "annotations": self.records["panoptic"], "categories": categories})
        if "ap" in self.metrics:
            results = [{**result, "image_id": coco_image_id(result["image_id"]),
                        "category_id": self.classes.category_ids[result["category_id"]]}
                       for result in self.evaluators["ap"].results]
            written["instances"] = _write_json(folder / "instances.json", results)
        return written


def summarize(details: dict[str, dict]) -> dict[str, float]:
    """The flat headline numbers of compute_details' results, in percent."""
    summary: dict[str, float] = {}
    if "panoptic" in details:
        for group, prefix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("pq", "sq", "rq"):
                summary[f"{key.upper()}{prefix}"] = 100 * details["panoptic"][group][key]
    if "instance" in details:
        summary["AP"] = 100 * max(details["instance"]["AP"], 0.0)
    if "semantic" in details:
        summary["mIoU"] = 100 * details["semantic"]["mIoU"]
        summary["pixel_accuracy"] = 100 * details["semantic"]["pACC"]
    return summary


def instance_map(masks: np.ndarray, scores: np.ndarray, min_score: float = PICTURE_INSTANCE_MIN_SCORE) -> np.ndarray:
    """Overlapping instance masks [M, H, W] -> one id map for pictures: masks scoring at least min_score,
    higher scores painted over lower ones, ids 1.. by rank; 0 elsewhere."""
    painted = np.zeros(masks.shape[1:], dtype=np.int64)
    order = np.argsort(scores, kind="stable")
    for rank, index in enumerate(order):
        if scores[index] >= min_score:
            painted[masks[index]] = len(order) - rank
    return painted


class _Sample:
    """One evaluation image of a batch, with what every task needs from it."""

    def __init__(self, image_id: str, index_map: np.ndarray, table, image: torch.Tensor):
        self.image_id, self.index_map, self.table, self.image = image_id, index_map, table, image
        self.gt_segments = ground_truth_segments(index_map, table)

    def picture(self) -> np.ndarray:
        """uint8 RGB [h, w, 3]: the unpadded image as read (the stream keeps the 0-255 values)."""
        return self.image.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _write_label_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    Image.fromarray(np.ascontiguousarray(labels.astype(dtype))).save(path)


def _write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path
