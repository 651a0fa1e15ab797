"""Checkpoints tracked in MLflow and models in its registry, against a real SQLite MLflow store and real checkpoint
folders: the records a run keeps (retention, best), finding a checkpoint again from runs:/ references, the
continue-or-fork decision, the one-line errors, registering exported models and reading them back by models:/."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipeline.compare import compare
from pipeline.config import JobConfigError, load_job
from pipeline.registry import (
    ExportedModel,
    RegistryError,
    local_model_file,
    register_exported_models,
    versions_of_run,
)
from pipeline.registry import main as registry_main
from pipeline.tracked_checkpoints import (
    BEST_TAG,
    LATEST_TAG,
    CheckpointLedger,
    CheckpointRecord,
    ResumeError,
    job_contribution_tags,
    parse_resume_reference,
    read_checkpoint_state,
    records_from_tags,
    resolve_resume_source,
)
from pipeline.tracking import RunTracker

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"


def record(step: int, folder: str, **changes) -> CheckpointRecord:
    fields = dict(step=step, uri=f"{folder}/checkpoint_step_{step:07d}", world_size=2, zero_stage=2,
                  data_position={"images_seen": 4 * step}, metrics={"loss": 1.0 / step}, job="a")
    return CheckpointRecord(**{**fields, **changes})


# ------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("text, expected", [
    ("runs:/" + "a" * 32, ("a" * 32, None, None)),
    ("runs:/" + "0" * 32 + "@step=40", ("0" * 32, 40, None)),
    ("s3://bucket/runs/job/checkpoint_step_0000040", (None, None, "s3://bucket/runs/job/checkpoint_step_0000040")),
])
def test_resume_references_parse(text, expected):
    parsed = parse_resume_reference(text)
    assert (parsed.run_id, parsed.step, parsed.uri) == expected


@pytest.mark.parametrize("override, message", [
    ("training.resume_from=runs:/abc", "training.resume_from: 'runs:/abc' is not runs:/<32-hex-digit run id>"),
    ("training.resume_from=models:/demo/1", "training.resume_from: 'models:/demo/1' is a registered model"),
    ("training.resume_mode=fork", "resume_mode is 'fork' but resume_from is not set"),
])
def test_bad_resume_settings_fail_when_the_job_loads(override, message):
    with pytest.raises(JobConfigError) as caught:
        load_job(DEMO, [override])
    assert message in str(caught.value)


# ------------------------------------------------------------------------------------------ records
def test_ledger_marks_what_retention_removed_in_this_jobs_folder_only_and_moves_best():
    earlier_job = [record(2, "/runs/a"), record(4, "/runs/a")]
    ledger = CheckpointLedger(earlier_job, "/runs/b", keep=2)
    tags = ledger.add(record(6, "/runs/b"), is_best=True)
    assert tags[LATEST_TAG] == "6" and tags[BEST_TAG] == "6"
    ledger.add(record(8, "/runs/b"), is_best=False)
    tags = ledger.add(record(10, "/runs/b"), is_best=True)
    records = {r.step: r for r in records_from_tags({**tags})}
    assert records[6].kept is False and records[6].best is False  # both changes in one tag write
    assert records[10].best and records[10].kept and tags[BEST_TAG] == "10"
    assert all(r.kept for r in ledger.records.values() if r.uri.startswith("/runs/a/"))
    assert [r.step for r in ledger.records.values() if r.kept] == [2, 4, 8, 10]


def test_records_round_trip_through_tags():
    original = record(12, "s3://bucket/runs/job", metrics={"val/PQ": 41.5}, best=True)
    (back,) = records_from_tags({original.tag_key: original.tag_value(), "other": "x"})
    assert back == original


def test_each_job_is_recorded_once_per_run():
    first = {"job": "a", "ray_job_id": "01000000", "ray_submission_id": "raysubmit_1", "cluster": "10.0.0.1:6379",
             "storage": "/runs/a", "from_step": 0}
    tags = job_contribution_tags({}, first)
    assert list(tags) == ["job.001"]
    restarted = {**first, "from_step": 4}  # Ray restarted the same job's workers
    assert job_contribution_tags(tags, restarted) == {}
    other_cluster = {**first, "job": "b", "cluster": "10.0.0.9:6379", "from_step": 4}
    assert list(job_contribution_tags(tags, other_cluster)) == ["job.002"]


# ------------------------------------------------------------------------------------------ checkpoint folders
def write_checkpoint(folder: Path, step: int, run_id: str | None, world_size: int = 2) -> str:
    (folder / "state").mkdir(parents=True)
    for rank in range(world_size):
        torch.save({"step": step, "run_id": run_id, "loader": {}, "rng": {}, "best": None},
                   folder / f"trainer_rank{rank}.pt")
    return str(folder)


def test_checkpoint_folders_that_cannot_be_resumed_fail_in_one_line(tmp_path):
    good = write_checkpoint(tmp_path / "good", 6, "f" * 32)
    assert read_checkpoint_state(good) == {"step": 6, "run_id": "f" * 32, "world_size": 2}
    with pytest.raises(ResumeError, match="the checkpoint is gone"):
        read_checkpoint_state(str(tmp_path / "missing"))
    incomplete = tmp_path / "incomplete"
    write_checkpoint(incomplete, 6, None)
    (incomplete / "state").rmdir()
    with pytest.raises(ResumeError, match="not a complete training checkpoint"):
        read_checkpoint_state(str(incomplete))
    truncated = Path(write_checkpoint(tmp_path / "truncated", 6, None))
    (truncated / "trainer_rank0.pt").write_bytes((truncated / "trainer_rank0.pt").read_bytes()[:40])
    with pytest.raises(ResumeError, match="unreadable trainer state") as caught:
        read_checkpoint_state(str(truncated))
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------ resolving
@pytest.fixture
def tracked_run(tmp_path, monkeypatch):
    """A run of the demo job in a SQLite store whose checkpoints at steps 2 (removed by retention), 4 and 6 are
    recorded, with the folders of 4 and 6 on disk."""
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = load_job(DEMO)
    client = MlflowClient(uri)
    experiment = client.create_experiment("tracked", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="a").info.run_id
    client.log_dict(run_id, job.model_dump(mode="json"), "job_config.json")
    folder = tmp_path / "runs" / "a"
    records = [record(2, str(folder), kept=False), record(4, str(folder)), record(6, str(folder))]
    for item in records:
        client.set_tag(run_id, item.tag_key, item.tag_value())
        if item.kept:
            write_checkpoint(Path(item.uri), item.step, run_id)
    return uri, run_id, folder


def resume_job(*overrides: str):
    return load_job(DEMO, ["name=b", *overrides])


def test_the_latest_checkpoint_of_a_run_continues_it(tracked_run):
    uri, run_id, folder = tracked_run
    source = resolve_resume_source(resume_job(f"training.resume_from=runs:/{run_id}", "training.max_steps=900"), uri)
    assert (source.uri, source.step, source.run_id, source.mode) == (f"{folder}/checkpoint_step_0000006", 6, run_id,
                                                                     "continue")
    by_folder = resolve_resume_source(resume_job(f"training.resume_from={folder}/checkpoint_step_0000006"), uri)
    assert (by_folder.run_id, by_folder.mode) == (run_id, "continue")


def test_another_world_size_with_the_recipes_global_batch_continues_the_run(tracked_run):
    """The checkpoint was written by 2 workers; 1 worker taking twice the images per step is the same recipe."""
    uri, run_id, _ = tracked_run
    resized = resume_job(f"training.resume_from=runs:/{run_id}", "scaling.num_workers=1", "stream.batch_size=4")
    source = resolve_resume_source(resized, uri)
    assert (source.world_size, source.mode) == (2, "continue")
    halved = resume_job(f"training.resume_from=runs:/{run_id}", "scaling.num_workers=1", "training.global_batch_size=2")
    assert resolve_resume_source(halved, uri).reason == "the recipe changed: training.global_batch_size"


def test_an_earlier_step_or_a_changed_recipe_forks(tracked_run):
    uri, run_id, _ = tracked_run
    earlier = resolve_resume_source(resume_job(f"training.resume_from=runs:/{run_id}@step=4"), uri)
    assert (earlier.step, earlier.mode) == (4, "fork") and "not the run's latest" in earlier.reason
    changed = resume_job(f"training.resume_from=runs:/{run_id}", "training.learning_rate=0.001")
    source = resolve_resume_source(changed, uri)
    assert source.mode == "fork" and source.reason == "the recipe changed: training.learning_rate"
    forced = resume_job(f"training.resume_from=runs:/{run_id}", "training.learning_rate=0.001",
                        "training.resume_mode=continue")
    assert resolve_resume_source(forced, uri).mode == "continue"
    assert resolve_resume_source(resume_job(f"training.resume_from=runs:/{run_id}", "training.resume_mode=fork"),
                                 uri).mode == "fork"


@pytest.mark.parametrize("reference, overrides, message", [
    ("runs:/{run}@step=2", (), "the checkpoint at step 2 ({folder}/checkpoint_step_0000002) was removed by retention "
                              "(kept: [4, 6])"),
    ("runs:/{run}@step=3", (), "the run recorded no checkpoint at step 3 (recorded: [2, 4, 6])"),
    ("runs:/{run}@step=4", ("training.resume_mode=continue",), "continuing the run from step 4 would overwrite"),
    ("runs:/" + "e" * 32, (), "no such MLflow run"),
])
def test_checkpoints_that_cannot_be_resumed_fail_in_one_line_naming_them(tracked_run, reference, overrides, message):
    uri, run_id, folder = tracked_run
    reference = reference.format(run=run_id)
    with pytest.raises(ResumeError) as caught:
        resolve_resume_source(resume_job(f"training.resume_from={reference}", *overrides), uri)
    text = str(caught.value)
    assert text.startswith(f"training.resume_from: {reference}") and "\n" not in text
    assert message.format(folder=folder) in text


def test_a_recorded_checkpoint_deleted_since_fails_naming_it(tracked_run):
    uri, run_id, folder = tracked_run
    for file in (folder / "checkpoint_step_0000006").rglob("*.pt"):
        file.unlink()
    (folder / "checkpoint_step_0000006" / "state").rmdir()
    (folder / "checkpoint_step_0000006").rmdir()
    with pytest.raises(ResumeError, match=f"runs:/{run_id} \\({folder}/checkpoint_step_0000006\\): the checkpoint is gone"):
        resolve_resume_source(resume_job(f"training.resume_from=runs:/{run_id}"), uri)


# ------------------------------------------------------------------------------------------ runs
def test_a_continued_run_keeps_its_experiment_and_name_and_a_fork_is_its_child(tracked_run):
    uri, run_id, _ = tracked_run
    job = resume_job("tracking.experiment=elsewhere")
    continued = RunTracker(job, uri, run_id=run_id)
    continued.finish()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "a" and MlflowClient(uri).get_experiment(run.info.experiment_id).name == "tracked"
    fork = RunTracker(job, uri, parent_run_id=run_id, tags={"forked_from": f"runs:/{run_id}@step=4"})
    fork.finish()
    child = MlflowClient(uri).get_run(fork.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run_id and child.info.run_name == "b"
    assert child.data.tags["forked_from"] == f"runs:/{run_id}@step=4"


# ------------------------------------------------------------------------------------------ registry
@pytest.fixture
def exported_runs(tmp_path, monkeypatch):
    """Two runs with model folders logged as the trainer logs them: run one's best (PQ 30) at step 4 and final
    (PQ 25) at step 8; run two's final is also its best (PQ 28)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = []
    for index, folders in enumerate([("best", "model"), ("model",)]):
        run_id = client.create_run(experiment, run_name=f"run{index}").info.run_id
        for folder in folders:
            files = tmp_path / f"{run_id}_{folder}"
            files.mkdir()
            (files / "model.pt").write_bytes(f"{run_id}/{folder}".encode())
            (files / "classes.json").write_text("[]")
            client.log_artifacts(run_id, str(files), folder)
        runs.append(run_id)
    return uri, client, runs


