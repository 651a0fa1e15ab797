"""OneFormer network: output contract, task conditioning, numerics against Hugging Face's port, the text
encoder's causal mask, parameter counts of the paper's models, and validation of presets and inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model import build_model, build_oneformer, make_config
from model.layers import sine_position_encoding
from model.text_mapper import TextMapper
from model.tokenizer import tokenize

pytestmark = pytest.mark.usefixtures("single_thread")

TASKS = ["semantic", "instance", "panoptic"]
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def tiny_training_model():
    torch.manual_seed(0)
    return build_model("tiny", training=True, num_classes=NUM_CLASSES)


def text_tokens_for(model, batch: int) -> torch.Tensor:
    num_texts = model.num_queries - model.text_mapper.num_context
    texts = ["a panoptic photo", "a photo with a cat", "a photo with a sky"] * num_texts
    return tokenize(texts[: batch * num_texts]).view(batch, num_texts, -1)


def non_square_images(batch: int) -> torch.Tensor:
    # 96 x 160: stride-32 map 3 x 5, odd in both directions.
    return torch.rand(batch, 3, 96, 160, generator=torch.Generator().manual_seed(1)) * 255


def test_outputs_follow_the_contract_for_all_tasks(tiny_training_model):
    model = tiny_training_model.train()
    images = non_square_images(3)
    queries = model.num_queries
    outputs = model(images, TASKS, text_tokens_for(model, 3))
    assert outputs["pred_logits"].shape == (3, queries, NUM_CLASSES + 1)
    assert outputs["pred_masks"].shape == (3, queries, 24, 40)
    assert len(outputs["aux_outputs"]) == 9
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == (3, queries, NUM_CLASSES + 1)
        assert aux["pred_masks"].shape == (3, queries, 24, 40)
    assert outputs["object_queries"].shape == (3, queries, 64)
    assert outputs["text_queries"].shape == (3, queries, 64)
    assert outputs["logit_scale"].shape == (1,)
    assert outputs["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    for tensor in (outputs["pred_logits"], outputs["pred_masks"], outputs["text_queries"]):
        assert torch.isfinite(tensor).all()

    with torch.no_grad():
        inference = model.eval()(images, TASKS)
    assert set(inference) == {"pred_logits", "pred_masks", "aux_outputs"}


def test_pixel_decoder_returns_maps_coarsest_first(tiny_training_model):
    model = tiny_training_model.eval()
    with torch.no_grad():
        features = model.backbone(non_square_images(1))
        mask_features, maps = model.pixel_decoder(features)
    assert mask_features.shape == (1, 64, 24, 40)
    assert [tuple(m.shape[-2:]) for m in maps] == [(3, 5), (6, 10), (12, 20)]


def test_first_prediction_comes_from_the_task_conditioned_queries(tiny_training_model):
    model = tiny_training_model.eval()
    images = non_square_images(2)
    with torch.no_grad():
        outputs = model(images, ["instance", "panoptic"], text_tokens_for(model, 2))
        mask_features, maps = model.pixel_decoder(
            model.backbone((images - model.pixel_mean) / model.pixel_std)
        )
        logits, masks, _ = model.transformer_decoder._predict(
            outputs["object_queries"], mask_features, (3, 5)
        )
    torch.testing.assert_close(outputs["aux_outputs"][0]["pred_logits"], logits)
    torch.testing.assert_close(outputs["aux_outputs"][0]["pred_masks"], masks)
    # The last object query is the (normalised) task token itself.
    task_token = model.transformer_decoder.decoder_norm(model.task_encoder(["instance", "panoptic"]))
    torch.testing.assert_close(outputs["object_queries"][:, -1], task_token)


def test_gradients_reach_every_trainable_part(tiny_training_model):
    model = tiny_training_model.train()
    model.zero_grad()
    outputs = model(non_square_images(2), ["semantic", "panoptic"], text_tokens_for(model, 2))
    loss = outputs["pred_masks"].sigmoid().mean() + outputs["pred_logits"].logsumexp(-1).mean()
    loss = loss + (outputs["object_queries"] * outputs["text_queries"]).sum() * outputs["logit_scale"].exp()
    loss.backward()
    for part in ("backbone", "pixel_decoder", "task_encoder", "transformer_decoder", "text_mapper"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part


def test_the_task_changes_the_predictions(tiny_training_model):
    model = tiny_training_model.eval()
    images = non_square_images(1).expand(3, -1, -1, -1)
    with torch.no_grad():
        outputs = model(images, TASKS)
        repeated = model(images[:1], ["semantic"])
    logits = outputs["pred_logits"]
    for first, second in ((0, 1), (0, 2), (1, 2)):
        assert (logits[first] - logits[second]).abs().max() > 1e-3
    torch.testing.assert_close(repeated["pred_logits"][0], logits[0], rtol=1e-4, atol=1e-5)


# --- numerics against the Hugging Face port ---------------------------------------------------------------


class _HuggingFaceBackbone(nn.Module):
    """HF's Swin feature extractor behind our backbone interface, so both models see the same features."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.out_channels = list(encoder.channels)
        self.out_strides = [4, 8, 16, 32]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encoder(images).feature_maps)


