"""Instance segmentation AP through pycocotools' COCOeval (iouType "segm") on RLE-encoded masks.

Ground truth may be a COCO instances dataset or a COCO panoptic annotation, whose thing segments become
instances (iscrowd carried, area counted from the pixels). Predictions are COCO results: a list of
{"image_id", "category_id", "segmentation": RLE, "score"}.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.formats import mask_to_rle  # noqa: F401 (lives in model/ for prediction; imported from here too)
from pipeline.evaluation.panoptic_format import (
    EvaluationInputError,
    default_folder,
    load_json,
    read_panoptic_png,
)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def instances_from_panoptic(
    image_id, ids: np.ndarray, segments_info: Sequence[Mapping], thing_ids: set
) -> list[dict]:
    """COCO instance annotations (without "id") for the thing segments of one panoptic image."""
    annotations = []
    for segment in segments_info:
        if segment["category_id"] not in thing_ids:
            continue
        rle = mask_to_rle(ids == segment["id"])
        annotations.append(
            {
                "image_id": image_id,
                "category_id": segment["category_id"],
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": mask_util.toBbox(rle).tolist(),
                "iscrowd": int(segment.get("iscrowd", 0)),
            }
        )
    return annotations


def panoptic_to_coco_instances(panoptic_json: Mapping, gt_folder: str | os.PathLike) -> dict:
    """A COCO instances dataset from a COCO panoptic one: thing categories and their segments."""
    gt_folder = Path(gt_folder)
    thing_categories = [dict(c) for c in panoptic_json["categories"] if c.get("isthing", 0) == 1]
    thing_ids = {c["id"] for c in thing_categories}
    images, annotations = [], []
    image_records = {image["id"]: image for image in panoptic_json.get("images", [])}
    for annotation in panoptic_json["annotations"]:
        image_id, png = annotation["image_id"], gt_folder / annotation["file_name"]
        if not png.is_file():
            raise EvaluationInputError(f"image {image_id}: ground truth PNG {png} is missing")
        ids = read_panoptic_png(png)
        record = image_records.get(image_id, {"id": image_id, "file_name": annotation["file_name"]})
        images.append({**record, "height": ids.shape[0], "width": ids.shape[1]})
        annotations += instances_from_panoptic(image_id, ids, annotation["segments_info"], thing_ids)
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
    return {"images": images, "annotations": annotations, "categories": thing_categories}


def check_results(gt_dataset: Mapping, results: Sequence[Mapping]) -> None:
    image_ids = {image["id"] for image in gt_dataset["images"]}
    category_ids = {category["id"] for category in gt_dataset["categories"]}
    for number, result in enumerate(results):
        missing = {"image_id", "category_id", "segmentation", "score"} - set(result)
        if missing:
            raise EvaluationInputError(f"result #{number}: missing keys {sorted(missing)}")
        if result["image_id"] not in image_ids:
            raise EvaluationInputError(f"result #{number}: unknown image id {result['image_id']}")
        if result["category_id"] not in category_ids:
            raise EvaluationInputError(
                f"result #{number} (image {result['image_id']}): unknown category id {result['category_id']}"
            )


def evaluate_segm(gt_dataset: Mapping, results: Sequence[Mapping]) -> dict:
    """COCOeval segm on an in-memory dataset and results: the 12 summary stats (fractions; -1 where
    undefined) and "per_class" AP by category id."""
    check_results(gt_dataset, results)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = dict(gt_dataset)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    metrics["per_class"] = _per_class_ap(evaluator)
    return metrics


def _empty_results(coco_gt: COCO) -> COCO:
    # loadRes cannot take an empty list; COCOeval needs a COCO with the same images and no annotations.
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": coco_gt.dataset["images"],
        "categories": coco_gt.dataset["categories"],
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _per_class_ap(evaluator: COCOeval) -> dict:
    """AP per category (all areas, 100 detections), averaged over IoU thresholds and recall points that
    are defined; -1 for a category without ground truth."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[int(category_id)] = float(values.mean()) if values.size else -1.0
    return per_class


def is_panoptic_json(document: Mapping) -> bool:
    annotations = document.get("annotations", [])
    return bool(annotations) and "segments_info" in annotations[0]


