"""The training job against real infrastructure failing and being used as on a cluster: a Ray Train worker
killed mid-run (automatic restart from the last checkpoint, same result as an uninterrupted run), an MLflow
server that goes away (training goes on; buffered metrics reach it when it is back), `ray job submit` to a
head started with `ray start --head` on 127.0.0.1, and a preempted job's MLflow run continued or forked by other
jobs from the checkpoints it recorded (on the infra's PostgreSQL-backed MLflow server)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import yaml
from servers import MlflowServer, infra_mlflow_server, ray_head, submit

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
@pytest.fixture(scope="module")
def head(workdir):
    """A Ray head started with `ray start --head` for the module's submitted jobs."""
    with ray_head(workdir / "ray_head.log") as started:
        yield started


@pytest.fixture(scope="module")
def submitted(workdir, head):
    """The test-size job run by `ray job submit` on a head; also the uninterrupted reference run."""
    process, address = head
    return submit(address, process, write_job(workdir, "submitted"), {"ONEFORMER_WORKDIR": str(workdir)})


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




# ------------------------------------------------------------------------------------------ tracked checkpoints
# A job preempted at step 4 is continued by another job (another name and storage path) from what MLflow
# recorded, on the infra's MLflow server (PostgreSQL, basic-auth); a third job forks an earlier checkpoint.
TRACKED = "tracked"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    with infra_mlflow_server(tmp_path_factory.mktemp("tracking_server")) as server:
        monkeypatch = pytest.MonkeyPatch()
        for name, value in server.client_env.items():
            monkeypatch.setenv(name, value)
        yield server
        monkeypatch.undo()


class RecordedCheckpointKiller(WorkerKiller):
    """Kills a worker once the run's first checkpoint is recorded in MLflow (not only registered by Ray)."""

    def __init__(self, tracking_uri: str, experiment: str):
        super().__init__(Path("/nonexistent"))
        self.client, self.experiment = mlflow.MlflowClient(tracking_uri), experiment

    def _checkpoint_registered(self) -> bool:
        experiment = self.client.get_experiment_by_name(self.experiment)
        runs = self.client.search_runs([experiment.experiment_id]) if experiment else []
        return bool(runs) and "checkpoint.latest_step" in runs[0].data.tags


def tracked_job(workdir: Path, name: str, server, **training) -> Path:
    return write_job(workdir, name, tracking={"tracking_uri": server.url, "experiment": TRACKED},
                     scaling={"storage_path": str(workdir / f"storage_{name}")}, training=training)


@pytest.fixture(scope="module")
def continued(workdir, head, tracking_server, submitted):
    """Job A trains to its step-4 checkpoint and is preempted (a worker killed, no restarts); job B resumes
    runs:/<A's run id> under another name and storage path and trains to step 8."""
    process, address = head
    env = {"ONEFORMER_WORKDIR": str(workdir), **tracking_server.client_env}
    preempted = write_job(workdir, "preempted", tracking={"tracking_uri": tracking_server.url, "experiment": TRACKED},
                          training={"checkpoint_every": 4}, scaling={"max_failures": 0})
    killer = RecordedCheckpointKiller(tracking_server.url, TRACKED)
    killer.start()
    try:
        first = submit(address, process, preempted, env)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None and first.returncode != 0, "job A was not preempted"
    client, run_a = only_run(tracking_server.url, TRACKED)
    assert run_a.data.tags["checkpoint.latest_step"] == "4"
    second = submit(address, process, tracked_job(workdir, "continued", tracking_server,
                                                  resume_from=f"runs:/{run_a.info.run_id}"), env)
    return client, run_a.info.run_id, first, second


def test_another_job_continues_the_run_from_its_mlflow_record_to_the_same_result(workdir, continued):
    client, run_id, first, second = continued
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert f"continues MLflow run {run_id}" in second.stdout
    _, run = only_run(client.tracking_uri, TRACKED)  # one run for both jobs
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    reference_client, reference = only_run(f"sqlite:///{workdir}/mlruns/mlflow.db", "submitted")
    for name in ("loss", "loss_mask", "loss_contrastive", "val/PQ", "val/AP", "val/mIoU"):
        expected = metric_by_step(reference_client, reference, name)
        assert metric_by_step(client, run, name) == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    jobs = [json.loads(run.data.tags[key]) for key in sorted(run.data.tags) if key.startswith("job.")]
    assert [(job["job"], job["from_step"]) for job in jobs] == [("preempted", 0), ("continued", 4)]
    assert all(job["ray_submission_id"].startswith("raysubmit_") and job["cluster"] for job in jobs)
    assert jobs[1]["storage"] == str(workdir / "storage_continued" / "continued")
    records = {int(key.rsplit("_", 1)[1]): json.loads(value) for key, value in run.data.tags.items()
               if key.startswith("checkpoint.step_")}
    assert sorted(records) == [4, 6, 8] and run.data.tags["checkpoint.latest_step"] == "8"
    assert records[4]["uri"] == str(workdir / "runs" / "preempted" / "checkpoint_step_0000004")
    assert all(record["kept"] for record in records.values())  # A's folder is not B's to prune
    assert records[8]["uri"] == str(workdir / "storage_continued" / "continued" / "checkpoint_step_0000008")
    assert records[8]["world_size"] == 2 and records[8]["zero_stage"] == 2 and records[8]["kept"]
    assert records[8]["data_position"]["images_seen"] == 8 * 4 and records[8]["metrics"]["val/PQ"] >= 0


def test_the_registered_model_is_evaluated_by_its_models_uri(workdir, continued):
    client, run_id, _, _ = continued
    (version,) = [v for v in client.search_model_versions(f"name = '{TRACKED}'") if v.run_id == run_id]
    assert version.tags["step"] == "8" and "final" in version.tags["roles"]
    evaluated = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "model", "--checkpoint", f"models:/{TRACKED}/{version.version}",
         "--shards", str(workdir / "data" / "synthetic_shards" / "val"), "--max-images", "2", "--test-size", "64", "256",
         "--json-out", str(workdir / "registered_eval.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "PQ" in json.loads((workdir / "registered_eval.json").read_text())["summary"]


def test_forking_an_earlier_checkpoint_starts_a_child_run_and_a_missing_one_fails_in_one_line(
        workdir, head, tracking_server, continued, capsys):
    client, run_id, _, _ = continued
    process, address = head
    env = {"ONEFORMER_WORKDIR": str(workdir), **tracking_server.client_env}
    forked = submit(address, process, tracked_job(workdir, "forked", tracking_server,
                                                  resume_from=f"runs:/{run_id}@step=4"), env)
    assert forked.returncode == 0, forked.stdout[-4000:] + forked.stderr[-4000:]
    assert f"forks a child run of {run_id}: step 4 is not the run's latest checkpoint (step 8)" in forked.stdout
    experiment = client.get_experiment_by_name(TRACKED)
    (child,) = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert child.data.tags["forked_from"] == f"runs:/{run_id}@step=4"
    assert sorted(metric_by_step(client, child, "loss")) == [5, 6, 7, 8]
    missing = tracked_job(workdir, "missing", tracking_server, resume_from=f"runs:/{run_id}@step=5")
    assert main([str(missing)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: training.resume_from: runs:/{run_id}@step=5: the run recorded no checkpoint at step 5 "
                     "(recorded: [4, 6, 8])")
