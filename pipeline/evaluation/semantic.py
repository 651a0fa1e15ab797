"""Semantic segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel and mean accuracy.

Follows detectron2's SemSegEvaluator (the one OneFormer reports): pixels whose label is `ignore_label` are
left out; a class's IoU and accuracy are defined only when it occurs in the ground truth, and the means run
over those classes (classes that are only predicted lower the IoU of the classes they cover, not the mean's
count). Undefined per-class values are NaN.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.evaluation.panoptic_format import EvaluationInputError, open_image


class SemanticEvaluator:
    """Accumulates a [K, K] confusion matrix (rows ground truth, columns prediction); mergeable."""

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} collides with a class id in [0, {num_classes})")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = (
            list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
        )
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction, ground_truth, image_id=None) -> None:
        """One image (or a batch of the same shape): integer class maps, numpy or torch."""
        where = f"image {image_id}" if image_id is not None else "update"
        prediction, ground_truth = _numpy(prediction), _numpy(ground_truth)
        if prediction.shape != ground_truth.shape:
            raise EvaluationInputError(
                f"{where}: prediction shape {prediction.shape} != ground truth shape {ground_truth.shape}"
            )
        valid = ground_truth != self.ignore_label
        gt, pred = ground_truth[valid].astype(np.int64), prediction[valid].astype(np.int64)
        self._check_range(gt, "ground truth", where)
        self._check_range(pred, "prediction", where)
        self.confusion = self.confusion + np.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def _check_range(self, labels: np.ndarray, side: str, where: str) -> None:
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise EvaluationInputError(
                f"{where}: {side} has labels {np.unique(bad)[:10].tolist()} outside [0, {self.num_classes}) "
                f"(ignore label {self.ignore_label})"
            )

    def merge(self, other: SemanticEvaluator) -> SemanticEvaluator:
        if (other.num_classes, other.ignore_label) != (self.num_classes, self.ignore_label):
            raise ValueError("cannot merge SemanticEvaluators with different num_classes or ignore_label")
        # Not in place: a confusion matrix that came through Ray is a read-only view of its object store.
        self.confusion = self.confusion + other.confusion
        return self

    def compute(self) -> dict:
        true_positive = np.diag(self.confusion).astype(np.float64)
        gt_pixels = self.confusion.sum(axis=1).astype(np.float64)
        pred_pixels = self.confusion.sum(axis=0).astype(np.float64)
        union = gt_pixels + pred_pixels - true_positive
        in_gt = gt_pixels > 0
        iou = np.full(self.num_classes, np.nan)
        accuracy = np.full(self.num_classes, np.nan)
        iou[in_gt] = true_positive[in_gt] / union[in_gt]
        accuracy[in_gt] = true_positive[in_gt] / gt_pixels[in_gt]
        total = gt_pixels.sum()
        return {
            "mIoU": float(iou[in_gt].mean()) if in_gt.any() else float("nan"),
            "fwIoU": float((iou[in_gt] * gt_pixels[in_gt]).sum() / total) if total else float("nan"),
            "mACC": float(accuracy[in_gt].mean()) if in_gt.any() else float("nan"),
            "pACC": float(true_positive.sum() / total) if total else float("nan"),
            "per_class_iou": iou.tolist(),
            "per_class_acc": accuracy.tolist(),
            "class_names": list(self.class_names),
        }


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    with open_image(path) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise EvaluationInputError(f"{path}: label PNG must be single-channel, got mode {image.mode}")
        try:
            return np.asarray(image)
        except OSError as error:  # truncated or damaged pixel data
            raise EvaluationInputError(f"{path} is not a readable image: {error}") from error


def semantic_compute(
    gt_folder: str | os.PathLike, pred_folder: str | os.PathLike, num_classes: int, ignore_label: int = 255
) -> dict:
    """Metrics over every PNG of gt_folder, each paired with the PNG of the same name in pred_folder."""
    gt_folder, pred_folder = Path(gt_folder), Path(pred_folder)
    for folder, side in ((gt_folder, "ground truth"), (pred_folder, "prediction")):
        if not folder.is_dir():
            raise EvaluationInputError(f"{side} folder {folder} does not exist")
    gt_files = sorted(gt_folder.glob("*.png"))
    if not gt_files:
        raise EvaluationInputError(f"ground truth folder {gt_folder} has no PNG files")
    evaluator = SemanticEvaluator(num_classes, ignore_label)
    for gt_file in gt_files:
        pred_file = pred_folder / gt_file.name
        if not pred_file.is_file():
            raise EvaluationInputError(f"image {gt_file.stem}: prediction PNG {pred_file} is missing")
        evaluator.update(read_label_png(pred_file), read_label_png(gt_file), image_id=gt_file.stem)
    return evaluator.compute()


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
