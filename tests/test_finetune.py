"""Fine-tuning a converted Hugging Face checkpoint on a COCO-instance export with another class count: every
weight but the class head comes from the checkpoint (our model file or the Hugging Face directory itself),
the class head starts fresh and says so, and the README's commands (jobs/finetune_custom.yaml with CPU-sized
overrides, then model.predict) train, report AP and PQ, and predict."""

import contextlib
import io
import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

pytest.importorskip("transformers", reason="the checkpoint is a converted transformers OneFormer (dev extra)")

from test_convert import save_small_hf_model  # noqa: E402

from model.checkpoint import CLASS_HEAD_KEYS, load_model, read_config  # noqa: E402
from model.convert.__main__ import main as convert_main  # noqa: E402
from model.predict import main as predict_main  # noqa: E402
from pipeline.config import JobConfigError, load_job  # noqa: E402
from pipeline.data.preprocess import run_preprocess  # noqa: E402
from pipeline.job import main as job_main  # noqa: E402
from pipeline.synthetic import GeneratorSettings, generate_dataset  # noqa: E402
from pipeline.train import build_training_model  # noqa: E402

TEMPLATE = Path(__file__).resolve().parent.parent / "jobs" / "finetune_custom.yaml"
HF_CLASSES, DATA_CLASSES = (
    5,
    6,
)  # the small checkpoint's id2label; the synthetic instance export's thing classes
CPU_OVERRIDES = [  # what README "Train on your own data" runs on a CPU, at this test's size
    "data.root=data/my_export",
    "model.weights=checkpoints/small.pt",
    "model.dataset=ade20k",
    "scaling.use_gpu=false",
    "scaling.cpus_per_worker=1",
    "deepspeed.precision=fp32",
    "stream.crop_size=64",
    "stream.batch_size=2",
    "stream.loader_workers=0",
    "stream.shuffle_buffer=8",
    "training.global_batch_size=2",
    "training.max_steps=4",
    "training.warmup_steps=1",
    "training.log_every=1",
    "evaluation.test_size=[64,256]",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A work directory with an instance export (6 classes) and a converted 5-class checkpoint."""
    root = tmp_path_factory.mktemp("finetune")
    generate_dataset(
        root / "data" / "my_export",
        num_images=8,
        seed=21,
        val_fraction=0.25,
        settings=GeneratorSettings(min_size=64, max_size=96),
        dataset_format="coco_instances",
    )
    save_small_hf_model(root / "hf")
    (root / "checkpoints").mkdir()
    convert_main([str(root / "hf"), "--out", str(root / "checkpoints" / "small.pt"), "--dataset", "ade20k"])
    return root


def _fine_tuning_job(workdir: Path, monkeypatch, *overrides):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(workdir))
    job = load_job(TEMPLATE, [*CPU_OVERRIDES, "preprocess.executor=local", *overrides])
    run_preprocess(job.data, job.preprocess)
    return job


@pytest.mark.parametrize("weights", ["checkpoints/small.pt", "hf"], ids=["model_file", "hf_directory"])
def test_every_weight_but_the_class_head_comes_from_the_checkpoint(workdir, monkeypatch, weights):
    job = _fine_tuning_job(workdir, monkeypatch, f"model.weights={weights}")
    config = job.model.oneformer_config(num_classes=DATA_CLASSES)
    assert config.backbone_kwargs == read_config(workdir / "checkpoints" / "small.pt").backbone_kwargs
    checkpoint = torch.load(workdir / "checkpoints" / "small.pt", weights_only=True)["model"]
    torch.manual_seed(0)
    model, initialised = build_training_model(job, config)
    state = model.state_dict()
    if (
        weights == "hf"
    ):  # the directory also carries the contrastive temperature (its loss module's logit scale)
        from safetensors.torch import load_file

        checkpoint["text_mapper.logit_scale"] = load_file(str(workdir / "hf" / "model.safetensors"))[
            "criterion.logit_scale"
        ]
    loaded = [key for key in checkpoint if key not in CLASS_HEAD_KEYS]
    for key in loaded:
        assert torch.equal(state[key], checkpoint[key].reshape(state[key].shape).to(state[key].dtype)), key
    for key in CLASS_HEAD_KEYS:
        assert state[key].shape[0] == DATA_CLASSES + 1 and checkpoint[key].shape[0] == HF_CLASSES + 1
    text_mapper = [key for key in state if key.startswith("text_mapper.") and key not in checkpoint]
    assert len(loaded) + len(CLASS_HEAD_KEYS) + len(text_mapper) == len(state)
    assert initialised["init.tensors_loaded"] == str(len(loaded))
    assert (
        initialised["init.reinitialised"]
        == ", ".join(CLASS_HEAD_KEYS) + f" ({HF_CLASSES} -> {DATA_CLASSES} classes)"
    )
    assert initialised["init.fresh_text_mapper_tensors"] == str(len(text_mapper))


def test_weights_problems_name_the_key(workdir, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(workdir))
    cases = {
        ("model.weights=null",): "model.preset: required unless model.weights",
        ("model.weights=checkpoints/absent.pt",): "model.weights: file not found",
        (
            "model.weights=hf",
            "model.dataset=null",
        ): "model.dataset: ",  # 5 classes: no released dataset has them
        ("model.weights=data/my_export/annotations",): "model.weights: ",  # a folder that is no HF checkpoint
    }
    for overrides, message in cases.items():
        with pytest.raises(JobConfigError, match=message):
            load_job(TEMPLATE, [*CPU_OVERRIDES, *overrides])


@pytest.mark.slow  # the job: Ray preprocessing and a Ray Train run under DeepSpeed
def test_readme_commands_fine_tune_report_ap_and_pq_and_predict(workdir, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(workdir))
    monkeypatch.chdir(workdir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert job_main([str(TEMPLATE), *CPU_OVERRIDES]) == 0
    exported = workdir / "runs" / "finetune_custom" / "model"
    metrics = json.loads((exported / "metrics.json").read_text())
    assert {"val/PQ", "val/PQ_th", "val/AP", "val/mIoU"} <= set(metrics) and "val/PQ_st" not in metrics
    assert [c["name"] for c in json.loads((exported / "classes.json").read_text())][:2] == ["disc", "square"]
    assert load_model(exported / "model.pt").transformer_decoder.class_embed.out_features == DATA_CLASSES + 1

    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("finetune_custom").experiment_id])
    assert run.data.params["init.reinitialised"].endswith(f"({HF_CLASSES} -> {DATA_CLASSES} classes)")
    checkpoint = torch.load(workdir / "checkpoints" / "small.pt", weights_only=True)["model"]
    assert run.data.params["init.tensors_loaded"] == str(len(checkpoint) - len(CLASS_HEAD_KEYS))
    assert {"val/PQ", "val/AP"} <= set(run.data.metrics)

    assert (
        predict_main(
            [
                "--checkpoint",
                str(exported / "model.pt"),
                "--all-tasks",
                "data/my_export/val",
                "--out",
                "predictions",
                "--test-size",
                "64",
                "256",
            ]
        )
        == 0
    )
    instances = json.loads((workdir / "predictions" / "instances.json").read_text())
    panoptic = json.loads((workdir / "predictions" / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == 2 and {r["image_id"] for r in instances} <= {
        a["image_id"] for a in panoptic["annotations"]
    }
    print(yaml.safe_dump({"metrics": metrics}))
