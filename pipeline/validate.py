"""Validation of a model on the evaluation shards: each metric with the task token it belongs to (PQ with
panoptic, AP with instance, mIoU with semantic), computed in memory by pipeline.evaluation."""

from __future__ import annotations

import numpy as np
import torch

from model.inference import InferenceThresholds, postprocess
from pipeline.data.readers import ClassInfo
from pipeline.evaluation.instance import InstanceEvaluator
from pipeline.evaluation.panoptic import PanopticEvaluator
from pipeline.evaluation.semantic import SemanticEvaluator

TASK_OF_METRIC = {"pq": "panoptic", "ap": "instance", "miou": "semantic"}
IGNORE_LABEL = 255


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


class Validator:
    """Accumulates the requested metrics over evaluation batches."""

    def __init__(self, classes: ClassInfo, thresholds: InferenceThresholds, metrics: list[str]):
        self.classes = classes
        self.thresholds = thresholds
        self.metrics = [m for m in metrics if m != "ap" or any(classes.isthing)]
        categories = categories_of(classes)
        self.evaluators = {
            "pq": PanopticEvaluator(categories) if "pq" in self.metrics else None,
            "ap": InstanceEvaluator(categories) if "ap" in self.metrics else None,
            "miou": SemanticEvaluator(classes.num_classes, IGNORE_LABEL, list(classes.names)) if "miou" in self.metrics else None,
        }

    @torch.no_grad()
    def add_batch(self, model: torch.nn.Module, batch: dict, device: torch.device, dtype: torch.dtype) -> None:
        images = batch["images"].to(device=device, dtype=dtype)
        sizes = [tuple(size) for size in batch["image_sizes"]]
        for metric in self.metrics:
            task = TASK_OF_METRIC[metric]
            outputs = model(images, [task] * len(sizes))
            outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_masks")}
            results = postprocess(outputs, [task] * len(sizes), sizes, sizes, list(self.classes.isthing),
                                  self.thresholds, padded_size=tuple(images.shape[-2:]))
            for image_id, index_map, table, result in zip(batch["image_ids"], batch["index_maps"], batch["segments"], results):
                self._add(metric, image_id, index_map.numpy(), table, result)

    def _add(self, metric: str, image_id, index_map: np.ndarray, table, result) -> None:
        if metric == "pq":
            predicted = [{"id": s.id, "category_id": s.category_id, "isthing": int(s.isthing)} for s in result.segments_info]
            self.evaluators["pq"].update(index_map, ground_truth_segments(index_map, table),
                                         result.segment_ids.cpu().numpy(), predicted, image_id=image_id)
        elif metric == "ap":
            self.evaluators["ap"].update(image_id, index_map, ground_truth_segments(index_map, table),
                                         result.masks.cpu().numpy(), result.scores.cpu().numpy(), result.labels.cpu().numpy())
        else:
            self.evaluators["miou"].update(result.labels.cpu().numpy(), semantic_ground_truth(index_map, table), image_id=image_id)

    def compute(self) -> dict[str, float]:
        """Flat headline numbers: PQ/SQ/RQ (all, things, stuff), AP, mIoU and pixel accuracy, in percent."""
        summary: dict[str, float] = {}
        if self.evaluators["pq"] is not None:
            pq = self.evaluators["pq"].compute()
            for group, prefix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
                for key in ("pq", "sq", "rq"):
                    summary[f"{key.upper()}{prefix}"] = 100 * pq[group][key]
        if self.evaluators["ap"] is not None:
            summary["AP"] = 100 * max(self.evaluators["ap"].compute()["AP"], 0.0)
        if self.evaluators["miou"] is not None:
            semantic = self.evaluators["miou"].compute()
            summary["mIoU"] = 100 * semantic["mIoU"]
            summary["pixel_accuracy"] = 100 * semantic["pACC"]
        return summary
