"""A randomly initialised small Hugging Face OneFormer (Swin backbone) converted to ours must give the same
predictions, final and auxiliary, for every task; the converter must refuse what it cannot map."""

import json
import logging
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the parity reference is the transformers port (dev extra)")

from model.checkpoint import load_model, save_model  # noqa: E402
from model.convert import (  # noqa: E402
    UnsupportedConfigError,
    from_transformers,
)
from model.convert.__main__ import main as convert_main  # noqa: E402
from model.tokenizer import tokenize  # noqa: E402

TASKS = ["semantic", "instance", "panoptic"]
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
# Non-square and large enough that every Swin stage is wider than the window (3): there HF and the official
# Swin agree (see model/convert/__init__.py for what HF does on smaller maps).
IMAGE_HEIGHT, IMAGE_WIDTH = 128, 160


def small_hf_config(**changes):
    backbone = transformers.SwinConfig(
        embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=3, image_size=160,
        drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    settings = dict(
        backbone_config=backbone, num_queries=7, hidden_dim=32, conv_dim=32, mask_dim=32,
        encoder_feedforward_dim=48, dim_feedforward=48, encoder_layers=2, decoder_layers=10,
        num_attention_heads=4, query_dec_layers=2, text_encoder_width=64, text_encoder_num_layers=1,
        text_encoder_n_ctx=2, id2label={i: f"class{i}" for i in range(5)},
    )  # fmt: skip
    settings.update(changes)
    return transformers.OneFormerConfig(**settings)


def save_small_hf_model(directory):
    torch.manual_seed(0)
    model = transformers.OneFormerForUniversalSegmentation(small_hf_config()).eval()
    with torch.no_grad():
        # HF's init zeroes biases and sets norms to 1: perturb everything so that each weight is tested.
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_oneformer")
    hf_model = save_small_hf_model(directory)
    return hf_model, from_transformers(directory, dataset="ade20k"), directory


def sample_images():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, IMAGE_HEIGHT, IMAGE_WIDTH, generator=generator) * 255
    return image.repeat(len(TASKS), 1, 1, 1)


def hf_predictions(hf_model, images):
    task_inputs = torch.cat([tokenize(f"the task is {task}") for task in TASKS]).float()
    with torch.no_grad():
        outputs = hf_model(pixel_values=(images - PIXEL_MEAN) / PIXEL_STD, task_inputs=task_inputs)
    finals = (outputs.class_queries_logits, outputs.masks_queries_logits)
    auxiliary = [(aux["class_queries_logits"], aux["masks_queries_logits"]) for aux in outputs.auxiliary_predictions]
    return [*auxiliary, finals]


def our_predictions(model, images):
    with torch.no_grad():
        outputs = model(images, TASKS)
    auxiliary = [(aux["pred_logits"], aux["pred_masks"]) for aux in outputs["aux_outputs"]]
    return [*auxiliary, (outputs["pred_logits"], outputs["pred_masks"])]


def assert_relative_close(ours, reference, what):
    error = ((ours - reference).abs().max() / reference.abs().max()).item()
    assert error < 1e-4, f"{what}: relative error {error:.2e}"


def test_predictions_match_transformers_for_every_task(converted):
    hf_model, model, _ = converted
    images = sample_images()
    expected = hf_predictions(hf_model, images)
    actual = our_predictions(model, images)
    assert len(actual) == len(expected) == 10
    for step, ((our_logits, our_masks), (hf_logits, hf_masks)) in enumerate(zip(actual, expected)):
        assert our_logits.shape == hf_logits.shape == (3, 7, 6)
        assert our_masks.shape == hf_masks.shape == (3, 7, IMAGE_HEIGHT // 4, IMAGE_WIDTH // 4)
        for index, task in enumerate(TASKS):
            assert_relative_close(our_logits[index], hf_logits[index], f"{task} class logits, prediction {step}")
            assert_relative_close(our_masks[index], hf_masks[index], f"{task} mask logits, prediction {step}")
    # The same image under different tasks must give different answers, or the task token would be unused.
    final_logits = actual[-1][0]
    assert not torch.allclose(final_logits[0], final_logits[1], atol=1e-3)


def test_checkpoint_round_trip_and_cli(converted, tmp_path):
    hf_model, model, directory = converted
    out = tmp_path / "converted.pt"
    convert_main([str(directory), "--out", str(out), "--dataset", "ade20k"])
    reloaded = load_model(out)
    assert not reloaded.training
    images = sample_images()[:1]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images, ["panoptic"])["pred_masks"], model(images, ["panoptic"])["pred_masks"])

    saved = tmp_path / "saved.pt"
    from model.convert import convert_transformers_checkpoint

    config, _ = convert_transformers_checkpoint(directory, dataset="ade20k")
    save_model(model, config, saved)
    assert torch.load(saved, weights_only=True)["config"]["backbone_kwargs"]["embed_dim"] == 16