def _randomised(module: nn.Module) -> nn.Module:
    # Random values everywhere, so zero-initialised weights cannot hide a wrong mapping.
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.2)
    return module.eval()


def test_heads_match_transformers_numerically():
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    from transformers.models.oneformer.modeling_oneformer import OneFormerModel

    from model.convert.oneformer import convert_head_state_dict
    from model.task_conditioning import task_token_ids

    swin = transformers.SwinConfig(
        embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    hf_config = transformers.OneFormerConfig(
        backbone_config=swin, num_queries=20, conv_dim=64, mask_dim=64, hidden_dim=64, encoder_feedforward_dim=128,
        encoder_layers=2, decoder_layers=4, num_attention_heads=4, dim_feedforward=96, query_dec_layers=2,
    )  # fmt: skip
    hf_config.num_labels = 7
    reference = _randomised(OneFormerModel(hf_config))
    config = make_config(
        "tiny", num_classes=7, num_queries=20, hidden_dim=64, conv_dim=64, mask_dim=64, pixel_decoder_layers=2,
        pixel_decoder_heads=4, pixel_decoder_ffn_dim=128, decoder_layers=3, decoder_heads=4, decoder_ffn_dim=96,
        query_init_layers=2, pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    ours = build_oneformer(config, _HuggingFaceBackbone(reference.pixel_level_module.encoder)).eval()
    heads, unclaimed = convert_head_state_dict({f"model.{k}": v for k, v in reference.state_dict().items()})
    assert unclaimed == []
    missing, unexpected = ours.load_state_dict(heads, strict=False)
    assert unexpected == [] and all(name.startswith("backbone.") for name in missing)

    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    tasks = ["semantic", "instance"]
    with torch.no_grad():
        expected = reference(pixel_values=images, task_inputs=task_token_ids(tasks))
        got = ours(images, tasks)
    tolerance = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(
        got["pred_logits"], expected.transformer_decoder_class_predictions, **tolerance
    )
    torch.testing.assert_close(got["pred_masks"], expected.transformer_decoder_mask_predictions, **tolerance)
    assert len(got["aux_outputs"]) == len(expected.transformer_decoder_auxiliary_predictions)
    for aux, expected_aux in zip(got["aux_outputs"], expected.transformer_decoder_auxiliary_predictions):
        torch.testing.assert_close(aux["pred_logits"], expected_aux["class_queries_logits"], **tolerance)
        torch.testing.assert_close(aux["pred_masks"], expected_aux["masks_queries_logits"], **tolerance)


def test_text_mapper_matches_transformers_except_for_the_causal_mask():
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    from transformers.models.oneformer.modeling_oneformer import OneFormerTextMapper

    from model.convert.oneformer import convert_head_state_dict

    hf_config = transformers.OneFormerConfig(hidden_dim=64, text_encoder_width=64, text_encoder_num_layers=2)
    reference = _randomised(OneFormerTextMapper(hf_config))
    ours = TextMapper(hidden_dim=64, width=64, num_layers=2, num_heads=1).eval()
    state, unclaimed = convert_head_state_dict(
        {f"model.text_mapper.{k}": v for k, v in reference.state_dict().items()}
    )
    assert unclaimed == []
    missing, unexpected = ours.load_state_dict(
        {k.removeprefix("text_mapper."): v for k, v in state.items()}, strict=False
    )
    assert missing == ["logit_scale"] and unexpected == []

    tokens = tokenize(
        ["a photo with a cat", "a semantic photo", "a photo with a traffic light", "a"] * 2
    ).view(2, 4, -1)
    with torch.no_grad():
        expected = reference(tokens)
        causal, scale = ours(tokens)
        ours.text_encoder.causal_mask.zero_()  # what HF computes: its mask is built but never applied
        # Without the causal mask the mapper's cut after the last end token is not exact: encode at full length.
        encoded = ours.text_encoder(tokens.view(8, -1))
        unmasked = torch.cat(
            [ours.text_projector(encoded).view(2, 4, -1), ours.prompt_ctx.weight.expand(2, -1, -1)], dim=1
        )
    torch.testing.assert_close(unmasked, expected, rtol=1e-4, atol=1e-5)
    assert (causal - expected).abs().max() > 1e-3
    torch.testing.assert_close(scale, ours.logit_scale)  # the contrastive scale leaves through forward too


def test_text_encoder_output_ignores_tokens_after_the_end_token():
    # What makes the text mapper's cut after the last end token exact; the encoder itself never cuts.
    torch.manual_seed(0)
    encoder = TextMapper(hidden_dim=64, width=64, num_layers=2, num_heads=2).eval().text_encoder
    tokens = tokenize(["a photo with a dog", "an instance photo"])
    noisy = tokens.clone()
    noisy[:, 10:] = torch.randint(1, 40000, noisy[:, 10:].shape)  # after the end token, below its id
    with torch.no_grad():
        torch.testing.assert_close(encoder(noisy), encoder(tokens))
        # Without the causal mask the end token would see the changed tokens.
        encoder.causal_mask.zero_()
        assert (encoder(noisy) - encoder(tokens)).abs().max() > 1e-4


def test_sine_position_encoding_matches_transformers():
    pytest.importorskip("transformers", reason="transformers is a dev dependency")
    from transformers.models.oneformer.modeling_oneformer import OneFormerSinePositionEmbedding

    expected = OneFormerSinePositionEmbedding(num_position_features=32, normalize=True)(
        torch.Size([2, 7, 5, 9]), torch.device("cpu"), torch.float32
    )
    got = sine_position_encoding(2, 5, 9, 32, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(got, expected)


# --- parameter counts, presets, validation ----------------------------------------------------------------

# Paper figures (ADE20K, 250 queries, 150 classes, no text mapper); Swin-L as measured on HF's port.
PAPER_PARAMETERS = {"swin_l": 218.81e6, "convnext_l": 220e6, "convnext_xl": 372e6, "dinat_l": 223e6}


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMETERS))
def test_inference_parameter_counts_match_the_paper(preset):
    with torch.device("meta"):
        model = build_model(preset)
    assert model.text_mapper is None
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMETERS[preset]) / PAPER_PARAMETERS[preset] < 0.01, count


