"""Evaluate segmentation predictions stored on disk, or a model file on a split's shards.

    python -m pipeline.evaluate panoptic --gt-json F --gt-folder D --pred-json F --pred-folder D [--json-out F]
    python -m pipeline.evaluate instance --gt-json F --results-json F [--gt-folder D] [--json-out F]
    python -m pipeline.evaluate semantic --gt-folder D --pred-folder D --num-classes K [--ignore-label 255]
    python -m pipeline.evaluate model --checkpoint model.pt|models:/NAME/VERSION --shards DIR [--classes classes.json]
        [--metrics pq ap miou] [--num-workers N] [--max-images M] [--multiscale] [--test-size SHORT MAX | none]
        [--out DIR] [--json-out F] [--on-error skip|fail]

panoptic: COCO panoptic PNG + JSON on both sides; PQ/SQ/RQ identical to panopticapi's pq_compute, and
--json-out writes the same structure it returns. instance: ground truth as COCO instances JSON, or COCO
panoptic JSON (detected by "segments_info"; its PNGs in --gt-folder); predictions as COCO results JSON
(RLE segmentations). semantic: single-channel label PNGs with the same file names in both folders.
model: runs a model file (model/checkpoint.py) on a split's shards at the official test size of its dataset
(or --test-size), over N Ray workers when --num-workers N > 1 (pipeline/evaluation/runner.py); --out
receives the predictions in the three formats above (re-scorable by the other subcommands), pictures and
metrics.json (pipeline/evaluation/report.py).
Bad input (a missing, non-JSON or wrongly shaped JSON file, an unreadable PNG, an empty split, a split of which
no image can be read) exits with status 2 and one line naming the file or image and the problem; damaged shards
and samples of a model evaluation are skipped and counted (num_skipped, by reason) unless --on-error fail.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.data.shards import SchemaVersionError, ShardError
from pipeline.evaluation.instance import instance_ap_compute
from pipeline.evaluation.panoptic import pq_compute
from pipeline.evaluation.panoptic_format import EvaluationInputError, load_json
from pipeline.evaluation.report import instance_table, model_tables, panoptic_table, semantic_table
from pipeline.evaluation.semantic import semantic_compute


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
    from pipeline.evaluation.runner import evaluate_model
    from pipeline.registry import local_model_file

    result = evaluate_model(
        local_model_file(args.checkpoint), args.shards, classes=args.classes, metrics=args.metrics, num_workers=args.num_workers,
        max_images=args.max_images, batch_size=args.batch_size, multiscale=args.multiscale,
        test_size=_test_size(args.test_size), out=args.out, pictures=args.pictures, device=args.device,
        on_error=args.on_error,
    )
    return result, model_tables(result)


def _test_size(values: list[str] | None) -> tuple[int, int] | str | None:
    """--test-size: absent -> None (the model's official size), "none", or SHORT MAX."""
    if values is None or values == ["none"]:
        return None if values is None else "none"
    if len(values) != 2 or not all(value.isdigit() for value in values):
        raise ValueError(f"--test-size takes SHORT MAX (two integers) or none, got {' '.join(values)}")
    return int(values[0]), int(values[1])


def _add_model_parser(tasks) -> argparse.ArgumentParser:
    model = tasks.add_parser("model", help="run a model file on a split's shards (optionally over Ray workers)")
    model.add_argument("--checkpoint", required=True,
                       help="model file (model/checkpoint.py format), or models:/<name>/<version> or "
                            "models:/<name>@<alias> from the MLflow Model Registry (MLFLOW_TRACKING_URI)")
    model.add_argument("--shards", required=True, help="split folder holding manifest.json and the shards")
    model.add_argument("--classes", default=None,
                       help="a classes.json; default: the classes inside the model file, else the classes.json "
                            "beside it, else the shard manifest's")
    model.add_argument("--metrics", nargs="+", choices=("pq", "ap", "miou"), default=["pq", "ap", "miou"])
    model.add_argument("--num-workers", type=int, default=1, help="Ray workers, each evaluating a part of the split")
    model.add_argument("--max-images", type=int, default=None, help="evaluate at most this many images")
    model.add_argument("--batch-size", type=int, default=1)
    model.add_argument("--multiscale", action="store_true", help="multi-scale + flip semantic inference")
    model.add_argument("--test-size", nargs="+", default=None, metavar="SHORT MAX | none",
                       help="ResizeShortestEdge before the model; default: the official size of the model's "
                            "dataset (ADE20K 640 2560, COCO 800 1333, ...); none: each image at its own size")
    model.add_argument("--out", default=None, help="folder for predictions, pictures and metrics.json")
    model.add_argument("--pictures", type=int, default=4, help="example images per task drawn under --out")
    model.add_argument("--device", default=None, help="cpu or cuda; default: cuda when available")
    model.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                       help="damaged shards and samples: skip (logged, counted by reason) or fail")
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
    except (EvaluationInputError, ValueError, FileNotFoundError, ShardError, SchemaVersionError) as error:  # RegistryError too
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
