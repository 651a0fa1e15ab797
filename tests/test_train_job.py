"""The training job end to end at tiny scale: synthetic data, Ray preprocessing, 2 Ray Train workers under
DeepSpeed ZeRO-2 on gloo, checkpoints holding every rank's state, MLflow metrics, and an exported model file
that model/ loads without DeepSpeed."""

import contextlib
import io
import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from model.backbones import build_backbone
from model.checkpoint import load_model, read_classes
from pipeline.job import main

pytestmark = pytest.mark.slow  # the whole job: Ray preprocessing and a 2-worker Ray Train run

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train_job")
    document = yaml.safe_load(DEMO.read_text())
    document["synthetic_dataset"].update(num_images=10, min_size=64, max_size=96)
    document["stream"].update(crop_size=64, resize_base=64)
    document["training"].update(max_steps=4, checkpoint_every=2, log_every=1, eval_every=2)
    document["evaluation"]["max_images"] = 2
    torch.manual_seed(5)
    torch.save(build_backbone("tiny").state_dict(), workdir / "tiny_backbone.pth")
    document["model"]["backbone_weights"] = str(workdir / "tiny_backbone.pth")
    job_file = workdir / "job.yaml"
    job_file.write_text(yaml.safe_dump(document))
    pytest.MonkeyPatch().setenv("ONEFORMER_WORKDIR", str(workdir))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(job_file)]) == 0
    (workdir / "driver_stdout.txt").write_text(printed.getvalue())
    return workdir


def test_checkpoints_hold_every_rank_state(finished_job):
    checkpoints = sorted(p for p in (finished_job / "runs" / "demo_cpu").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # step 2 and the final step 4 (keep_checkpoints: 2)
    for checkpoint in checkpoints:
        assert {p.name for p in checkpoint.glob("trainer_rank*.pt")} == {"trainer_rank0.pt", "trainer_rank1.pt"}
        optimizer_shards = list((checkpoint / "state").glob("*optim_states.pt"))
        assert len(optimizer_shards) == 2, "ZeRO-2 writes one optimizer shard per rank"
    final = torch.load(checkpoints[-1] / "trainer_rank1.pt", weights_only=False)
    assert final["step"] == 4 and final["loader"]


def test_mlflow_run_has_config_metrics_validation_and_model(finished_job):
    client = mlflow.MlflowClient(f"sqlite:///{finished_job}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("demo_cpu")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model.preset"] == "tiny"
    backbone_tensors = len(build_backbone("tiny").state_dict())
    assert run.data.params["init.backbone_tensors_loaded"] == f"{backbone_tensors}/{backbone_tensors}"
    assert run.data.params["init.backbone_weights"] == str(finished_job / "tiny_backbone.pth")
    assert run.data.tags["cluster_shape"].startswith("2 workers")
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4] and all(m.value > 0 for m in losses)
    for name in ("val/PQ", "val/AP", "val/mIoU", "images_per_second", "learning_rate"):
        assert name in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert artifacts == {"model/model.pt", "model/classes.json", "model/metrics.json", "model/job_config.json"}
    for step in ("step_0000002", "step_0000004"):
        pictures = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, f"pictures/{step}")}
        assert {"panoptic_examples.png", "instance_examples.png", "semantic_examples.png", "pq_per_class.png"} <= pictures
    assert str(finished_job) in run.info.artifact_uri, "artifacts must not land in a Ray worker's temp folder"
    local = client.download_artifacts(run.info.run_id, "model", str(finished_job / "download"))
    classes = json.loads((Path(local) / "classes.json").read_text())
    assert [c["name"] for c in classes][:2] == ["disc", "square"]
    model = load_model(Path(local) / "model.pt")  # plain PyTorch, no DeepSpeed
    assert read_classes(Path(local) / "model.pt").to_json() == classes  # the model file carries its classes
    outputs = model(torch.rand(1, 3, 64, 64) * 255, ["panoptic"])
    assert outputs["pred_logits"].shape == (1, 32, len(classes) + 1)


