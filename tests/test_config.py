"""Job files: every shipped one validates; each class of bad file fails before work, naming file and key."""

import stat
from pathlib import Path

import pytest
import yaml

from pipeline.config import JobConfigError, load_job

JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))
DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"


def demo_document() -> dict:
    return yaml.safe_load(DEMO.read_text())


def write_job(tmp_path: Path, document: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def expect_error(tmp_path: Path, document: dict, *fragments: str) -> str:
    path = write_job(tmp_path, document)
    with pytest.raises(JobConfigError) as caught:
        load_job(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("job_file", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_job_validates_and_runs_as_a_script(job_file, tmp_path, monkeypatch):
    # Cluster jobs name raw data relative to ONEFORMER_WORKDIR (the shared mount); stand one in for it.
    document = yaml.safe_load(job_file.read_text())
    if "synthetic_dataset" not in document:
        monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
        (tmp_path / document["data"]["root"]).mkdir(parents=True)
    if document["kind"] == "evaluate":  # the model file it scores is an input
        (tmp_path / document["evaluation"]["checkpoint"]).parent.mkdir(parents=True)
        (tmp_path / document["evaluation"]["checkpoint"]).touch()
    job = load_job(job_file)
    assert job.name
    first_line = job_file.read_text().splitlines()[0]
    assert first_line.startswith("#!") and "pipeline.job" in first_line
    assert job_file.stat().st_mode & stat.S_IXUSR, f"{job_file.name} lost its run bit"


def test_the_paper_recipes_are_shipped():
    names = {p.name for p in JOBS}
    assert {"demo_cpu.yaml", "preprocess_synthetic.yaml", "train_dinat_l.yaml"} <= names
    for recipe in ("swin_l_ade20k", "convnext_l_ade20k", "convnext_xl_ade20k", "swin_l_coco", "dinat_l_coco",
                   "swin_l_cityscapes", "convnext_l_cityscapes", "dinat_l_cityscapes"):
        assert f"train_{recipe}.yaml" in names


def test_dinat_l_recipe_is_the_paper_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    (tmp_path / "datasets" / "ADEChallengeData2016").mkdir(parents=True)
    job = load_job(JOBS[0].parent / "train_dinat_l.yaml")
    assert (job.model.preset, job.model.dataset, job.stream.crop_size) == ("dinat_l", "ade20k", (640, 640))
    assert (job.training.max_steps, job.training.global_batch_size, job.training.learning_rate) == (160000, 16, 1e-4)
    assert (job.training.schedule, job.training.gradient_clip_norm, job.training.backbone_lr_multiplier) == ("poly", 0.01, 0.1)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    document = demo_document()
    document["training"]["learning_rat"] = 0.1
    expect_error(tmp_path, document, "training.learning_rat: unknown key", "did you mean 'training.learning_rate'")


def test_unknown_section_is_named(tmp_path):
    document = demo_document()
    document["trainig"] = {"max_steps": 3}
    expect_error(tmp_path, document, "trainig: unknown key", "did you mean 'training'")


def test_wrong_types_are_named_with_the_value(tmp_path):
    document = demo_document()
    document["stream"]["batch_size"] = "two"
    document["deepspeed"]["zero_stage"] = 4
    message = expect_error(tmp_path, document, "stream.batch_size", "'two'", "deepspeed.zero_stage")
    assert message.count("\n  - ") == 2


def test_missing_required_key_is_named(tmp_path):
    document = demo_document()
    del document["training"]["max_steps"]
    expect_error(tmp_path, document, "training.max_steps: required key is missing")


def test_missing_job_file_and_missing_input_file(tmp_path):
    with pytest.raises(JobConfigError, match="job file not found"):
        load_job(tmp_path / "absent.yaml")
    document = demo_document()
    document["model"]["weights"] = str(tmp_path / "no_such_checkpoint.pt")
    expect_error(tmp_path, document, "model.weights: file not found", "no_such_checkpoint.pt")


def test_preprocess_job_needs_its_raw_data(tmp_path):
    document = {"kind": "preprocess", "name": "p", "data": {"format": "coco_panoptic", "root": str(tmp_path / "coco")},
                "preprocess": {"output": str(tmp_path / "shards")}}
    expect_error(tmp_path, document, "data.root: file not found")


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda d: d["training"].update(global_batch_size=8), ["contradiction", "global_batch_size (8)", "= 4"]),
        (lambda d: d["training"].update(schedule="step"), ["training", "schedule 'step' needs step_milestones"]),
        (lambda d: d["model"].update(num_queries=40), ["model.num_queries (40)", "stream.num_queries (32)"]),
        (lambda d: d["stream"].update(task_thresholds=[0.7, 0.3]), ["stream", "task_thresholds"]),
        (lambda d: d.pop("model"), ["a train job needs the section(s) model"]),
        (lambda d: d["deepspeed"].update(zero_stage=0, offload_optimizer=True), ["offload_optimizer needs zero_stage"]),
        (lambda d: d["deepspeed"].update(precision="fp16"), ["fp16 needs scaling.use_gpu"]),
    ],
    ids=["batch", "schedule", "queries", "thresholds", "section", "offload", "fp16-cpu"],
)
def test_contradictions_fail_before_work(tmp_path, change, fragments):
    document = demo_document()
    change(document)
    expect_error(tmp_path, document, *fragments)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(JobConfigError, match="must be a YAML mapping"):
        load_job(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("kind: [train\n")
    with pytest.raises(JobConfigError, match="not valid YAML"):
        load_job(tmp_path / "bad.yaml")


def test_relative_paths_resolve_against_the_work_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    job = load_job(DEMO)
    assert job.data.root == str(tmp_path / "data" / "synthetic")
    assert job.preprocess.output == str(tmp_path / "data" / "synthetic_shards")
    assert job.tracking.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert job.scaling.storage_path == str(tmp_path / "runs")
    document = demo_document()
    document["scaling"]["storage_path"] = "s3://bucket/runs"
    document["data"]["root"] = "/absolute/data"
    job = load_job(write_job(tmp_path, document))
    assert job.scaling.storage_path == "s3://bucket/runs"
    assert job.data.root == "/absolute/data"


def test_evaluate_jobs_need_an_existing_model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    document = yaml.safe_load((DEMO.parent / "evaluate_demo.yaml").read_text())
    (tmp_path / document["data"]["root"]).mkdir(parents=True)
    expect_error(tmp_path, document, "evaluation.checkpoint", "file not found", "runs/demo_cpu/model/model.pt")
    del document["evaluation"]["checkpoint"]
    expect_error(tmp_path, document, "an evaluate job needs evaluation.checkpoint")
