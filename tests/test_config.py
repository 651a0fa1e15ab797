"""Job files: every shipped one validates; each class of bad file fails before work, naming file and key."""

import stat
from pathlib import Path

import pytest
import yaml

from model.checkpoint import save_model
from model.presets import build_model, make_config
from pipeline.config import JobConfigError, load_job
from pipeline.data.stream import ModelInputs

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
    if document.get("model", {}).get("weights"):  # the weights a fine-tuning job starts from are an input
        weights = tmp_path / document["model"]["weights"]
        weights.parent.mkdir(parents=True)
        save_model(build_model("tiny"), make_config("tiny"), weights)
    if document["kind"] == "evaluate":  # the model file it scores and the shards it reads are inputs
        (tmp_path / document["evaluation"]["checkpoint"]).parent.mkdir(parents=True)
        (tmp_path / document["evaluation"]["checkpoint"]).touch()
        (tmp_path / document["evaluation"]["shards"] / "val").mkdir(parents=True)
        (tmp_path / document["evaluation"]["shards"] / "val" / "manifest.json").touch()
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
    config = job.model.oneformer_config()
    assert (job.model.preset, config.dataset, config.num_queries, job.stream.crop_size) == ("dinat_l", "ade20k", 250, (640, 640))
    assert (job.training.max_steps, job.training.global_batch_size, job.training.learning_rate) == (160000, 16, 1e-4)
    # The official clip never ran (docs/recipes.md): by default only NaN/inf are sanitised.
    assert (job.training.schedule, job.training.gradient_clip_norm, job.training.backbone_lr_multiplier) == ("poly", None, 0.1)


@pytest.mark.parametrize("job_file", [p for p in JOBS if p.name.startswith("train_")], ids=lambda p: p.name)
def test_recipes_derive_the_text_slots_from_the_model(job_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    (tmp_path / yaml.safe_load(job_file.read_text())["data"]["root"]).mkdir(parents=True)
    config = load_job(job_file).model.oneformer_config()
    expected_queries = {"coco": 150, "ade20k": 250, "ade20k_1280": 250, "cityscapes": 250}[config.dataset]
    assert config.num_queries == expected_queries
    assert ModelInputs.from_config(config).num_text_slots == expected_queries - 16


def test_coco_model_without_num_queries_gets_the_coco_text_list(tmp_path):
    document = demo_document()
    document["model"] = {"preset": "swin_l", "dataset": "coco"}
    job = load_job(write_job(tmp_path, document))
    assert ModelInputs.from_config(job.model.oneformer_config()).num_text_slots == 150 - 16


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"model": {"num_querys": 40}}, ["model.num_querys: unknown key", "did you mean 'model.num_queries'"]),
        ({"model": {"num_queries": 10}}, ["model.num_queries:", "must exceed text_num_context"]),
        ({"model": {"conv_dim": 48}}, ["model.conv_dim:", "multiple of 32"]),
        ({"model": {"training": False}}, ["model.training: set by the job"]),
        ({"stream": {"crop_size": 100}}, ["stream.crop_size", "model.size_divisibility (32)"]),
        ({"model": {"num_classes": 7}, "data": {"expected_num_classes": 10}},
         ["model.num_classes (7)", "data.expected_num_classes (10)"]),
    ],
    ids=["unknown-key", "queries", "conv-dim", "training", "crop-vs-size-multiple", "classes-vs-data"],
)
def test_model_section_is_validated_by_the_model_config_and_against_stream_and_data(tmp_path, changes, fragments):
    document = demo_document()
    for section, values in changes.items():
        document[section].update(values)
    expect_error(tmp_path, document, *fragments)


def test_num_classes_must_match_the_data():
    from pipeline.config import ModelSettings

    settings = ModelSettings(preset="tiny", num_classes=7)
    assert settings.oneformer_config(7).num_classes == 7
    with pytest.raises(ValueError, match="num_classes: 7 but the data has 10 classes"):
        settings.oneformer_config(10)
    assert ModelSettings(preset="tiny").oneformer_config(10).num_classes == 10


def test_command_line_overrides_are_validated_like_the_file(tmp_path):
    job = load_job(DEMO, ["training.max_steps=2", "scaling.num_workers=1", "training.global_batch_size=2",
                          "model.num_queries=40", "stream.crop_size=[64, 96]", "model.backbone_weights=null"])
    assert (job.training.max_steps, job.scaling.num_workers, job.stream.crop_size) == (2, 1, (64, 96))
    assert job.model.oneformer_config().num_queries == 40
    with pytest.raises(JobConfigError) as caught:
        load_job(DEMO, ["training.max_stepz=2"])
    assert "with overrides training.max_stepz=2" in str(caught.value)
    assert "training.max_stepz: unknown key" in str(caught.value)
    with pytest.raises(JobConfigError, match="training.max_steps: Input should be a valid integer"):
        load_job(DEMO, ["training.max_steps=many"])
    with pytest.raises(JobConfigError, match="not of the form section.key=value"):
        load_job(DEMO, ["training.max_steps"])
    with pytest.raises(JobConfigError, match="training.max_steps is not a section"):
        load_job(DEMO, ["training.max_steps.x=1"])