def test_exported_models_become_versions_and_best_moves_only_when_beaten(exported_runs):
    uri, client, (first, second) = exported_runs
    config = {"name": "job"}
    registered = register_exported_models(client, "registry", first, [
        ExportedModel("best", ("best",), 4, {"val/PQ": 30.0}), ExportedModel("model", ("final",), 8, {"val/PQ": 25.0})],
        config)
    assert registered == ["registry v1 (best)", "registry v2 (final)"]
    assert client.get_registered_model("registry").aliases == {"best": 1}
    register_exported_models(client, "registry", second, [ExportedModel("model", ("final", "best"), 8,
                                                                        {"val/PQ": 28.0})], config)
    assert client.get_registered_model("registry").aliases == {"best": 1}, "a worse model took the best alias"
    version = client.get_model_version("registry", "3")
    assert version.run_id == second and version.tags["step"] == "8" and version.tags["metric.val/PQ"] == "28.0"
    assert json.loads(version.tags["job_config"]) == config
    again = register_exported_models(client, "registry", first, [ExportedModel("best", ("best",), 4, {"val/PQ": 30.0})],
                                     config)
    assert again == ["registry v1 (best, registered before)"]
    assert versions_of_run(client, first) == ["registry v1 best @best", "registry v2 final"]
    summaries = {row.run_id: row for row in compare(uri, experiment="registry").runs}
    assert summaries[second].model_versions == ["registry v3 final,best"]


