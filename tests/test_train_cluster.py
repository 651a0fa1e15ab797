"""The training job against real infrastructure failing and being used as on a cluster: a Ray Train worker
killed mid-run (automatic restart from the last checkpoint, same result as an uninterrupted run), an MLflow
server that goes away (training goes on; buffered metrics reach it when it is back), and `ray job submit` to a
head started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import yaml
from servers import MlflowServer, free_port, stop_process_group

from pipeline.config import load_job
from pipeline.job import main
from pipeline.tracking import RunTracker

pytestmark = pytest.mark.slow  # a real Ray head, job submission and an MLflow server: minutes

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "jobs" / "demo_cpu.yaml"
MAX_STEPS = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One work directory (so one synthetic dataset and one set of shards) for every job of the module."""
    folder = tmp_path_factory.mktemp("cluster")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield folder
    monkeypatch.undo()


def write_job(workdir: Path, name: str, **sections) -> Path:
    """The demo job at test size, with `sections` updating its sections; executable like the shipped ones."""
    document = yaml.safe_load(DEMO.read_text())
    document["name"] = name
    document["synthetic_dataset"].update(num_images=10, min_size=64, max_size=96)
    document["stream"].update(crop_size=64, resize_base=64)
    document["training"].update(max_steps=MAX_STEPS, checkpoint_every=2, log_every=1)
    document["evaluation"]["max_images"] = 2
    document["tracking"]["experiment"] = name
    document["tracking"]["log_pictures"] = 0
    for section, values in sections.items():
        document[section].update(values)
    path = workdir / f"{name}.yaml"
    path.write_text("#!/usr/bin/env -S python -m pipeline.job\n" + yaml.safe_dump(document))
    path.chmod(0o755)
    return path


def only_run(tracking_uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"expected one MLflow run in {experiment}, found {len(runs)}"
    return client, runs[0]


def metric_by_step(client, run, name: str) -> dict[int, float]:
    """The latest value logged at each step (a resumed run logs the steps after its checkpoint again)."""
    history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def final_step(workdir: Path, name: str) -> int:
    checkpoints = sorted((workdir / "runs" / name).glob("checkpoint_*/trainer_rank0.pt"))
    return torch.load(checkpoints[-1], weights_only=False)["step"]


# ------------------------------------------------------------------------------------------ ray job submit
# Token authentication with a token of this test session's own (a fresh machine has no ~/.ray/auth_token):
# the head, the jobs it runs and the `ray job` client all read it from the environment.
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@contextlib.contextmanager
def ray_head(log: Path):
    """`ray start --head --block` on 127.0.0.1 in its own process group, stopped on exit (so that later
    `ray.init()` calls start their own local Ray). The job's driver finds `python` (for the job file's
    shebang) in this interpreter's folder. Ray's socket paths must stay under 107 bytes, so its temporary
    folder is a short one."""
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    dashboard_port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **RAY_AUTH}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--num-cpus", "3", "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield head, f"http://127.0.0.1:{dashboard_port}"
    finally:
        stop_process_group(head, grace_s=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


HEAD_NOT_READY = ("Failed to connect", "No available agent to submit job")


def submit(address: str, head: subprocess.Popen, job_file: Path, env_vars: dict) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
               "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", str(job_file)]
    deadline = time.monotonic() + 120
    while True:  # the job API answers, and then gets an agent, some seconds after the head starts (more under load)
        submitted = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **RAY_AUTH})
        printed = submitted.stdout + submitted.stderr
        if submitted.returncode == 0 or not any(sign in printed for sign in HEAD_NOT_READY):
            return submitted
        assert head.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, submitted.stdout + submitted.stderr
        time.sleep(2)


@pytest.fixture(scope="module")
def submitted(workdir):
    """The test-size job run by `ray job submit` on a head; also the uninterrupted reference run."""
    with ray_head(workdir / "ray_head.log") as (head, address):
        return submit(address, head, write_job(workdir, "submitted"), {"ONEFORMER_WORKDIR": str(workdir)})


def test_ray_job_submit_runs_the_job_file_on_a_ray_head(workdir, submitted):
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert "succeeded" in submitted.stdout
    client, run = only_run(f"sqlite:///{workdir}/mlruns/mlflow.db", "submitted")
    assert sorted(metric_by_step(client, run, "loss")) == list(range(1, MAX_STEPS + 1))
    assert run.data.tags["ray_submission_id"].startswith("raysubmit_")
    assert final_step(workdir, "submitted") == MAX_STEPS


