"""Run a job file: `python -m pipeline.job jobs/NAME.yaml`, or `./jobs/NAME.yaml` through its shebang, which is
what `ray job submit --working-dir . -- ./jobs/NAME.yaml` executes on a cluster.

The file is validated completely before anything starts; then the stages its kind needs run in order
(synthetic data when asked for, shard preprocessing, training, evaluation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import JobConfig, JobConfigError, load_job

log = logging.getLogger("pipeline.job")


def ensure_synthetic_dataset(job: JobConfig) -> None:
    """Generate the embedded dataset at data.root unless a previous run already did."""
    from pipeline.synthetic import GeneratorSettings, generate_dataset

    settings = job.synthetic_dataset
    root = Path(job.data.root)
    if (root / "annotations" / f"panoptic_{job.data.train_split}.json").exists():
        log.info("synthetic dataset already at %s", root)
        return
    log.info("generating %d synthetic images at %s", settings.num_images, root)
    generate_dataset(root, settings.num_images, settings.seed, settings.val_fraction,
                     GeneratorSettings(min_size=settings.min_size, max_size=settings.max_size))


def run_preprocess_stage(job: JobConfig) -> list[dict]:
    from pipeline.data.preprocess import run_preprocess

    summaries = run_preprocess(job.data, job.preprocess)
    for summary in summaries:
        print(f"shards {summary['split']}: {summary['num_samples']} samples ({summary['num_skipped']} skipped) "
              f"in {summary['num_shards']} shards ({summary['shards_written']} written, {summary['shards_reused']} "
              f"reused) -> {summary['output']}")
    return summaries


def _connect_ray(job: JobConfig) -> bool:
    """One Ray connection for every stage of the job; True when this process started Ray."""
    from pipeline.cluster import connect_ray

    uses_ray = (job.kind == "train" or (job.kind == "evaluate" and job.evaluation.num_workers > 1)
                or (job.preprocess is not None and job.preprocess.executor == "ray"))
    if not uses_ray:
        return False
    return connect_ray(job.preprocess.ray_address if job.kind == "preprocess" else job.scaling.ray_address)


def run_evaluation_stage(job: JobConfig) -> dict:
    from rich.console import Console

    from pipeline.evaluation.report import model_tables
    from pipeline.evaluation.runner import evaluate_model
    from pipeline.registry import local_model_file
    from pipeline.tracking import resolve_tracking_uri

    evaluation = job.evaluation
    checkpoint = local_model_file(evaluation.checkpoint, resolve_tracking_uri(job))
    result = evaluate_model(checkpoint, f"{job.evaluation_shards().rstrip('/')}/{job.data.val_split}",
                            metrics=evaluation.metrics, num_workers=evaluation.num_workers,
                            max_images=evaluation.max_images, multiscale=evaluation.semantic_multiscale,
                            test_size=evaluation.test_size, out=evaluation.output, pictures=job.tracking.log_pictures)
    console = Console()
    for table in model_tables(result):
        console.print(table)
    if evaluation.output is not None:
        print(f"predictions, pictures and metrics.json: {evaluation.output}")
    return result


def check_training_splits(job: JobConfig) -> None:
    """On the driver, before any worker starts: both splits have shards with samples (a worker would
    otherwise fail inside Ray Train, or wait forever for a first batch)."""
    import fsspec

    from pipeline.data.shards import check_not_empty, read_manifest

    for split in (job.data.train_split, job.data.val_split):
        folder = job.split_shards(split)
        fs, root = fsspec.core.url_to_fs(folder)
        check_not_empty(read_manifest(fs, root), folder)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (their message names the file or key and the problem), not a bug: the
    command prints one line and exits 2 for these, a traceback for anything else. Imported when needed, so
    that --check stays light."""
    from pipeline.data.preprocess import PreprocessError
    from pipeline.data.shards import SchemaVersionError, ShardError
    from pipeline.evaluation.panoptic_format import EvaluationInputError
    from pipeline.registry import RegistryError
    from pipeline.tracked_checkpoints import ResumeError

    return (JobConfigError, PreprocessError, ShardError, SchemaVersionError, EvaluationInputError, FileNotFoundError,
            ResumeError, RegistryError)


def run_job(job: JobConfig, overrides: list[str] | None = None) -> None:
    """Run every stage of `job`; `overrides` (the command line's section.key=value) are recorded in MLflow."""
    start_from = None
    if job.kind == "train":  # a checkpoint reference that cannot be resumed fails before any work
        from pipeline.launch import resolve_start

        start_from = resolve_start(job)
    if job.synthetic_dataset is not None:
        ensure_synthetic_dataset(job)
    started_ray = _connect_ray(job)
    try:
        if job.preprocess is not None:
            run_preprocess_stage(job)
        if job.kind == "train":
            from pipeline.launch import run_training

            check_training_splits(job)
            run_training(job, {"job_overrides": " ".join(overrides)} if overrides else {}, start_from)
        elif job.kind == "evaluate":
            run_evaluation_stage(job)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a OneFormer job file.")
    parser.add_argument("job_file", help="path of the job YAML")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a key of the file (value read as YAML), validated like the file")
    parser.add_argument("--check", action="store_true", help="validate the file, print the resolved config, exit")
    parser.add_argument("--new-run", action="store_true",
                        help="train from scratch under a new name (NAME-YYYYmmdd-HHMMSS) instead of continuing the "
                             "job's checkpoints; without it a finished run says so and exits 0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        job = load_job(args.job_file, args.overrides)
    except JobConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.new_run:
        job.name = f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"new run: {job.name}")
    if args.check:
        if args.overrides:
            print(f"# overrides: {' '.join(args.overrides)}")
        print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
        return 0
    try:
        run_job(job, args.overrides)
    except Exception as error:
        if not isinstance(error, user_error_types()):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
