"""What the trainer builds before training: the job's model with its backbone weights and whole-model weights
loaded strictly, and the model file's rules (strict, one named exception, one-line errors naming the file)."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from model.backbones import build_backbone
from model.checkpoint import ModelFileError, build_from_config, load_model, read_config, save_model
from pipeline.config import parse_job
from pipeline.train import build_training_model

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"


def job_with_model(**model):
    document = yaml.safe_load(DEMO.read_text())
    document["model"].update(model)
    return parse_job(document, "test")


def test_backbone_weights_reach_the_training_model(tmp_path):
    torch.manual_seed(3)
    weights = build_backbone("tiny").state_dict()
    torch.save(weights, tmp_path / "backbone.pth")
    job = job_with_model(backbone_weights=str(tmp_path / "backbone.pth"))
    model, initialised = build_training_model(job, job.model.oneformer_config(num_classes=4))
    for name, tensor in weights.items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    assert initialised == {"init.backbone_weights": str(tmp_path / "backbone.pth"),
                           "init.backbone_tensors_loaded": f"{len(weights)}/{len(weights)}"}


def test_model_weights_load_strictly_and_name_the_file(tmp_path):
    job = job_with_model(weights=str(tmp_path / "model.pt"))
    config = job.model.oneformer_config(num_classes=4)
    torch.manual_seed(4)
    source = build_from_config(config)
    save_model(source, config, tmp_path / "model.pt")
    model, initialised = build_training_model(job, config)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    assert initialised["init.tensors_loaded"] == str(len(source.state_dict()))

    other = job.model.oneformer_config(num_classes=9)  # another class count: only the class head starts fresh
    save_model(build_from_config(other), other, tmp_path / "model.pt")
    model, initialised = build_training_model(job, config)
    assert initialised["init.tensors_loaded"] == str(len(source.state_dict()) - 2)
    assert initialised["init.reinitialised"].startswith("transformer_decoder.class_embed.weight, ")

    other = dataclasses.replace(config, num_queries=20)  # any other misfit still fails
    save_model(build_from_config(other), other, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match=r"model\.pt: 1 tensors have the wrong shape: .*query_embed"):
        build_training_model(job, config)


def test_unrelated_or_damaged_files_fail_with_one_line_naming_them(tmp_path):
    config = job_with_model().model.oneformer_config(num_classes=4)
    torch.save({"layer.weight": torch.zeros(3)}, tmp_path / "state_dict.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    save_model(build_from_config(config), config, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    cases = {"state_dict.pt": "not a model file", "random.pt": "not a readable torch file",
             "truncated.pt": "not a readable torch file", "absent.pt": "model file not found"}
    for name, message in cases.items():
        with pytest.raises(ModelFileError) as caught:
            load_model(tmp_path / name)
        assert str(caught.value).startswith(f"{tmp_path / name}: {message}") and "\n" not in str(caught.value)
    assert read_config(tmp_path / "good.pt") == config


def test_a_model_file_without_text_mapper_is_the_one_named_exception(tmp_path, caplog):
    config = job_with_model().model.oneformer_config(num_classes=4)
    inference_config = dataclasses.replace(config, training=False)
    save_model(build_from_config(inference_config), inference_config, tmp_path / "inference.pt")
    with caplog.at_level("WARNING", logger="model.checkpoint"):
        trainable = load_model(tmp_path / "inference.pt", training=True)
    assert trainable.text_mapper is not None and "text mapper" in caplog.text
    state = build_from_config(config).state_dict()
    partial = {k: v for k, v in state.items() if k != "text_mapper.prompt_ctx.weight"}
    torch.save({"config": dataclasses.asdict(config), "model": partial}, tmp_path / "partial.pt")
    with pytest.raises(ModelFileError, match="1 missing .*prompt_ctx"):
        load_model(tmp_path / "partial.pt")

