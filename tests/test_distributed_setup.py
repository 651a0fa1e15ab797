"""The DeepSpeed wrapping decisions: parameter groups, learning-rate schedules, the engine config, and the
NaN/inf gradient handling of the official recipe."""

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pipeline.config import parse_job
from pipeline.distributed import (
    _sanitise_gradient,
    deepspeed_config,
    learning_rate_factor,
    parameter_groups,
)

DEMO = Path(__file__).resolve().parent.parent / "jobs" / "demo_cpu.yaml"


def job_with(**training):
    document = yaml.safe_load(DEMO.read_text())
    document["training"].update(training)
    return parse_job(document, "test")


class TwoPartModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
        self.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
        self.head = nn.Linear(4, 2)
        self.query_embed = nn.Embedding(3, 4)


def test_parameter_groups_follow_the_official_no_decay_rule():
    model = TwoPartModel()
    groups = {g["name"]: g for g in parameter_groups(model, learning_rate=1e-4, weight_decay=0.05, backbone_multiplier=0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    # Biases are decayed; norm layers, nn.Embedding and relative position tables are not.
    assert ids["backbone_decay"] == {id(model.backbone[0].weight), id(model.backbone[0].bias)}
    assert ids["backbone_no_decay"] == {id(model.backbone[1].weight), id(model.backbone[1].bias),
                                        id(model.backbone.relative_position_bias_table)}
    assert ids["heads_decay"] == {id(model.head.weight), id(model.head.bias)}
    assert ids["heads_no_decay"] == {id(model.query_embed.weight)}
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-5) and groups["heads_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["heads_no_decay"]["weight_decay"] == 0.0 and groups["heads_decay"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_poly_schedule_matches_its_formula_and_reaches_zero():
    job = job_with(max_steps=100, poly_power=0.9)
    assert learning_rate_factor(0, job) == 1.0
    assert learning_rate_factor(50, job) == pytest.approx(0.5**0.9)
    assert learning_rate_factor(100, job) == 0.0


def test_step_schedule_and_warmup():
    job = job_with(max_steps=100, schedule="step", step_milestones=[60, 90], step_gamma=0.1, warmup_steps=10)
    assert learning_rate_factor(0, job) == pytest.approx(0.1)
    assert learning_rate_factor(9, job) == pytest.approx(1.0)
    assert learning_rate_factor(59, job) == 1.0
    assert learning_rate_factor(60, job) == pytest.approx(0.1)
    assert learning_rate_factor(95, job) == pytest.approx(0.01)


def test_deepspeed_config_follows_the_job():
    document = yaml.safe_load(DEMO.read_text())
    document["deepspeed"].update(zero_stage=3, precision="bf16", extra_config={"zero_optimization": {"overlap_comm": True}})
    config = deepspeed_config(parse_job(document, "test"))
    assert config["train_batch_size"] == 4 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_clipping"] == 0.0  # the official effective behaviour: no clip
    document["training"]["gradient_clip_norm"] = 0.01
    assert deepspeed_config(parse_job(document, "test"))["gradient_clipping"] == 0.01
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}


def test_nan_gradients_become_zero_and_inf_is_clamped():
    gradient = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
    assert torch.equal(_sanitise_gradient(gradient), torch.tensor([0.0, 1e5, -1e5, 2.0]))


def test_optimizer_offload_keeps_our_torch_adamw():
    document = yaml.safe_load(DEMO.read_text())
    document["deepspeed"].update(offload_optimizer=True)
    config = deepspeed_config(parse_job(document, "test"))
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_force_ds_cpu_optimizer"] is False


def test_oneformer_groups_match_the_official_rule_per_backbone():
    from model import build_model

    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)

    def no_decay_names(preset):
        model = build_model(preset, training=True, num_classes=3)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = parameter_groups(model, learning_rate=1e-4, weight_decay=0.05, backbone_multiplier=0.1)
        norms = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, norm_types)
                 for n, _ in module.named_parameters(recurse=False)}
        return {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}, norms

    tiny, norms = no_decay_names("tiny")  # a small DiNAT
    embeddings = {"transformer_decoder.query_embed.weight", "transformer_decoder.level_embed.weight",
                  "text_mapper.text_encoder.token_embedding.weight", "text_mapper.prompt_ctx.weight"}
    assert embeddings <= tiny
    assert any(name.startswith("backbone.") and "norm" in name for name in tiny)
    # nn.Parameter embeddings, scales, DiNAT's "rpb" and every bias outside norms are decayed, as officially.
    assert not any(name.endswith(".rpb") for name in tiny)
    for decayed in ("pixel_decoder.level_embed", "text_mapper.text_encoder.positional_embedding", "text_mapper.logit_scale"):
        assert decayed not in tiny
    assert tiny == embeddings | norms
    convnext, _ = no_decay_names("convnext_l")
    assert not any(name.startswith("backbone.") for name in convnext)  # the official ConvNeXt's norms decay
