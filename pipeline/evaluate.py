"""Evaluate segmentation predictions stored on disk.

    python -m pipeline.evaluate panoptic --gt-json F --gt-folder D --pred-json F --pred-folder D [--json-out F]
    python -m pipeline.evaluate instance --gt-json F --results-json F [--gt-folder D] [--json-out F]
    python -m pipeline.evaluate semantic --gt-folder D --pred-folder D --num-classes K [--ignore-label 255]
    python -m pipeline.evaluate model --checkpoint model.pt --shards DIR [--classes classes.json]
        [--metrics pq ap miou] [--num-workers N] [--max-images M] [--multiscale] [--out DIR] [--json-out F]

panoptic: COCO panoptic PNG + JSON on both sides; PQ/SQ/RQ identical to panopticapi's pq_compute, and
--json-out writes the same structure it returns. instance: ground truth as COCO instances JSON, or COCO
panoptic JSON (detected by "segments_info"; its PNGs in --gt-folder); predictions as COCO results JSON
(RLE segmentations). semantic: single-channel label PNGs with the same file names in both folders.
model: runs a model file (model.convert.load_checkpoint format) on a split's shards, over N Ray workers
when --num-workers N > 1 (pipeline/evaluate_model.py); --out receives the predictions in the three formats
above (re-scorable by the other subcommands), pictures and metrics.json.
Bad input exits with status 2 and a message naming the image and the problem.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.evaluation.instance import STAT_NAMES, instance_ap_compute
from pipeline.evaluation.panoptic import pq_compute
from pipeline.evaluation.panoptic_format import EvaluationInputError, load_json
from pipeline.evaluation.semantic import semantic_compute


def _percent(value: float) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0
        else f"{100 * value:.2f}"
    )


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
        per_class.add_row(
            f"{name} ({category_id})", _percent(row["pq"]), _percent(row["sq"]), _percent(row["rq"])
        )
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
    for name, iou, accuracy in zip(
        results["class_names"], results["per_class_iou"], results["per_class_acc"]
    ):
        per_class.add_row(name, _percent(iou), _percent(accuracy))
    return [summary, per_class]


def run_panoptic(args) -> tuple[dict, list[Table]]:
    results = pq_compute(
        args.gt_json, args.pred_json, args.gt_folder, args.pred_folder, num_threads=args.threads
    )
    names = {c["id"]: c.get("name", str(c["id"])) for c in load_json(args.gt_json)["categories"]}
    return results, panoptic_table(results, names)


def run_instance(args) -> tuple[dict, list[Table]]:
    results = instance_ap_compute(args.gt_json, args.results_json, args.gt_folder)
    names = {c["id"]: c.get("name", str(c["id"])) for c in load_json(args.gt_json)["categories"]}
    return results, instance_table(results, names)


def run_semantic(args) -> tuple[dict, list[Table]]:
    results = semantic_compute(args.gt_folder, args.pred_folder, args.num_classes, args.ignore_label)
    return results, semantic_table(results)


def run_model(args) -> tuple[dict, list[Table]]:
    from pipeline.evaluate_model import evaluate_model

    result = evaluate_model(
        args.checkpoint, args.shards, classes=args.classes, metrics=args.metrics, num_workers=args.num_workers,
        max_images=args.max_images, batch_size=args.batch_size, multiscale=args.multiscale, out=args.out,
        pictures=args.pictures, device=args.device,
    )
    return result, model_tables(result)


def model_tables(result: dict) -> list[Table]:
    """The headline numbers, then each task's tables (classes named, keyed by contiguous id)."""
    headline = Table(title=f"Model evaluation: {result['num_images']} images in {result['seconds']:.1f} s")
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


def _add_model_parser(tasks) -> argparse.ArgumentParser:
    model = tasks.add_parser("model", help="run a model file on a split's shards (optionally over Ray workers)")
    model.add_argument("--checkpoint", required=True, help="model file (model.convert.load_checkpoint format)")
    model.add_argument("--shards", required=True, help="split folder holding manifest.json and the shards")
    model.add_argument("--classes", default=None, help="classes.json exported with the model; default: the manifest's")
    model.add_argument("--metrics", nargs="+", choices=("pq", "ap", "miou"), default=["pq", "ap", "miou"])
    model.add_argument("--num-workers", type=int, default=1, help="Ray workers, each evaluating a part of the split")
    model.add_argument("--max-images", type=int, default=None, help="evaluate at most this many images")
    model.add_argument("--batch-size", type=int, default=1)
    model.add_argument("--multiscale", action="store_true", help="multi-scale + flip semantic inference")
    model.add_argument("--out", default=None, help="folder for predictions, pictures and metrics.json")
    model.add_argument("--pictures", type=int, default=4, help="example images per task drawn under --out")
    model.add_argument("--device", default=None, help="cpu or cuda; default: cuda when available")
    model.set_defaults(run=run_model)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    panoptic = tasks.add_parser("panoptic", help="PQ / SQ / RQ (panopticapi definition)")
    panoptic.add_argument("--gt-json", required=True)
    panoptic.add_argument("--gt-folder", default=None, help="default: --gt-json without .json")
    panoptic.add_argument("--pred-json", required=True)
    panoptic.add_argument("--pred-folder", default=None, help="default: --pred-json without .json")
    panoptic.add_argument("--threads", type=int, default=1, help="PNG decoding threads")
    panoptic.set_defaults(run=run_panoptic)
    instance = tasks.add_parser("instance", help="COCO segm AP through pycocotools")
    instance.add_argument("--gt-json", required=True, help="COCO instances JSON or COCO panoptic JSON")
    instance.add_argument("--gt-folder", default=None, help="panoptic PNGs when --gt-json is panoptic")
    instance.add_argument("--results-json", required=True, help="COCO results: list of RLE segmentations")
    instance.set_defaults(run=run_instance)
    semantic = tasks.add_parser("semantic", help="mIoU, pixel and mean accuracy")
    semantic.add_argument("--gt-folder", required=True)
    semantic.add_argument("--pred-folder", required=True)
    semantic.add_argument("--num-classes", type=int, required=True)
    semantic.add_argument("--ignore-label", type=int, default=255)
    semantic.set_defaults(run=run_semantic)
    model = _add_model_parser(tasks)
    for subparser in (panoptic, instance, semantic, model):
        subparser.add_argument("--json-out", default=None, help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        results, tables = args.run(args)
    except (EvaluationInputError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for table in tables:
        console.print(table)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
