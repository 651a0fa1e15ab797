"""MLflow tracking for rank 0. A tracking server that goes away costs a warning and buffered metrics, never
the run: failed calls are kept and replayed when the server answers again."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from pathlib import Path

from pipeline.config import JobConfig

log = logging.getLogger("pipeline.tracking")


def resolve_tracking_uri(job: JobConfig) -> str:
    """MLFLOW_TRACKING_URI in the environment wins over the job file, as MLflow users expect."""
    return os.environ.get("MLFLOW_TRACKING_URI") or job.tracking.tracking_uri


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """One MLflow run: params, tags, metrics and artifacts, with failed metric calls buffered."""

    def __init__(self, job: JobConfig, tracking_uri: str, run_id: str | None = None):
        import mlflow

        self._mlflow = mlflow
        self._pending: list[tuple[dict, int]] = []
        mlflow.set_tracking_uri(tracking_uri)
        _ensure_experiment(mlflow, tracking_uri, job.tracking.experiment)
        self.run = mlflow.start_run(run_id=run_id, run_name=job.tracking.run_name or job.name)
        if run_id is None:
            self._log_run_description(job)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def _log_run_description(self, job: JobConfig) -> None:
        import ray
        import torch

        flat = _flatten(job.model_dump(mode="json"))
        self._mlflow.log_params({key: str(value)[:500] for key, value in flat.items()})
        self._mlflow.set_tags({
            "git_commit": _git_commit(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "ray_job_id": os.environ.get("RAY_JOB_ID", "none"),
            "cluster_shape": f"{job.scaling.num_workers} workers x {'1 GPU' if job.scaling.use_gpu else f'{job.scaling.cpus_per_worker} CPU'}",
        })
        self._mlflow.log_dict(job.model_dump(mode="json"), "job_config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._pending.append((metrics, step))
        self._flush()

    def _flush(self) -> None:
        """Send buffered metric batches in order; stop at the first failure and keep the rest."""
        try:
            while self._pending:
                self._mlflow.log_metrics(*self._pending[0])
                self._pending.pop(0)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            log.warning("MLflow unreachable (%s); %d metric batches buffered", err, len(self._pending))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self._mlflow.log_artifact(str(path), artifact_path)
        except Exception as err:  # noqa: BLE001
            log.warning("could not log artifact %s to MLflow: %s", path, err)

    def finish(self) -> None:
        self._flush()
        try:
            self._mlflow.end_run()
        except Exception as err:  # noqa: BLE001
            log.warning("could not close the MLflow run: %s", err)


def _ensure_experiment(mlflow, tracking_uri: str, name: str) -> None:
    """Select the experiment, creating it first if needed. A database store's default artifact root is
    relative to the current directory, which for a Ray worker is a temporary folder: artifacts of a local
    SQLite store go beside the database instead."""
    if mlflow.get_experiment_by_name(name) is None:
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):
            database = Path(tracking_uri.removeprefix("sqlite:///"))
            database.parent.mkdir(parents=True, exist_ok=True)
            artifact_location = (database.parent / "artifacts").resolve().as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            pass  # another process created it first
    mlflow.set_experiment(name)


def _flatten(document: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
