"""Panoptic quality: pipeline.evaluation.pq_compute against panopticapi's pq_compute on the same files.

Writes N random ground-truth / prediction PNG pairs (COCO panoptic format), then times, in the same run:
panopticapi with its default multiprocessing pool, panopticapi in one process (its single-core function),
ours in one thread, and ours with PNG decoding in T threads (still one process). Checks every number of the
results is identical (to 1e-12) and prints the speed ratios. It also times Pillow decoding the PNGs alone:
no evaluator that decodes with Pillow can beat panopticapi by more than that line's ratio.

    .venv/bin/python benchmarks/bench_pq.py --num-images 300 --height 480 --width 640
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from panopticapi import evaluation as panopticapi_evaluation
from PIL import Image

from pipeline.evaluation.panoptic import pq_compute

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' data generator
from random_panoptic import write_random_panoptic_dataset  # noqa: E402


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


def decode_only(gt_folder, pred_folder) -> dict:
    """Decode every PNG of both folders with Pillow and nothing else: the floor of Pillow-based evaluation."""
    for folder in (gt_folder, pred_folder):
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as image:
                image.load()
    return {}


def timed_round_robin(runs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Best wall and CPU time of each run over `repeats` rounds, the runs interleaved within each round so
    that load from other processes on a shared machine falls on all of them alike; and each last result.
    panopticapi's prints are swallowed."""
    wall, cpu, results = {}, {}, {}
    for _ in range(repeats):
        for name, function in runs.items():
            with contextlib.redirect_stdout(io.StringIO()):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                results[name] = function()
                elapsed_wall, elapsed_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
            wall[name] = min(wall.get(name, float("inf")), elapsed_wall)
            cpu[name] = min(cpu.get(name, float("inf")), elapsed_cpu)
    return wall, cpu, results


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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_random_panoptic_dataset(
            tmp, args.num_images, seed=0, height=args.height, width=args.width
        )
        files = [str(paths[k]) for k in ("gt_json", "pred_json", "gt_folder", "pred_folder")]
        pool_name, reference_name = "panopticapi, multiprocessing pool", "panopticapi, one process"
        decode_name = "Pillow PNG decoding alone (floor)"
        runs = {
            pool_name: lambda: panopticapi_evaluation.pq_compute(*files),
            reference_name: lambda: panopticapi_single_process(*files),
            "ours, one thread": lambda: pq_compute(*files, num_threads=1),
            f"ours, {args.threads} decoding threads": lambda: pq_compute(*files, num_threads=args.threads),
            decode_name: lambda: decode_only(files[2], files[3]),
        }
        wall, cpu, results = timed_round_robin(runs, args.repeats)
    print(
        f"{args.num_images} image pairs of {args.height}x{args.width}, {os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    print(f"{'':38s} {'wall':>8s} {'ratio':>7s}   {'CPU':>8s} {'ratio':>7s}   (ratios vs {reference_name})")
    for name in runs:
        line = f"{name:38s} {wall[name] * 1e3 / args.num_images:5.2f} ms {wall[reference_name] / wall[name]:6.2f}x"
        if name != pool_name:  # the pool's CPU time is spent in child processes
            line += f"   {cpu[name] * 1e3 / args.num_images:5.2f} ms {cpu[reference_name] / cpu[name]:6.2f}x"
        if name != decode_name:
            worst = max_difference(results[name], results[reference_name])
            if worst > 1e-12:
                raise AssertionError(f"{name}: results differ from panopticapi by {worst}")
            line += f"   max |diff| {worst:.1e}"
        print(line)
    print(json.dumps(results["ours, one thread"]["All"]))


if __name__ == "__main__":
    main()
