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


def test_parameter_groups_split_backbone_and_no_decay():
    model = TwoPartModel()
    groups = {g["name"]: g for g in parameter_groups(model, learning_rate=1e-4, weight_decay=0.05, backbone_multiplier=0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["backbone_decay"] == {id(model.backbone[0].weight)}
    assert ids["backbone_no_decay"] == {id(model.backbone[0].bias), id(model.backbone[1].weight),
                                        id(model.backbone[1].bias), id(model.backbone.relative_position_bias_table)}
    assert ids["heads_decay"] == {id(model.head.weight)}
    assert ids["heads_no_decay"] == {id(model.head.bias), id(model.query_embed.weight)}
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
    assert config["gradient_clipping"] == 0.01
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