def test_text_mapper_is_built_only_for_training():
    with torch.device("meta"):
        inference = build_model("swin_l")
        training = build_model("swin_l", training=True)
    extra = sum(p.numel() for p in training.parameters()) - sum(p.numel() for p in inference.parameters())
    text_mapper = sum(p.numel() for p in training.text_mapper.parameters())
    assert extra == text_mapper > 0


def test_dataset_overrides_apply_the_official_settings():
    coco = make_config("swin_l", dataset="coco")
    assert (coco.num_classes, coco.num_queries, coco.object_mask_threshold, coco.test_topk) == (
        133,
        150,
        0.8,
        150,
    )
    cityscapes = make_config("dinat_l", dataset="cityscapes")
    assert (cityscapes.num_classes, cityscapes.num_queries, cityscapes.object_mask_threshold) == (
        19,
        250,
        0.8,
    )
    assert cityscapes.backbone_kwargs["dataset"] == "cityscapes"
    ade = make_config("convnext_l")
    assert (ade.num_classes, ade.num_queries, ade.object_mask_threshold, ade.overlap_threshold) == (
        150,
        250,
        0.5,
        0.8,
    )
    # Explicit overrides win over the dataset's settings.
    assert make_config("swin_l", dataset="coco", num_queries=100).num_queries == 100


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("resnet", {}, "preset must be one of"),
        ("swin_l", {"num_querys": 100}, "unknown override"),
        ("swin_l", {"dataset": "voc"}, "dataset must be one of"),
        ("swin_l", {"num_queries": 10}, "num_queries must exceed"),
        ("swin_l", {"num_classes": 0}, "num_classes must be a positive int"),
        ("swin_l", {"hidden_dim": 250.0}, "hidden_dim must be a positive int"),
        ("swin_l", {"decoder_layers": 6}, "only for the tiny preset"),
        ("swin_l", {"hidden_dim": 260}, "hidden_dim (260) must be divisible by decoder_heads"),
        ("swin_l", {"conv_dim": 200}, "conv_dim must be a multiple of 32"),
        ("swin_l", {"training": "yes"}, "training must be a bool"),
        ("swin_l", {"pixel_decoder_dropout": 1.5}, "pixel_decoder_dropout must be in"),
        ("swin_l", {"ms_deform_attn_backend": "cuda"}, "ms_deform_attn_backend must be"),
    ],
)
def test_bad_overrides_raise(preset, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(preset, **overrides)


def test_bad_inputs_raise(tiny_training_model):
    model = tiny_training_model.eval()
    images = non_square_images(2)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(images[..., :90, :], TASKS[:2])
    with pytest.raises(ValueError, match="tasks must be drawn from"):
        model(images, ["semantic", "depth"])
    with pytest.raises(ValueError, match="one entry per image"):
        model(images, ["semantic"])
    with pytest.raises(ValueError, match="text_tokens must be"):
        model(images, TASKS[:2], text_tokens_for(model, 2)[:, :3])
    with torch.device("meta"):
        inference_model = build_model("tiny")
    with pytest.raises(ValueError, match="no text mapper"):
        inference_model(images.to("meta"), TASKS[:2], text_tokens_for(model, 2).to("meta"))