def test_models_uris_give_back_the_model_file(exported_runs, capsys):
    uri, client, (first, _) = exported_runs
    register_exported_models(client, "registry", first, [ExportedModel("best", ("best",), 4, {"val/PQ": 30.0})], {})
    for reference in ("models:/registry/1", "models:/registry@best", "models:/registry/latest"):
        assert Path(local_model_file(reference, uri)).read_bytes() == f"{first}/best".encode()
    assert local_model_file("/some/model.pt", uri) == "/some/model.pt"
    with pytest.raises(RegistryError, match="models:/registry/7: not in the model registry"):
        local_model_file("models:/registry/7", uri)
    assert registry_main(["--tracking-uri", uri, "fetch", "models:/registry@best"]) == 0
    assert Path(capsys.readouterr().out.strip()).read_bytes() == f"{first}/best".encode()
    assert registry_main(["--tracking-uri", uri, "list", "registry"]) == 0
    assert "v1\trun " + first in capsys.readouterr().out
    assert registry_main(["--tracking-uri", uri, "fetch", "models:/nothing/1"]) == 2
    assert "models:/nothing/1" in capsys.readouterr().err


def test_the_tracker_writes_tags_in_order_with_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(load_job(DEMO), uri)
    tracker.set_tags({LATEST_TAG: "4"})
    tracker.log_metrics({"loss": 1.0}, 4)
    tracker.finish()
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags[LATEST_TAG] == "4" and run.data.metrics["loss"] == 1.0 and tracker.num_pending == 0
