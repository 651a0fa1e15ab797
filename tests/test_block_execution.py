"""Activation checkpointing and per-block compilation of the repeated blocks (model.block_execution):
identical losses and gradients with recomputation (dropout and drop-path active), fewer saved activations,
the right blocks marked, compiled blocks computing what eager ones do, and errors for unknown kinds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import build_model
from model.backbones import ConvNeXtBackbone, SwinTransformer
from model.block_execution import BLOCK_KINDS, blocks_of, compile_blocks, set_activation_checkpointing
from model.criterion import LossConfig, training_loss
from model.tokenizer import tokenize

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64
DEMO_JOB = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"


def tiny_training_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", training=True).train()


def tiny_batch(model) -> dict:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator) * 255
    masks = torch.zeros(2, 2, SIZE, SIZE, dtype=torch.bool)
    masks[:, 0, :32], masks[:, 1, 32:] = True, True
    targets = [{"labels": torch.tensor([1, 2]), "masks": masks[i]} for i in range(2)]
    num_texts = model.num_queries - model.text_mapper.num_context
    texts = tokenize(["a photo with a class1", "a photo with a class2"] + ["a panoptic photo"] * (num_texts - 2))
    return {"images": images, "tasks": ["panoptic", "semantic"], "targets": targets,
            "text_tokens": texts.unsqueeze(0).repeat(2, 1, 1)}  # fmt: skip


def loss_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses = LossConfig(num_points=64)
    criterion = losses.build_criterion(model.transformer_decoder.class_embed.out_features - 1)
    torch.manual_seed(7)  # the same dropout and drop-path draws in every run
    model.zero_grad(set_to_none=True)
    loss, _ = training_loss(model, criterion, losses, batch["images"], batch["tasks"], batch["text_tokens"],
                            batch["targets"], generator=torch.Generator().manual_seed(3))  # fmt: skip
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), gradients


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes the autograd graph keeps for the backward pass (checkpointed blocks keep their own outside it)."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(batch["images"], batch["tasks"], batch["text_tokens"])
    return saved


@pytest.mark.parametrize("kinds", [BLOCK_KINDS, ("backbone",), ("transformer_decoder", "text_mapper")])
def test_checkpointing_leaves_loss_and_every_gradient_unchanged(kinds):
    model = tiny_training_model()
    batch = tiny_batch(model)
    loss, gradients = loss_and_gradients(model, batch)
    assert set_activation_checkpointing(model, kinds) > 0
    loss_checkpointed, gradients_checkpointed = loss_and_gradients(model, batch)
    assert torch.equal(loss, loss_checkpointed)
    assert gradients.keys() == gradients_checkpointed.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_checkpointed[name], gradient, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_everything_keeps_far_fewer_activations():
    model = tiny_training_model()
    batch = tiny_batch(model)
    full = saved_activation_bytes(model, batch)
    set_activation_checkpointing(model, ("backbone",))
    backbone_only = saved_activation_bytes(model, batch)
    set_activation_checkpointing(model, BLOCK_KINDS)
    everything = saved_activation_bytes(model, batch)
    assert everything < backbone_only < full
    assert everything < 0.4 * full, (everything, full)
    set_activation_checkpointing(model, ())
    assert saved_activation_bytes(model, batch) == full


def test_no_recomputation_without_gradients():
    model = tiny_training_model()
    set_activation_checkpointing(model, BLOCK_KINDS)
    calls = []
    block = blocks_of(model, "pixel_decoder")[0]
    block.register_forward_hook(lambda *_: calls.append(1))
    batch = tiny_batch(model)
    with torch.no_grad():
        model(batch["images"], batch["tasks"])
    assert len(calls) == 1


@pytest.mark.parametrize(
    "backbone, expected_blocks",
    [
        (lambda: SwinTransformer(32, [1, 1, 2, 1], [1, 2, 4, 8], window_size=4, drop_path_rate=0.3), 5),
        (lambda: ConvNeXtBackbone([1, 1, 2, 1], [32, 64, 128, 256], drop_path_rate=0.3), 5),
    ],
)
def test_backbone_blocks_checkpointed_with_drop_path_give_the_same_gradients(backbone, expected_blocks):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.backbone = backbone().train()
    assert len(blocks_of(model, "backbone")) == expected_blocks
    images = torch.randn(2, 3, SIZE, SIZE)

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        features = model.backbone(images)
        sum(feature.square().mean() for feature in features).backward()
        return [f.detach() for f in features], [p.grad.clone() for p in model.parameters()]

    features, gradients = run()
    set_activation_checkpointing(model, ("backbone",))
    features_checkpointed, gradients_checkpointed = run()
    for expected, got in zip(features + gradients, features_checkpointed + gradients_checkpointed):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_only_the_named_components_are_marked():
    model = tiny_training_model()
    set_activation_checkpointing(model, ("pixel_decoder",))
    for kind in BLOCK_KINDS:
        marks = {getattr(block, "checkpoint_activations", False) for block in blocks_of(model, kind)}
        assert marks == {kind == "pixel_decoder"}, kind


def test_unknown_block_kind_is_refused_with_the_known_ones():
    model = tiny_training_model()
    with pytest.raises(ValueError, match="unknown block kind 'decoder'.*backbone"):
        set_activation_checkpointing(model, ("decoder",))
    with pytest.raises(ValueError, match="block kind must be one of"):
        compile_blocks(model, ("decoder",))


@pytest.mark.slow
def test_compiled_blocks_compute_what_eager_blocks_do():
    model = tiny_training_model()
    batch = tiny_batch(model)
    loss, gradients = loss_and_gradients(model, batch)
    # Two components whose blocks all share one shape (one graph each): compiling on a CPU is slow.
    compiled = compile_blocks(model, ("pixel_decoder", "text_mapper"))
    assert compiled == len(blocks_of(model, "pixel_decoder")) + len(blocks_of(model, "text_mapper"))
    loss_compiled, gradients_compiled = loss_and_gradients(model, batch)
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-4, atol=1e-5)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_compiled[name], gradient, rtol=1e-3, atol=1e-5, msg=name)


def test_the_job_keys_reach_the_training_model(tmp_path, monkeypatch):
    from pipeline.config import load_job
    from pipeline.train import build_training_model

    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    job = load_job(DEMO_JOB, ["model.activation_checkpointing=[backbone, text_mapper]"])
    model, _ = build_training_model(job, job.model.oneformer_config())
    for kind in BLOCK_KINDS:
        marks = {getattr(block, "checkpoint_activations", False) for block in blocks_of(model, kind)}
        assert marks == {kind in ("backbone", "text_mapper")}, kind