def test_best_model_by_validation_pq_is_kept(finished_job):
    client = mlflow.MlflowClient(f"sqlite:///{finished_job}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("demo_cpu").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/PQ")}
    assert sorted(history) == [2, 4]
    best_step = max(history, key=lambda step: (history[step], -step))
    best = json.loads((finished_job / "runs" / "demo_cpu" / "best" / "metrics.json").read_text())
    assert best["step"] == best_step and best["val/PQ"] == pytest.approx(history[best_step])
    assert run.data.metrics["val/best_PQ"] == pytest.approx(history[best_step])
    load_model(finished_job / "runs" / "demo_cpu" / "best" / "model.pt")
    final = json.loads((finished_job / "runs" / "demo_cpu" / "model" / "metrics.json").read_text())
    assert final["step"] == 4 and final["val/PQ"] == pytest.approx(history[4])
    assert run.data.tags["checkpoint.best_step"] == str(best_step)
    versions = {int(v.version): v for v in client.search_model_versions("name = 'demo_cpu'")}
    roles = {v.tags["step"]: v.tags["roles"] for v in versions.values()}
    assert roles == ({"4": "final,best"} if best_step == 4 else {str(best_step): "best", "4": "final"})
    assert client.get_model_version_by_alias("demo_cpu", "best").tags["step"] == str(best_step)


def test_every_checkpoint_is_recorded_in_the_run(finished_job):
    client = mlflow.MlflowClient(f"sqlite:///{finished_job}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("demo_cpu").experiment_id])
    records = {key: json.loads(value) for key, value in run.data.tags.items() if key.startswith("checkpoint.step_")}
    assert sorted(records) == ["checkpoint.step_0000002", "checkpoint.step_0000004"]
    for record in records.values():
        folder = Path(record["uri"])
        assert folder.parent == finished_job / "runs" / "demo_cpu" and folder.is_dir() and record["kept"]
        saved = torch.load(folder / "trainer_rank0.pt", weights_only=False)
        assert saved["step"] == record["step"] and saved["run_id"] == run.info.run_id
        assert record["world_size"] == 2 and record["zero_stage"] == 2
        assert record["data_position"]["images_seen"] == 4 * record["step"] and "val/PQ" in record["metrics"]
    assert run.data.tags["checkpoint.latest_step"] == "4"


def test_driver_prints_the_results_the_model_and_where_the_pictures_are(finished_job):
    printed = (finished_job / "driver_stdout.txt").read_text()
    assert re.search(r"val/PQ\s.*\d", printed), printed[-2000:]
    model = re.search(r"^model: (\S+) \(best by val PQ: (\S+)\)$", printed, re.M)
    assert Path(model.group(1)).is_file() and Path(model.group(2)).is_file()
    pictures = Path(re.search(r"^pictures: file://(\S+) \(run \w+\)$", printed, re.M).group(1))
    assert sorted(folder.name for folder in pictures.iterdir()) == ["step_0000002", "step_0000004"]
    assert re.search(r"^registered: demo_cpu v1 \(final, best\)|^registered: demo_cpu v1 \(best\); demo_cpu v2 "
                     r"\(final\)", printed, re.M), printed[-2000:]


def test_running_a_finished_job_again_says_so_and_changes_nothing(finished_job):
    client = mlflow.MlflowClient(f"sqlite:///{finished_job}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("demo_cpu")
    (before,) = client.search_runs([experiment.experiment_id])
    model_file = finished_job / "runs" / "demo_cpu" / "model" / "model.pt"
    exported_at = model_file.stat().st_mtime_ns
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(finished_job / "job.yaml")]) == 0
    assert "the run already reached step 4" in printed.getvalue()
    (after,) = client.search_runs([experiment.experiment_id])
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(after.info.run_id, "loss")] == [1, 2, 3, 4]
    assert model_file.stat().st_mtime_ns == exported_at
