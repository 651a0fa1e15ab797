"""The Ray side of training: `run_training` starts (or joins) Ray and runs a Ray Train TorchTrainer whose
worker function, `train_worker`, reads only its config, builds the Trainer's context from Ray Train (rank,
world size, the checkpoint to resume, how to report) and runs pipeline/train.py's Trainer."""

from __future__ import annotations

import json
import os

import fsspec
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from rich.console import Console
from rich.table import Table

from pipeline.cluster import connect_ray
from pipeline.config import JobConfig
from pipeline.distributed import configure_deepspeed_environment
from pipeline.tracked_checkpoints import resolve_resume_source
from pipeline.tracking import create_local_store, resolve_tracking_uri

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""What Ray Train writes beside a run's checkpoints; its presence means the job ran before."""


def train_worker(config: dict) -> None:
    """The Ray Train worker function: reads only its config."""
    job = JobConfig.model_validate(config["job"])
    configure_deepspeed_environment(job.scaling.use_gpu)
    torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    from pipeline.train import TrainContext, Trainer  # after the DeepSpeed environment is set

    context = ray.train.get_context()

    def report(metrics: dict, folder: str, name: str) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)

    def trainer_for(resume_from: str | None, fork_from: dict | None = None) -> Trainer:
        return Trainer(job, TrainContext(context.get_world_rank(), context.get_world_size(), report,
                                         config["tracking_uri"], resume_from, config.get("run_tags") or {}, fork_from))

    checkpoint, start = ray.train.get_checkpoint(), config.get("start_from")
    fork_from = None
    if checkpoint is None and start is not None:  # this job's first attempt starts from a tracked checkpoint
        checkpoint = ray.train.Checkpoint(start["uri"])
        fork_from = start if start["mode"] == "fork" else None
    if checkpoint is None:
        trainer = trainer_for(None)
    else:
        with checkpoint.as_directory() as folder:  # the Trainer reads it while being built
            trainer = trainer_for(folder, fork_from)
    trainer.fit()


def ray_job_tags() -> dict[str, str]:
    """The Ray job id, the cluster's address and, for a `ray job submit`, the submission id that `ray job
    logs/status` take."""
    runtime = ray.get_runtime_context()
    tags = {"ray_job_id": runtime.get_job_id(), "ray_cluster": runtime.gcs_address}
    injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))  # set for submitted jobs' drivers
    submission_id = injected.get("metadata", {}).get("job_submission_id")
    if submission_id:
        tags["ray_submission_id"] = submission_id
    return tags


