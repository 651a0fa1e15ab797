"""Evaluation metrics: panoptic quality (panopticapi-identical), instance AP (pycocotools), semantic mIoU."""

from pipeline.evaluation.instance import InstanceEvaluator, instance_ap_compute, panoptic_to_coco_instances
from pipeline.evaluation.panoptic import PanopticEvaluator, count_id_pairs, pq_compute
from pipeline.evaluation.panoptic_format import (
    EvaluationInputError,
    ids_to_rgb,
    read_panoptic_png,
    rgb_to_ids,
    write_panoptic_predictions,
)
from pipeline.evaluation.semantic import SemanticEvaluator, semantic_compute

__all__ = [
    "EvaluationInputError",
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "count_id_pairs",
    "ids_to_rgb",
    "instance_ap_compute",
    "panoptic_to_coco_instances",
    "pq_compute",
    "read_panoptic_png",
    "rgb_to_ids",
    "semantic_compute",
    "write_panoptic_predictions",
]
