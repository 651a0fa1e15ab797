"""Everything an evaluation shows or writes: headline numbers, rich tables, pictures (examples and per-class
charts), metrics.json, and predictions in the standard formats that `python -m pipeline.evaluate
panoptic|instance|semantic` re-scores to the same numbers:

    panoptic_gt.json + panoptic_gt/*.png   ground truth, COCO panoptic (dataset category ids, pixel areas)
    panoptic.json + panoptic/*.png         panoptic predictions, COCO panoptic
    instances.json                         instance predictions, COCO results with RLE masks
    semantic_gt/*.png, semantic/*.png      class-label PNGs (255 = ignore in the ground truth)

PNGs are written image by image while evaluating (`PredictionFiles`, by whichever worker scores the image);
the JSON files once, after the parts are merged (`write_predictions`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.table import Table

from model.formats import write_label_png, write_panoptic_png
from pipeline.data.readers import ClassInfo
from pipeline.evaluation.instance import STAT_NAMES
from pipeline.evaluation.visualize import save_comparison, save_per_class_bars

if TYPE_CHECKING:
    from pipeline.evaluation.runner import PartialResults

PICTURE_INSTANCE_MIN_SCORE = 0.5
"""Instance predictions overlap and are not thresholded; pictures show only those scoring at least this."""


# ---------------------------------------------------------------------------------------------- numbers
def summarize(details: dict[str, dict]) -> dict[str, float]:
    """The flat headline numbers of per-task results (PartialResults.compute_details), in percent."""
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


# ---------------------------------------------------------------------------------------------- tables
def _percent(value: float) -> str:
    undefined = value is None or (isinstance(value, float) and math.isnan(value)) or value < 0
    return "-" if undefined else f"{100 * value:.2f}"


def panoptic_table(results: dict, category_names: dict) -> list[Table]:
    summary = Table(title="Panoptic quality")
    for column in ("", "PQ", "SQ", "RQ", "N"):
        summary.add_column(column, justify="right")
    for group in ("All", "Things", "Stuff"):
        row = results[group]
        summary.add_row(group, _percent(row["pq"]), _percent(row["sq"]), _percent(row["rq"]), str(row["n"]))
    per_class = Table(title="Per class")
    for column in ("category", "PQ", "SQ", "RQ"):
        per_class.add_column(column, justify="right")
    for category_id, row in results["per_class"].items():
        name = category_names.get(category_id, str(category_id))
        per_class.add_row(f"{name} ({category_id})", _percent(row["pq"]), _percent(row["sq"]), _percent(row["rq"]))
    return [summary, per_class]


def instance_table(results: dict, category_names: dict) -> list[Table]:
    summary = Table(title="Instance segmentation (COCO segm)")
    for name in STAT_NAMES:
        summary.add_column(name, justify="right")
    summary.add_row(*(_percent(results[name]) for name in STAT_NAMES))
    per_class = Table(title="AP per class")
    per_class.add_column("category", justify="right")
    per_class.add_column("AP", justify="right")
    for category_id, value in results["per_class"].items():
        per_class.add_row(f"{category_names.get(category_id, category_id)} ({category_id})", _percent(value))
    return [summary, per_class]


def semantic_table(results: dict) -> list[Table]:
    summary = Table(title="Semantic segmentation")
    for name in ("mIoU", "fwIoU", "mACC", "pACC"):
        summary.add_column(name, justify="right")
    summary.add_row(*(_percent(results[name]) for name in ("mIoU", "fwIoU", "mACC", "pACC")))
    per_class = Table(title="Per class")
    for column in ("class", "IoU", "Acc"):
        per_class.add_column(column, justify="right")
    for name, iou, accuracy in zip(results["class_names"], results["per_class_iou"], results["per_class_acc"]):
        per_class.add_row(name, _percent(iou), _percent(accuracy))
    return [summary, per_class]


def model_tables(result: dict) -> list[Table]:
    """The headline numbers of a model evaluation (runner.evaluate_model's result), then each task's tables
    (classes named, keyed by contiguous id)."""
    skipped = result.get("num_skipped", 0)
    left_out = f", {skipped} skipped ({', '.join(f'{n} {why}' for why, n in result['skipped'].items())})" if skipped else ""
    headline = Table(title=f"Model evaluation: {result['num_images']} images{left_out} in {result['seconds']:.1f} s")
    for name in result["summary"]:
        headline.add_column(name, justify="right")
    headline.add_row(*(f"{value:.2f}" for value in result["summary"].values()))
    names = dict(enumerate(result["classes"]))
    details = result["details"]
    tables = [headline]
    if "panoptic" in details:
        tables += panoptic_table(details["panoptic"], names)
    if "instance" in details:
        tables += instance_table(details["instance"], names)
    if "semantic" in details:
        tables += semantic_table(details["semantic"])
    return tables


# ---------------------------------------------------------------------------------------------- pictures
def instance_map(masks: np.ndarray, scores: np.ndarray, min_score: float = PICTURE_INSTANCE_MIN_SCORE) -> np.ndarray:
    """Overlapping instance masks [M, H, W] -> one id map for pictures: masks scoring at least min_score,
    higher scores painted over lower ones, ids 1.. by rank; 0 elsewhere."""
    painted = np.zeros(masks.shape[1:], dtype=np.int64)
    order = np.argsort(scores, kind="stable")
    for rank, index in enumerate(order):
        if scores[index] >= min_score:
            painted[masks[index]] = len(order) - rank
    return painted


def save_pictures(results: PartialResults, folder: str | os.PathLike,
                  details: dict[str, dict] | None = None) -> list[Path]:
    """Write `<task>_examples.png` (image | ground truth | prediction, one row per kept image) for every task
    with kept images, and the per-class bar charts pq_per_class.png, ap_per_class.png and iou_per_class.png
    of the computed metrics (`details` from results.compute_details, computed if not given)."""
    folder = Path(folder)
    paths = [save_comparison(folder / f"{task}_examples.png", examples, ignore=(0,),
                             title=f"{task}: image | ground truth | prediction")
             for task, examples in results.examples.items() if examples]
    details = results.compute_details() if details is None else details
    classes = results.options.classes
    names = list(classes.names)
    if "panoptic" in details:
        defined = results.evaluators["pq"].defined_classes()
        values = [details["panoptic"]["per_class"][k]["pq"] if defined[k] else math.nan for k in range(len(names))]
        paths.append(save_per_class_bars(folder / "pq_per_class.png", names, values, "PQ"))
    if "instance" in details:
        things = [k for k, thing in enumerate(classes.isthing) if thing]
        values = [details["instance"]["per_class"][k] for k in things]
        paths.append(save_per_class_bars(folder / "ap_per_class.png", [names[k] for k in things], values, "AP"))
    if "semantic" in details:
        paths.append(save_per_class_bars(folder / "iou_per_class.png", names, details["semantic"]["per_class_iou"], "IoU"))
    return paths


# ---------------------------------------------------------------------------------------------- files
def coco_image_id(image_id: str) -> int | str:
    """Shards keep image ids as strings; COCO files use ints where the dataset does."""
    return int(image_id) if str(image_id).isdigit() else str(image_id)


def png_name(image_id: str) -> str:
    """COCO's zero-padded name for numeric ids, else the id with path-unsafe characters replaced."""
    converted = coco_image_id(image_id)
    if isinstance(converted, int):
        return f"{converted:012d}.png"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", converted) + ".png"


def _write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


class PredictionFiles:
    """The standard-format files of one part of a split: PNGs written as images are added, the JSON records
    kept (picklable, mergeable) until `write_predictions`."""

    def __init__(self, folder: str | os.PathLike, classes: ClassInfo):
        self.folder, self.classes = Path(folder), classes
        self.records: dict[str, list[dict]] = {"images": [], "panoptic_gt": [], "panoptic": []}

    def add_ground_truth(self, image_id: str, index_map: np.ndarray, table, gt_segments: list[dict],
                         semantic_gt: np.ndarray | None, panoptic: bool) -> None:
        """The ground truth of one image: semantic_gt/ PNG when given, panoptic_gt/ PNG + record when `panoptic`."""
        name = png_name(image_id)
        height, width = index_map.shape
        self.records["images"].append({"id": coco_image_id(image_id), "file_name": name,
                                       "height": height, "width": width})
        if semantic_gt is not None:
            write_label_png(self.folder / "semantic_gt" / name, semantic_gt)
        if panoptic:
            write_panoptic_png(self.folder / "panoptic_gt" / name, np.concatenate([[0], table.segment_ids])[index_map])
            areas = np.bincount(index_map.ravel(), minlength=len(table) + 1)
            segments = [{"id": int(table.segment_ids[s["id"] - 1]),
                         "category_id": self.classes.category_ids[s["category_id"]],
                         "iscrowd": s["iscrowd"], "area": int(areas[s["id"]])} for s in gt_segments]
            self.records["panoptic_gt"].append({"image_id": coco_image_id(image_id), "file_name": name,
                                                "segments_info": segments})

    def add_panoptic(self, image_id: str, segment_ids: np.ndarray, segments_info) -> None:
        name = png_name(image_id)
        write_panoptic_png(self.folder / "panoptic" / name, segment_ids)
        segments = [{"id": s.id, "category_id": self.classes.category_ids[s.category_id], "score": s.score}
                    for s in segments_info]
        self.records["panoptic"].append({"image_id": coco_image_id(image_id), "file_name": name,
                                         "segments_info": segments})

    def add_semantic(self, image_id: str, labels: np.ndarray) -> None:
        write_label_png(self.folder / "semantic" / png_name(image_id), labels)

    def merge(self, other: PredictionFiles) -> PredictionFiles:
        for name, records in self.records.items():
            records += other.records[name]
        return self


def write_predictions(results: PartialResults) -> dict[str, Path]:
    """Write the JSON files beside the PNGs written image by image; returns them by name ("panoptic_gt",
    "panoptic", "instances")."""
    files, metrics, classes = results.files, results.options.metrics, results.options.classes
    if files is None:
        raise ValueError("write_predictions needs results evaluated with a predictions_folder")
    files.folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    categories = [{"id": cid, "name": name, "isthing": int(thing)}
                  for cid, name, thing in zip(classes.category_ids, classes.names, classes.isthing)]
    if "pq" in metrics or "ap" in metrics:
        written["panoptic_gt"] = _write_json(files.folder / "panoptic_gt.json", {
            "images": files.records["images"], "annotations": files.records["panoptic_gt"], "categories": categories})
    if "pq" in metrics:
        written["panoptic"] = _write_json(files.folder / "panoptic.json", {
            "annotations": files.records["panoptic"], "categories": categories})
    if "ap" in metrics:
        instances = [{**result, "image_id": coco_image_id(result["image_id"]),
                      "category_id": classes.category_ids[result["category_id"]]}
                     for result in results.evaluators["ap"].results]
        written["instances"] = _write_json(files.folder / "instances.json", instances)
    return written


def write_outputs(results: PartialResults, result: dict, out: str | os.PathLike) -> dict[str, str]:
    """Everything of a model evaluation under `out`: the prediction JSON files (when the results kept
    predictions), pictures/ and metrics.json (`result`'s summary, details, num_images, num_skipped, skipped,
    classes)."""
    out = Path(out)
    files = {name: str(path) for name, path in write_predictions(results).items()} if results.files else {}
    for path in save_pictures(results, out / "pictures", result["details"]):
        files[f"pictures/{path.name}"] = str(path)
    metrics_file = out / "metrics.json"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    keys = ("summary", "details", "num_images", "num_skipped", "skipped", "classes")
    metrics_file.write_text(json.dumps({key: result[key] for key in keys if key in result}, indent=1))
    files["metrics"] = str(metrics_file)
    return files