def test_cli_stores_the_classes_it_knows_in_the_model_file(converted, tmp_path, caplog):
    """Names from id2label with the thing ids of preprocessor_config.json's metadata (what HF's image
    processor saves); without thing ids no classes and a warning saying why; --classes stores a given
    classes.json."""
    from model.checkpoint import read_classes

    directory = tmp_path / "hf"
    shutil.copytree(converted[2], directory)
    with caplog.at_level(logging.WARNING):
        convert_main([str(directory), "--out", str(tmp_path / "plain.pt"), "--dataset", "ade20k"])
    assert read_classes(tmp_path / "plain.pt") is None
    assert any("thing_ids" in record.getMessage() for record in caplog.records)

    metadata = {"0": "class0", "thing_ids": [1, 3], "class_names": [f"class{i}" for i in range(5)]}
    (directory / "preprocessor_config.json").write_text(json.dumps({"metadata": metadata}))
    convert_main([str(directory), "--out", str(tmp_path / "named.pt"), "--dataset", "ade20k"])
    classes = read_classes(tmp_path / "named.pt")
    assert classes.names == tuple(f"class{i}" for i in range(5))
    assert classes.is_thing == (False, True, False, True, False) and classes.category_ids == (0, 1, 2, 3, 4)

    given = [{"contiguous_id": k, "category_id": 7 + k, "name": f"c{k}", "isthing": k == 0} for k in range(5)]
    (tmp_path / "classes.json").write_text(json.dumps(given))
    out = tmp_path / "given.pt"
    classes_file = str(tmp_path / "classes.json")
    convert_main([str(directory), "--out", str(out), "--dataset", "ade20k", "--classes", classes_file])
    assert read_classes(out).to_json() == given


def test_training_model_gets_a_fresh_text_mapper_and_says_so(converted, caplog):
    hf_model, model, directory = converted
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        trainable = from_transformers(directory, dataset="ade20k", training=True)
    assert trainable.text_mapper is not None
    assert any("text mapper" in record.getMessage() for record in caplog.records)
    torch.testing.assert_close(
        trainable.transformer_decoder.class_embed.weight, model.transformer_decoder.class_embed.weight
    )
    # The contrastive temperature is the one weight of the HF loss module that carries over.
    torch.testing.assert_close(trainable.text_mapper.logit_scale.detach().reshape(()), hf_model.criterion.logit_scale.detach().float())


def test_unplaceable_weight_is_an_error(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = converted[2]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    state = load_file(str(directory / "model.safetensors"))
    state["model.transformer_module.decoder.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="extra_head"):
        from_transformers(tmp_path, dataset="ade20k")


@pytest.mark.parametrize(
    ("field", "value"),
    [("pre_norm", True), ("use_task_norm", False), ("enforce_input_proj", True), ("model_type", "maskformer")],
)
def test_unsupported_config_names_the_field(tmp_path, field, value):
    (tmp_path / "config.json").write_text(json.dumps({**small_hf_config().to_dict(), field: value}))
    with pytest.raises(UnsupportedConfigError, match=field):
        from_transformers(tmp_path, dataset="ade20k")


def test_unknown_class_count_needs_a_dataset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(small_hf_config().to_dict()))
    with pytest.raises(ValueError, match="dataset"):
        from_transformers(tmp_path)


def test_dinat_checkpoint_maps_every_weight(tmp_path, monkeypatch):
    """Key and shape coverage only: HF's DiNAT cannot run without NATTEN (not installed, and NATTEN 0.20+
    dropped what the released weights need), so numbers are not compared here."""
    import transformers.models.dinat.modeling_dinat as hf_dinat

    monkeypatch.setattr(hf_dinat, "requires_backends", lambda *args, **kwargs: None)  # building needs no kernel
    backbone = transformers.DinatConfig(
        embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3, dilations=[[1], [1], [1, 2], [1]],
        mlp_ratio=2.0, out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.OneFormerForUniversalSegmentation(small_hf_config(backbone_config=backbone)).save_pretrained(tmp_path)
    model = from_transformers(tmp_path, dataset="ade20k")
    assert type(model.backbone).__name__ == "DiNAT"
    assert model.backbone.out_channels == [16, 32, 64, 128]