def run_training(job: JobConfig, run_tags: dict[str, str] | None = None, start_from: dict | None = None):
    """Driver side: start (or join) Ray and run the TorchTrainer; prints the final metrics. `run_tags` go on
    the MLflow run beside the Ray job's ids; `start_from` is `resolve_start(job)`, resolved here if not given."""
    configure_deepspeed_environment(job.scaling.use_gpu)
    create_local_store(resolve_tracking_uri(job))
    connect_ray(job.scaling.ray_address)
    finished = completed_run(job)
    if finished is not None:  # nothing to train: say so rather than starting a worker group
        _print_results(job, finished, already_complete=True)
        return finished
    _print_batch_layouts(job)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "tracking_uri": resolve_tracking_uri(job),
                           "run_tags": {**ray_job_tags(), **(run_tags or {})}, "start_from": start_from or resolve_start(job)},
        scaling_config=scaling_config(job),
        run_config=RunConfig(
            name=job.name, storage_path=job.scaling.storage_path, worker_runtime_env=job.scaling.runtime_env or None,
            failure_config=FailureConfig(max_failures=job.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.training.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    _print_results(job, result)
    return result


def scaling_config(job: JobConfig) -> ScalingConfig:
    """Ray Train's scaling: a fixed worker count, or (min, max) for Ray Train's elastic training, which starts
    with the workers it can place and restarts the group at another size from the latest checkpoint."""
    scaling = job.scaling
    return ScalingConfig(num_workers=scaling.num_workers if scaling.is_elastic else scaling.max_workers,
                         use_gpu=scaling.use_gpu, resources_per_worker={"CPU": scaling.cpus_per_worker},
                         elastic_resize_monitor_interval_s=scaling.resize_check_s)


def _print_batch_layouts(job: JobConfig) -> None:
    """An elastic job says at start on which sizes the recipe's global batch cannot be kept."""
    if not job.scaling.is_elastic:
        return
    low, high = job.scaling.num_workers
    inexact = [layout for layout in map(job.batch_layout, range(low, high + 1)) if not layout.exact]
    print(f"{job.name}: elastic on {low} to {high} workers; global batch {job.training.global_batch_size}"
          + "".join(f"\n  on {layout.describe()}" for layout in inexact))


def resolve_start(job: JobConfig) -> dict | None:
    """training.resume_from resolved on the driver (pipeline/tracked_checkpoints.py), unless this job has run
    before: then Ray Train restores the job's own latest checkpoint and resume_from has done its part."""
    if job.training.resume_from is None or _has_run_before(job):
        return None
    source = resolve_resume_source(job, resolve_tracking_uri(job))
    action = "continues MLflow run" if source.mode == "continue" else "forks a child run of"
    print(f"{job.name}: starts from {source.uri} (step {source.step}) and {action} {source.run_id or '-'}: "
          f"{source.reason}")
    canonical = f"runs:/{source.run_id}@step={source.step}" if source.run_id else source.uri
    return {"uri": source.uri, "mode": source.mode, "run_id": source.run_id, "step": source.step,
            "reference": canonical}


def _has_run_before(job: JobConfig) -> bool:
    fs, path = fsspec.core.url_to_fs(f"{job.scaling.storage_path.rstrip('/')}/{job.name}")
    return fs.exists(f"{path}/{CHECKPOINT_SNAPSHOT}")


def completed_run(job: JobConfig):
    """The Ray Train result of this job's earlier run when its latest checkpoint already reached max_steps."""
    if not _has_run_before(job):
        return None
    folder = f"{job.scaling.storage_path.rstrip('/')}/{job.name}"
    previous = ray.train.Result.from_path(folder)
    step = (previous.metrics or {}).get("step", 0)
    return previous if step >= job.training.max_steps else None


def _print_results(job: JobConfig, result, already_complete: bool = False) -> None:
    metrics = result.metrics or {}
    if already_complete:
        print(f"{job.name}: the run already reached step {metrics['step']} (training.max_steps "
              f"{job.training.max_steps}); nothing to train. Raise training.max_steps to continue it.")
    else:
        table = Table(title=f"{job.name}: final metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in sorted(metrics.items()):
            if isinstance(value, int | float):
                table.add_row(key, f"{value:.4g}")
        Console().print(table)
    exported = f"{job.scaling.storage_path.rstrip('/')}/{job.name}"
    print(f"checkpoints: {result.path}")
    best = f" (best by val PQ: {exported}/best/model.pt)" if "val/PQ" in metrics else ""
    print(f"model: {exported}/model/model.pt{best}")
    print(f"MLflow: {resolve_tracking_uri(job)} (experiment {job.tracking.experiment})")
    run_id = metrics.get("mlflow_run_id")
    if run_id:
        run = _finished_run(job, run_id)
        if isinstance(run, str):
            print(f"pictures: {run} (run {run_id})")
            return
        print(f"pictures: {run.info.artifact_uri}/pictures/ (run {run_id})")
        registered = run.data.tags.get("registered_models")
        if registered:
            print(f"registered: {registered} (python -m pipeline.evaluate model --checkpoint models:/NAME/VERSION ...)")


def _finished_run(job: JobConfig, run_id: str):
    """The MLflow run, or a line saying why it cannot be read."""
    import mlflow

    try:
        return mlflow.MlflowClient(resolve_tracking_uri(job)).get_run(run_id)
    except Exception as error:  # noqa: BLE001 - the run is done; a tracking server gone by now costs only this line
        return f"<MLflow unreachable: {error}>"