def test_check_shows_overrides_and_exits_2_on_a_bad_one(capsys):
    from pipeline.job import main

    assert main([str(DEMO), "training.max_steps=3", "--check"]) == 0
    out = capsys.readouterr().out
    assert "# overrides: training.max_steps=3" in out and "max_steps: 3" in out
    assert main([str(DEMO), "training.max_steps=zero", "--check"]) == 2
    assert "training.max_steps" in capsys.readouterr().err


def test_remote_backbone_weights_pass_check_and_local_ones_must_exist(tmp_path):
    document = demo_document()
    document["model"]["backbone_weights"] = "https://example.invalid/swin_large_patch4_window12_384_22k.pth"
    assert load_job(write_job(tmp_path, document)).model.backbone_weights.startswith("https://")
    document["model"]["backbone_weights"] = str(tmp_path / "absent.pth")
    expect_error(tmp_path, document, "model.backbone_weights: file not found")
    document["model"]["backbone_weights"] = "timm:not a name"
    expect_error(tmp_path, document, "model.backbone_weights", "timm:<model>")


def test_train_job_without_preprocess_needs_its_shards(tmp_path):
    document = demo_document()
    del document["preprocess"], document["synthetic_dataset"]
    document["stream"]["shards"] = str(tmp_path / "no_shards")
    (tmp_path / "data").mkdir()
    expect_error(tmp_path, document, "stream.shards: no shards for split 'train'")


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
        (lambda d: d["stream"].update(task_thresholds=[0.7, 0.3]), ["stream", "task_thresholds"]),
        (lambda d: d.pop("model"), ["a train job needs the section(s) model"]),
        (lambda d: d["deepspeed"].update(zero_stage=0, offload_optimizer=True), ["offload_optimizer needs zero_stage"]),
        (lambda d: d["deepspeed"].update(precision="fp16"), ["fp16 needs scaling.use_gpu"]),
    ],
    ids=["batch", "schedule", "thresholds", "section", "offload", "fp16-cpu"],
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


# ------------------------------------------------------------------------------------------ elastic scaling
@pytest.mark.parametrize("workers, fragment", [([0, 2], "1 <= min <= max"), ([3, 2], "1 <= min <= max"),
                                               ([1, 2, 3], "num_workers")])
def test_a_bad_worker_range_is_named(tmp_path, workers, fragment):
    document = demo_document()
    document["scaling"]["num_workers"] = workers
    expect_error(tmp_path, document, "scaling.num_workers", fragment)


def test_an_elastic_range_keeps_the_recipes_global_batch_where_it_divides(tmp_path):
    document = demo_document()
    document["scaling"]["num_workers"] = [1, 4]
    document["stream"]["batch_size"], document["training"]["global_batch_size"] = 2, 8
    job = load_job(write_job(tmp_path, document))
    layouts = {workers: job.batch_layout(workers) for workers in (1, 2, 3, 4)}
    assert [(layout.micro_batch, layout.accumulation) for layout in layouts.values()] == [(2, 4), (2, 2), (1, 3), (2, 1)]
    assert [layout.global_batch for layout in layouts.values()] == [8, 8, 9, 8]
    assert not layouts[3].exact and "not the recipe's 8" in layouts[3].describe()
    sized = job.at_world_size(2)
    assert (sized.stream.batch_size, sized.training.gradient_accumulation_steps, sized.scaling.num_workers) == (2, 2, 2)
    document["training"]["global_batch_size"] = 4  # checked at the most workers: 4 x 2 images
    expect_error(tmp_path, document, "training.global_batch_size (4) must equal scaling.num_workers (4 at most)")


def test_the_elastic_range_reaches_ray_train(tmp_path):
    from pipeline.launch import scaling_config

    document = demo_document()
    document["scaling"].update(num_workers=[1, 2], resize_check_s=5)
    elastic = scaling_config(load_job(write_job(tmp_path, document)))
    assert elastic.num_workers == (1, 2) and elastic.elastic_resize_monitor_interval_s == 5
    document["scaling"]["num_workers"] = [2, 2]
    assert scaling_config(load_job(write_job(tmp_path, document))).num_workers == 2
