"""Panoptic quality: pipeline.evaluation.pq_compute against panopticapi's pq_compute on the same files.

Writes N random ground-truth / prediction PNG pairs (COCO panoptic format), then times, in the same run:
panopticapi with its default multiprocessing pool, panopticapi in one process (its single-core function),
ours in one thread, and ours with PNG decoding in T threads (still one process). Checks every number of the
results is identical (to 1e-12) and prints the speed ratios.

    .venv/bin/python benchmarks/bench_pq.py --num-images 300 --height 480 --width 640
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time

import numpy as np
from panopticapi import evaluation as panopticapi_evaluation

from pipeline.evaluation.panoptic import pq_compute
from pipeline.evaluation.random_panoptic import write_random_panoptic_dataset


def panopticapi_single_process(gt_json_file, pred_json_file, gt_folder, pred_folder) -> dict:
    """panopticapi's pq_compute with its per-core function called directly instead of through a Pool."""
    original = panopticapi_evaluation.pq_compute_multi_core

    def one_core(matched_annotations_list, gt_folder, pred_folder, categories):
        return panopticapi_evaluation.pq_compute_single_core(
            0, matched_annotations_list, gt_folder, pred_folder, categories
        )

    panopticapi_evaluation.pq_compute_multi_core = one_core
    try:
        return panopticapi_evaluation.pq_compute(gt_json_file, pred_json_file, gt_folder, pred_folder)
    finally:
        panopticapi_evaluation.pq_compute_multi_core = original


def timed(function, repeats: int) -> tuple[float, dict]:
    """Best wall time of `repeats` calls (panopticapi's prints swallowed) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            result = function()
            best = min(best, time.perf_counter() - start)
    return best, result


def max_difference(ours: dict, reference: dict) -> float:
    worst = 0.0
    for group in ("All", "Things", "Stuff"):
        if ours[group]["n"] != reference[group]["n"]:
            raise AssertionError(f"{group}: n differs: {ours[group]['n']} vs {reference[group]['n']}")
        worst = max(worst, *(abs(ours[group][m] - reference[group][m]) for m in ("pq", "sq", "rq")))
    for category_id, metrics in reference["per_class"].items():
        worst = max(worst, *(abs(ours["per_class"][category_id][m] - v) for m, v in metrics.items()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_random_panoptic_dataset(
            tmp, args.num_images, seed=0, height=args.height, width=args.width
        )
        files = [str(paths[k]) for k in ("gt_json", "pred_json", "gt_folder", "pred_folder")]
        runs = {
            "panopticapi, multiprocessing pool": lambda: panopticapi_evaluation.pq_compute(*files),
            "panopticapi, one process": lambda: panopticapi_single_process(*files),
            "ours, one thread": lambda: pq_compute(*files, num_threads=1),
            f"ours, {args.threads} decoding threads": lambda: pq_compute(*files, num_threads=args.threads),
        }
        times, results = {}, {}
        for name, function in runs.items():
            times[name], results[name] = timed(function, args.repeats)
    reference_name = "panopticapi, one process"
    print(
        f"{args.num_images} image pairs of {args.height}x{args.width}, {os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    for name, seconds in times.items():
        worst = max_difference(results[name], results[reference_name])
        if worst > 1e-12:
            raise AssertionError(f"{name}: results differ from panopticapi by {worst}")
        ratio = times[reference_name] / seconds
        print(
            f"{name:38s} {seconds * 1e3 / args.num_images:7.2f} ms/image  "
            f"{ratio:6.2f}x vs panopticapi one process   max |diff| {worst:.1e}"
        )
    print(json.dumps(results["ours, one thread"]["All"]))


if __name__ == "__main__":
    main()
