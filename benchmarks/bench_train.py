"""Training throughput of the real training job (Ray Train + DeepSpeed ZeRO-2 + streaming from shards) for the
tiny preset on this machine's CPU, with 1 and 2 workers in the same run: images/s per worker and the share of
step time spent waiting for data, read back from the job's MLflow metrics (the first logged step, which holds
start-up, is left out).

    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--workers 1 2] [--crop 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import mlflow
import torch
import yaml

from pipeline.job import main as run_job_file

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"


def job_document(name: str, workers: int, steps: int, crop: int) -> dict:
    document = yaml.safe_load(DEMO.read_text())
    document["name"] = name
    document["tracking"]["experiment"] = name
    document["tracking"]["log_pictures"] = 0
    document["stream"].update(crop_size=crop, resize_base=crop)
    document["training"].update(max_steps=steps, log_every=1, checkpoint_every=10**6,
                                global_batch_size=document["stream"]["batch_size"] * workers)
    document["scaling"]["num_workers"] = workers
    document["evaluation"]["max_images"] = 1
    return document


def measure(workdir: Path, workers: int, steps: int, crop: int) -> dict:
    name = f"bench_train_{workers}w"
    job_file = workdir / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(job_document(name, workers, steps, crop)))
    assert run_job_file([str(job_file)]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])

    def steady(metric: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run.info.run_id, metric) if m.step > 1]

    images_per_second = statistics.median(steady("images_per_second"))
    return {"workers": workers, "images_per_second": images_per_second,
            "images_per_second_per_worker": images_per_second / workers,
            "data_wait_share": statistics.mean(steady("data_wait_share"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--crop", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["ONEFORMER_WORKDIR"] = folder
        results = [measure(Path(folder), workers, args.steps, args.crop) for workers in args.workers]
    print(f"\ntiny preset, crop {args.crop}, batch 2 per worker, ZeRO-2 fp32, {args.steps} steps; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'workers':>8} {'images/s':>10} {'images/s/worker':>16} {'data wait':>10}")
    for result in results:
        print(f"{result['workers']:>8} {result['images_per_second']:>10.2f} "
              f"{result['images_per_second_per_worker']:>16.2f} {100 * result['data_wait_share']:>9.1f}%")
    base = results[0]["images_per_second"]
    for result in results[1:]:
        print(f"scaling {results[0]['workers']} -> {result['workers']} workers: {result['images_per_second'] / base:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
