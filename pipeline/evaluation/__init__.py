"""Evaluation, in one package:

    panoptic.py, instance.py, semantic.py   the metrics: PQ (panopticapi's rules), AP (pycocotools), mIoU; each
                                             an in-memory evaluator whose merge is exact, and a function on files
    panoptic_format.py                       COCO panoptic PNG/JSON reading and writing
    runner.py                                evaluate(model, loader, options) -> PartialResults (mergeable), used by
                                             the trainer and by evaluate_model (one process or Ray workers)
    report.py                                tables, pictures, metrics.json, standard-format prediction files
    visualize.py                             overlays and per-class bar charts

`python -m pipeline.evaluate` (pipeline/evaluate.py) is the command line over runner and report.
"""

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
