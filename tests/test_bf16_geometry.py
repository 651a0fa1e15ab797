"""bf16 keeps the geometry exact: after a module cast to bf16 (what DeepSpeed's bf16 mode does), the pixel
decoder's reference points and sampling locations stay fp32 and match the fp32 model's to < 1e-3 px, the task
token ids reach the task MLP unrounded, and images are normalised with fp32 pixel statistics."""

from __future__ import annotations

import copy

import pytest
import torch

import model.pixel_decoder as pixel_decoder_module
from model import build_model
from model.pixel_decoder import PixelDecoder
from model.task_conditioning import TASKS, task_token_ids

pytestmark = pytest.mark.usefixtures("single_thread")

# ADE20K at 640 with Swin-L: res2..res5 of a 640 x 640 crop, batch 1, the backbone's real widths.
CROP = 640
WIDTHS = [192, 384, 768, 1536]
STRIDES = [4, 8, 16, 32]
ENCODER_SHAPES = [(CROP // stride, CROP // stride) for stride in (32, 16, 8)]  # coarsest first
MAX_PIXEL_ERROR = 1e-3


class KernelCalls:
    """Records what every deformable-attention call receives (and the offsets each layer computed)."""

    def __init__(self, monkeypatch, decoder: PixelDecoder):
        self.locations: list[torch.Tensor] = []
        self.offsets: list[torch.Tensor] = []
        kernel = pixel_decoder_module.ms_deform_attn

        def recording_kernel(value, spatial_shapes, level_start_index, locations, weights, backend=None):
            self.locations.append(locations.detach().clone())
            return kernel(value, spatial_shapes, level_start_index, locations, weights, backend=backend)

        monkeypatch.setattr(pixel_decoder_module, "ms_deform_attn", recording_kernel)
        for layer in decoder.layers:
            layer.self_attn.sampling_offsets.register_forward_hook(
                lambda module, inputs, output: self.offsets.append(output.detach().clone())
            )


def level_sizes() -> torch.Tensor:
    """(w, h) per encoder level, broadcastable against [B, Lq, H, L, P, 2] locations."""
    return torch.tensor([[w, h] for h, w in ENCODER_SHAPES], dtype=torch.float64).view(1, 1, 1, -1, 1, 2)


def offsets_in_frame(offsets: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """A layer's pixel offsets as a displacement in the [0, 1] frame, in float64."""
    return offsets.double().view(locations.shape) / level_sizes()


def run_decoder(monkeypatch, decoder: PixelDecoder, features: list[torch.Tensor]) -> KernelCalls:
    calls = KernelCalls(monkeypatch, decoder)
    with torch.no_grad():
        decoder(features)
    monkeypatch.undo()
    return calls


@pytest.fixture(scope="module")
def decoders_and_features():
    torch.manual_seed(0)
    decoder = PixelDecoder(WIDTHS, num_layers=2).eval()  # geometry is per layer: 2 of the 6 suffice
    with torch.no_grad():
        # Trained offsets are not the init's small integers (which bf16 holds exactly): make them arbitrary.
        for layer in decoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.02)
    features = [
        torch.randn(1, width, CROP // stride, CROP // stride) for width, stride in zip(WIDTHS, STRIDES)
    ]
    return decoder, copy.deepcopy(decoder).bfloat16(), features


def test_bf16_pixel_decoder_keeps_reference_points_and_sampling_locations_exact(
    decoders_and_features, monkeypatch
):
    decoder, decoder_bf16, features = decoders_and_features
    exact = run_decoder(monkeypatch, decoder, features)
    rounded = run_decoder(monkeypatch, decoder_bf16, [feature.bfloat16() for feature in features])
    assert len(rounded.locations) == len(exact.locations) == len(decoder.layers)
    for layer, (locations, locations_fp32) in enumerate(zip(rounded.locations, exact.locations)):
        assert locations.dtype == torch.float32, f"layer {layer}: the kernel got {locations.dtype} locations"
        # Reference points = locations minus the layer's own offsets; each model's offsets are its own.
        reference = locations.double() - offsets_in_frame(rounded.offsets[layer], locations)
        reference_fp32 = locations_fp32.double() - offsets_in_frame(exact.offsets[layer], locations_fp32)
        reference_error = ((reference - reference_fp32) * level_sizes()).abs().max().item()
        assert reference_error < MAX_PIXEL_ERROR, (
            f"layer {layer}: reference points off by {reference_error} px"
        )
        # The bf16 offsets added to the fp32 model's reference points in float64: what the kernel should get.
        expected = reference_fp32 + offsets_in_frame(rounded.offsets[layer], locations)
        location_error = ((locations.double() - expected) * level_sizes()).abs().max().item()
        assert location_error < MAX_PIXEL_ERROR, (
            f"layer {layer}: sampling locations off by {location_error} px"
        )


def test_bf16_pixel_decoder_at_init_samples_where_the_fp32_one_does(monkeypatch):
    # At init the offsets are small whole numbers that bf16 holds, so the locations themselves must agree.
    torch.manual_seed(0)
    decoder = PixelDecoder(WIDTHS, num_layers=1).eval()
    features = [
        torch.randn(1, width, CROP // stride, CROP // stride) for width, stride in zip(WIDTHS, STRIDES)
    ]
    exact = run_decoder(monkeypatch, decoder, features)
    rounded = run_decoder(monkeypatch, copy.deepcopy(decoder).bfloat16(), [f.bfloat16() for f in features])
    error = ((rounded.locations[0].double() - exact.locations[0].double()) * level_sizes()).abs().max().item()
    assert error < MAX_PIXEL_ERROR, f"bf16 sampling locations off by {error} px"


@pytest.fixture(scope="module")
def bf16_model():
    torch.manual_seed(0)
    return build_model("tiny", training=True, num_classes=5).eval().bfloat16()


def test_task_ids_reach_the_task_mlp_unrounded(bf16_model):
    seen = []
    hook = bf16_model.task_encoder.task_mlp.register_forward_pre_hook(
        lambda module, args: seen.append(args[0])
    )
    try:
        with torch.no_grad():
            tokens = bf16_model.task_encoder(list(TASKS))
    finally:
        hook.remove()
    ids = task_token_ids(list(TASKS))
    assert ids.max() > 256, "the test needs ids that bf16 cannot hold exactly"
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0].long(), ids)
    assert tokens.dtype == torch.bfloat16  # the rest of the model runs in its own dtype


def test_pixel_statistics_stay_fp32_and_exact_after_module_casts(bf16_model):
    config_mean, config_std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    for buffer, values in ((bf16_model.pixel_mean, config_mean), (bf16_model.pixel_std, config_std)):
        assert buffer.dtype == torch.float32
        assert torch.equal(buffer.flatten(), torch.tensor(values, dtype=torch.float32))
    # Casting back up does not bring the rounding of a round trip through bf16 with it.
    restored = copy.deepcopy(bf16_model).float()
    assert torch.equal(restored.pixel_mean.flatten(), torch.tensor(config_mean, dtype=torch.float32))
    assert copy.deepcopy(bf16_model).double().pixel_std.dtype == torch.float64


def test_bf16_model_normalises_fp32_images_in_fp32(bf16_model):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    seen = []
    hook = bf16_model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            outputs = bf16_model(images, ["panoptic"])
    finally:
        hook.remove()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], ((images - mean) / std).bfloat16())
    assert outputs["pred_masks"].dtype == torch.bfloat16
    assert torch.isfinite(outputs["pred_masks"].float()).all()
