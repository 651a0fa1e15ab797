"""MLflow tracking for rank 0. A tracking server that goes away costs a warning and buffered metrics, never
the run: failed calls are kept and replayed when the server answers again. While it is away the tracker does
not ask it again for `retry_interval_s`, so training does not wait on HTTP retries at every log step."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import JobConfig

log = logging.getLogger("pipeline.tracking")

# MLflow's own defaults retry a failed request 7 times with exponential backoff (minutes per call); a few
# seconds is enough to ride out a blip, and the buffer covers longer outages. The environment still wins.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def limit_http_retries() -> None:
    """MLflow's short HTTP retries (HTTP_RETRY_DEFAULTS) unless the environment sets its own."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def resolve_tracking_uri(job: JobConfig) -> str:
    """MLFLOW_TRACKING_URI in the environment wins over the job file, as MLflow users expect."""
    return os.environ.get("MLFLOW_TRACKING_URI") or job.tracking.tracking_uri


def create_local_store(tracking_uri: str) -> None:
    """Create a SQLite store's schema now, on the driver: MLflow's migrations are not atomic, and a worker group
    restarted while rank 0 was running them would find a half-made store ("table ... already exists")."""
    if tracking_uri.startswith("sqlite:///"):
        import mlflow

        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """One MLflow run: params, tags, metrics and artifacts, with failed calls buffered and replayed in order.

    `run_id` reopens an existing run (a restarted worker group, or another job continuing it) in its own
    experiment and under its own name; otherwise a new run starts in the job's experiment, as a child of
    `parent_run_id` when given (a fork)."""

    def __init__(self, job: JobConfig, tracking_uri: str, run_id: str | None = None, retry_interval_s: float = 30.0,
                 tags: dict[str, str] | None = None, parent_run_id: str | None = None):
        limit_http_retries()
        import mlflow

        self._mlflow = mlflow
        self._pending: list[tuple[str, Callable[[], object]]] = []
        self._retry_interval_s = retry_interval_s
        self._unreachable_since: float | None = None
        mlflow.set_tracking_uri(tracking_uri)
        self.client = mlflow.MlflowClient(tracking_uri)
        if run_id is None:
            _ensure_experiment(mlflow, tracking_uri, job.tracking.experiment)
            self.run = mlflow.start_run(run_name=job.tracking.run_name or job.name, parent_run_id=parent_run_id)
            self._log_run_description(job, tags or {})
        else:  # in its own experiment, whatever this job's is (a run cannot move), keeping its name
            mlflow.set_experiment(experiment_id=self.client.get_run(run_id).info.experiment_id)
            self.run = mlflow.start_run(run_id=run_id)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def experiment_name(self) -> str:
        return self.client.get_experiment(self.run.info.experiment_id).name

    def _log_run_description(self, job: JobConfig, tags: dict[str, str]) -> None:
        import ray
        import torch

        flat = flatten(job.model_dump(mode="json"))
        self._mlflow.log_params({key: str(value)[:500] for key, value in flat.items()})
        self._mlflow.set_tags({
            "git_commit": _git_commit(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), **tags,
            "cluster_shape": f"{job.scaling.num_workers} workers x {'1 GPU' if job.scaling.use_gpu else f'{job.scaling.cpus_per_worker} CPU'}",
        })
        self._mlflow.log_dict(job.model_dump(mode="json"), "job_config.json")

    def log_params(self, params: dict[str, str]) -> None:
        if params:
            self._mlflow.log_params(params)

    def current_tags(self) -> dict[str, str]:
        """The run's tags as the store has them now."""
        return dict(self.client.get_run(self.run_id).data.tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.defer(f"metrics of step {step}", lambda: self._mlflow.log_metrics(metrics, step))

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self.defer(f"tags {sorted(tags)}", lambda: self._mlflow.set_tags(tags))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads now, or later if the server is away; the file must stay in place until `finish`."""
        self.defer(f"artifact {path}", lambda: self._mlflow.log_artifact(str(path), artifact_path))

    def defer(self, description: str, call: Callable[[], object]) -> None:
        """Make `call` to the store now, or after the calls before it once the store answers again. `call`
        talks to the store itself, not through this tracker."""
        self._pending.append((description, call))
        self._flush()

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def _flush(self, force: bool = False) -> None:
        """Send buffered calls in order; stop at the first failure and keep the rest."""
        waiting = self._unreachable_since is not None and time.monotonic() - self._unreachable_since < self._retry_interval_s
        if waiting and not force:
            return
        try:
            while self._pending:
                self._pending[0][1]()
                self._pending.pop(0)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            self._unreachable_since = time.monotonic()
            log.warning("MLflow unreachable (%s); %d calls buffered, next try in %.0f s",
                        err, self.num_pending, self._retry_interval_s)
            return
        if self._unreachable_since is not None:
            log.warning("MLflow reachable again; buffered calls sent")
            self._unreachable_since = None

    def finish(self, status: str = "FINISHED") -> None:
        """Last attempt to send what is buffered, then close the run with `status` (FINISHED, or FAILED for a
        run that raised); what still fails is named in a warning."""
        self._flush(force=True)
        if self.num_pending:
            log.warning("MLflow still unreachable: not logged: %s", "; ".join(name for name, _ in self._pending))
            return
        try:
            self._mlflow.end_run(status=status)
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


def flatten(document: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys (the form of the run's params)."""
    flat = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
