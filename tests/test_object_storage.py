"""Everything in object storage, on a real S3-compatible server (moto's, on 127.0.0.1): raw data, backbone
weights, shards, Ray Train checkpoints and exported models in a bucket; preprocessing -> streaming -> training
-> checkpoint -> resume from the bucket; a re-run reuses the shards; a store that drops long reads costs
nothing while retries can make up for it, and counted samples when they cannot."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import fsspec
import mlflow
import pytest
import torch
import yaml
from servers import ConnectionCutter, MotoS3Server

from model.backbones import build_backbone
from model.presets import make_config
from pipeline.data.stream import READ_ATTEMPTS, SKIP_BROKEN_TAR, ModelInputs, build_eval_loader
from pipeline.job import main
from pipeline.synthetic import GeneratorSettings, generate_dataset

pytestmark = pytest.mark.slow  # an S3 server and two Ray Train runs

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"
BUCKET = "oneformer-test"


def fresh_s3():
    """An s3fs filesystem that reads the current AWS_* environment (fsspec caches instances otherwise)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return fsspec.filesystem("s3")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3")
    server = MotoS3Server(folder).start()
    monkeypatch = pytest.MonkeyPatch()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(folder))
    monkeypatch.setenv("ONEFORMER_WEIGHTS_CACHE", str(folder / "weights_cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fs = fresh_s3()
    fs.mkdir(BUCKET)
    generate_dataset(folder / "raw", 10, seed=0, val_fraction=0.2, settings=GeneratorSettings(min_size=64, max_size=96))
    fs.put(str(folder / "raw"), f"{BUCKET}/raw", recursive=True)
    torch.manual_seed(5)
    torch.save(build_backbone("tiny").state_dict(), folder / "tiny_backbone.pth")
    fs.put_file(str(folder / "tiny_backbone.pth"), f"{BUCKET}/weights/tiny_backbone.pth")
    yield server, folder
    monkeypatch.undo()
    server.stop()


def write_job(folder: Path, name: str, **training) -> Path:
    """The demo job at test size with every path in the bucket (the MLflow store stays a local SQLite file)."""
    document = yaml.safe_load(DEMO.read_text())
    del document["synthetic_dataset"]
    document["name"] = name
    document["data"]["root"] = f"s3://{BUCKET}/raw"
    document["preprocess"]["output"] = f"s3://{BUCKET}/shards"
    document["scaling"]["storage_path"] = f"s3://{BUCKET}/runs"
    document["model"]["backbone_weights"] = f"s3://{BUCKET}/weights/tiny_backbone.pth"
    document["stream"].update(crop_size=64, resize_base=64)
    document["training"].update({"max_steps": 4, "checkpoint_every": 2, "log_every": 1, **training})
    document["evaluation"]["max_images"] = 2
    document["tracking"].update(experiment="object_storage", log_pictures=0)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run_job(path: Path) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(path)]) == 0, printed.getvalue()[-3000:]
    return printed.getvalue()


@pytest.fixture(scope="module")
def trained(store):
    _, folder = store
    first = run_job(write_job(folder, "in_bucket"))
    again = run_job(write_job(folder, "in_bucket"))
    return folder, first, again


def tracked_run(folder: Path):
    client = mlflow.MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("object_storage").experiment_id],
                                "attributes.run_name = 'in_bucket'")
    return client, run


def test_preprocessing_training_and_checkpoints_live_in_the_bucket(trained):
    folder, first, again = trained
    fs = fresh_s3()
    for split in ("train", "val"):
        manifest = json.loads(fs.cat_file(f"{BUCKET}/shards/{split}/manifest.json"))
        assert manifest["num_samples"] > 0
        assert all(fs.exists(f"{BUCKET}/shards/{split}/{shard['name']}") for shard in manifest["shards"])
    assert ", 0 reused)" in first and "(0 written," in again, "a re-run did not reuse the shards in the bucket"
    checkpoints = sorted(path.rsplit("/", 1)[1] for path in fs.ls(f"{BUCKET}/runs/in_bucket") if "checkpoint_step_" in path)
    assert checkpoints == ["checkpoint_step_0000002", "checkpoint_step_0000004"]
    assert fs.exists(f"{BUCKET}/runs/in_bucket/checkpoint_step_0000004/trainer_rank1.pt")
    assert fs.exists(f"{BUCKET}/runs/in_bucket/model/model.pt") and not (folder / "runs").exists()
    client, run = tracked_run(folder)
    assert run.data.params["init.backbone_weights"] == f"s3://{BUCKET}/weights/tiny_backbone.pth"
    record = json.loads(run.data.tags["checkpoint.step_0000004"])
    assert record["uri"] == f"s3://{BUCKET}/runs/in_bucket/checkpoint_step_0000004"
    assert "the run already reached step 4" in again


def test_a_job_resumes_from_a_checkpoint_in_the_bucket(trained):
    folder, _, _ = trained
    client, run = tracked_run(folder)
    printed = run_job(write_job(folder, "resumed", max_steps=6, resume_from=f"runs:/{run.info.run_id}"))
    assert f"starts from s3://{BUCKET}/runs/in_bucket/checkpoint_step_0000004 (step 4)" in printed
    losses = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert losses == [1, 2, 3, 4, 5, 6]
    assert fresh_s3().exists(f"{BUCKET}/runs/resumed/checkpoint_step_0000006/trainer_rank0.pt")


def read_val_split(store_url: str) -> tuple[int, dict]:
    """Every image of the val split streamed from the bucket through `store_url`: (images, skips by reason)."""
    import os

    os.environ["AWS_ENDPOINT_URL"] = store_url
    fresh_s3()
    inputs = ModelInputs.from_config(make_config("tiny", num_queries=32))
    loader = build_eval_loader(f"s3://{BUCKET}/shards/val", inputs, rank=0, world_size=1)
    images = sum(len(batch["image_ids"]) for batch in loader)
    return images, loader.skip_reasons


def test_reads_dropped_by_the_store_are_retried_and_what_stays_lost_is_counted(trained, store):
    server, _ = store
    expected = json.loads(fresh_s3().cat_file(f"{BUCKET}/shards/val/manifest.json"))["num_samples"]
    try:
        flaky = ConnectionCutter(server.port, after_bytes=3000, cuts=READ_ATTEMPTS - 1, path_part=".tar")
        assert read_val_split(flaky.url) == (expected, {})
        assert flaky.cut == READ_ATTEMPTS - 1, "the store dropped no read: the test proves nothing"
        down = ConnectionCutter(server.port, after_bytes=3000, cuts=10**6, path_part=".tar")
        images, skipped = read_val_split(down.url)
        assert images < expected and skipped == {SKIP_BROKEN_TAR: expected - images}
    finally:
        import os

        os.environ["AWS_ENDPOINT_URL"] = server.url
        fresh_s3()