def instance_ap_compute(
    gt_json_file: str | os.PathLike,
    results_json_file: str | os.PathLike,
    gt_folder: str | os.PathLike | None = None,
) -> dict:
    """AP of COCO results against ground truth given as COCO instances JSON or COCO panoptic JSON (detected
    by "segments_info" in its annotations; its PNGs in gt_folder, by default the JSON path without .json)."""
    gt_json = load_json(gt_json_file, keys=("annotations", "categories"))
    results = load_json(results_json_file, expected=(list, dict))
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise EvaluationInputError(f"{results_json_file}: expected a list of COCO results")
    if is_panoptic_json(gt_json):
        gt_json = panoptic_to_coco_instances(
            gt_json, default_folder(gt_json_file) if gt_folder is None else gt_folder
        )
    elif "images" not in gt_json:
        raise EvaluationInputError(f"{gt_json_file} lacks the keys ['images'] of a COCO instances file")
    return evaluate_segm(gt_json, results)


class InstanceEvaluator:
    """In-memory instance AP: collects ground-truth instances and predictions image by image; mergeable.

    categories: COCO category dicts with "id" and "isthing"; only thing categories are evaluated."""

    def __init__(self, categories: Sequence[Mapping]):
        self.categories = [dict(c) for c in categories if c.get("isthing", 0) == 1]
        if not self.categories:
            raise ValueError("categories has no thing category (isthing == 1) to evaluate")
        self.thing_ids = {c["id"] for c in self.categories}
        self.images: list[dict] = []
        self.image_ids: set = set()
        self.gt_annotations: list[dict] = []
        self.results: list[dict] = []

    def update(
        self, image_id, gt_ids, gt_segments: Sequence[Mapping], pred_masks, pred_scores, pred_category_ids
    ) -> None:
        """One image: panoptic ground truth (ids [H, W], segments_info) and N predicted instances (bool
        masks [N, H, W], scores [N], COCO category ids [N]); numpy arrays or torch tensors."""
        gt_ids = _numpy(gt_ids)
        pred_masks, pred_scores, pred_category_ids = (
            _numpy(pred_masks),
            _numpy(pred_scores),
            _numpy(pred_category_ids),
        )
        if pred_masks.ndim != 3 or pred_masks.shape[1:] != gt_ids.shape:
            raise ValueError(
                f"image {image_id}: pred_masks must be [N, {gt_ids.shape[0]}, {gt_ids.shape[1]}], got {pred_masks.shape}"
            )
        if not len(pred_scores) == len(pred_category_ids) == len(pred_masks):
            raise ValueError(
                f"image {image_id}: {len(pred_masks)} masks, {len(pred_scores)} scores, {len(pred_category_ids)} category ids"
            )
        if image_id in self.image_ids:
            raise EvaluationInputError(f"image {image_id}: added twice")
        self.image_ids.add(image_id)
        self.images.append({"id": image_id, "height": gt_ids.shape[0], "width": gt_ids.shape[1]})
        self.gt_annotations += instances_from_panoptic(image_id, gt_ids, gt_segments, self.thing_ids)
        for mask, score, category_id in zip(pred_masks, pred_scores, pred_category_ids):
            self.results.append(
                {
                    "image_id": image_id,
                    "category_id": int(category_id),
                    "segmentation": mask_to_rle(mask > 0),
                    "score": float(score),
                }
            )

    def merge(self, other: InstanceEvaluator) -> InstanceEvaluator:
        if other.thing_ids != self.thing_ids:
            raise ValueError("cannot merge InstanceEvaluators built with different categories")
        duplicated = self.image_ids & other.image_ids
        if duplicated:
            raise EvaluationInputError(f"images {sorted(duplicated, key=str)[:10]} are in both evaluators")
        self.images += other.images
        self.image_ids |= other.image_ids
        self.gt_annotations += other.gt_annotations
        self.results += other.results
        return self

    def compute(self) -> dict:
        """COCOeval on everything added. Images, annotations and results are put in image-id order first
        (stable, so each image keeps its own order): annotation ids and COCOeval's tie-breaking between equal
        scores then do not depend on how the images were split between evaluators or merged."""
        gt_annotations = sorted(self.gt_annotations, key=_by_image)
        annotations = [{**annotation, "id": number} for number, annotation in enumerate(gt_annotations, start=1)]
        images = sorted(self.images, key=lambda image: _image_order(image["id"]))
        dataset = {"images": images, "annotations": annotations, "categories": self.categories}
        return evaluate_segm(dataset, sorted(self.results, key=_by_image))


def _image_order(image_id) -> tuple[str, int | str]:
    """Sort key of an image id that may be an int or a str."""
    return type(image_id).__name__, image_id


def _by_image(record: Mapping) -> tuple[str, int | str]:
    return _image_order(record["image_id"])


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