# ------------------------------------------------------------------------------------------ worker killed
def train_worker_pids() -> set[int]:
    pids = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in process.info["cmdline"] or ()):
            pids.add(process.info["pid"])
    return pids


class WorkerKiller(threading.Thread):
    """Once Ray has registered the run's first checkpoint, SIGKILLs one Ray Train worker process; then records
    the worker processes that Ray starts in its place."""

    def __init__(self, run_folder: Path):
        super().__init__(daemon=True)
        self.run_folder = run_folder
        self.killed: int | None = None
        self.replacements: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            if self._checkpoint_registered():
                survivors = train_worker_pids()
                if survivors:
                    self.killed = min(survivors)
                    psutil.Process(self.killed).kill()
                    break
            time.sleep(0.2)
        while not self.stop.is_set():
            self.replacements |= train_worker_pids() - survivors
            time.sleep(0.5)

    def _checkpoint_registered(self) -> bool:
        snapshot = self.run_folder / "checkpoint_manager_snapshot.json"
        try:
            return "checkpoint_" in snapshot.read_text()
        except OSError:
            return False


def test_killed_worker_restarts_from_checkpoint_and_ends_like_an_uninterrupted_run(workdir, submitted):
    assert submitted.returncode == 0, "the uninterrupted reference run failed"
    killer = WorkerKiller(workdir / "runs" / "killed")
    killer.start()
    try:
        assert main([str(write_job(workdir, "killed"))]) == 0
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no worker was killed: the run ended before its first checkpoint"
    assert killer.replacements, "Ray did not start replacement workers"
    # Resumed, not restarted from scratch: the restarted rank 0 continued the same MLflow run.
    client, run = only_run(f"sqlite:///{workdir}/mlruns/mlflow.db", "killed")
    reference_client, reference = only_run(f"sqlite:///{workdir}/mlruns/mlflow.db", "submitted")
    assert final_step(workdir, "killed") == final_step(workdir, "submitted") == MAX_STEPS
    for name in ("loss", "loss_mask", "loss_contrastive", "val/PQ", "val/AP", "val/mIoU"):
        expected = metric_by_step(reference_client, reference, name)
        assert metric_by_step(client, run, name) == pytest.approx(expected, rel=1e-5, abs=1e-6), name


# ------------------------------------------------------------------------------------------ MLflow server
@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    server.wait_until_healthy()
    yield server
    server.stop()


def test_tracker_buffers_while_the_server_is_away_and_replays_when_it_is_back(workdir, mlflow_server, caplog):
    job = load_job(write_job(workdir, "buffered"))
    tracker = RunTracker(job, mlflow_server.url, retry_interval_s=0)
    tracker.log_metrics({"loss": 4.0}, step=1)
    mlflow_server.stop()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker.log_metrics({"loss": 3.0}, step=2)
        tracker.log_artifact(write_job(workdir, "artifact"), "config")
        tracker.log_metrics({"loss": 2.0}, step=3)
    assert tracker.num_pending == 3 and "MLflow unreachable" in caplog.text
    mlflow_server.start().wait_until_healthy()
    tracker.log_metrics({"loss": 1.0}, step=4)
    assert tracker.num_pending == 0
    tracker.finish()
    client = mlflow.MlflowClient(mlflow_server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert metric_by_step(client, run, "loss") == {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/artifact.yaml"]


class ServerStopper(threading.Thread):
    """Stops the MLflow server once the training run has logged its second step there."""

    def __init__(self, server: MlflowServer, experiment: str):
        super().__init__(daemon=True)
        self.server, self.experiment = server, experiment
        self.stopped_after: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        client = mlflow.MlflowClient(self.server.url)
        while not self.done.is_set():
            experiment = client.get_experiment_by_name(self.experiment)
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] if runs else []
            if len(steps) >= 2:
                self.server.stop()
                self.stopped_after = max(steps)
                return
            time.sleep(0.3)


def test_training_outlives_its_tracking_server(workdir, mlflow_server):
    stopper = ServerStopper(mlflow_server, "server_gone")
    stopper.start()
    try:
        job_file = write_job(workdir, "server_gone", tracking={"tracking_uri": mlflow_server.url, "experiment": "server_gone"})
        assert main([str(job_file)]) == 0
    finally:
        stopper.done.set()
        stopper.join()
    assert stopper.stopped_after is not None and stopper.stopped_after < MAX_STEPS
    assert final_step(workdir, "server_gone") == MAX_STEPS
    exported = json.loads((workdir / "runs" / "server_gone" / "model" / "metrics.json").read_text())
    assert exported["step"] == MAX_STEPS and "val/PQ" in exported


