"""The one place where the plain OneFormer becomes a DeepSpeed engine: parameter groups (backbone multiplier,
the official no-decay rule), AdamW, the poly/step schedule, ZeRO stage, precision, the NaN/inf gradient
handling of the official recipe, and the optional full-model clip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import filelock
import torch
from torch import nn

from pipeline.config import PROJECT_ROOT, JobConfig

# The official rule (detectron2-style build_optimizer of the official train_net.py): no weight decay for the
# parameters of normalisation layers and nn.Embedding, and for parameters named like these; everything else,
# biases included, is decayed.
NO_DECAY_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                    nn.LayerNorm, nn.LocalResponseNorm, nn.Embedding)
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def configure_deepspeed_environment(use_gpu: bool) -> None:
    """Before deepspeed is imported: its CPU accelerator when there is no GPU, and its JIT-compiled ops cached
    under the project rather than rebuilt in every temporary Ray working directory."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".cache" / "torch_extensions"))


def _is_no_decay(module: nn.Module, parameter_name: str, norms_decay: bool) -> bool:
    if isinstance(module, nn.Embedding) or any(name in parameter_name for name in NO_DECAY_NAMES):
        return True
    return isinstance(module, NO_DECAY_MODULES) and not norms_decay


def _official_norms_decay(model: nn.Module, module_name: str) -> bool:
    """The official ConvNeXt uses its own LayerNorm class, which the torch-norm rule does not catch, so its
    norms are decayed there; timm's ConvNeXt (ours) uses torch's LayerNorm, so we say so explicitly."""
    from model.backbones.convnext import ConvNeXtBackbone

    return module_name.startswith("backbone") and isinstance(getattr(model, "backbone", None), ConvNeXtBackbone)


def parameter_groups(model: nn.Module, learning_rate: float, weight_decay: float, backbone_multiplier: float) -> list[dict]:
    """AdamW groups: (backbone or not) x (decay or not); empty groups are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()  # a shared parameter joins the group of the first module that owns it
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            no_decay = _is_no_decay(module, parameter_name, _official_norms_decay(model, module_name))
            key = (module_name.startswith("backbone"), no_decay)
            groups.setdefault(key, []).append(parameter)
    return [
        {"params": params, "lr": learning_rate * (backbone_multiplier if is_backbone else 1.0),
         "weight_decay": 0.0 if no_decay else weight_decay,
         "name": f"{'backbone' if is_backbone else 'heads'}_{'no_decay' if no_decay else 'decay'}"}
        for (is_backbone, no_decay), params in sorted(groups.items())
    ]


def learning_rate_factor(step: int, job: JobConfig) -> float:
    """Multiplier of the base learning rate at `step` (0-based): warm-up, then poly or step decay."""
    training = job.training
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    if training.schedule == "poly":
        return (1 - min(step, training.max_steps) / training.max_steps) ** training.poly_power
    return training.step_gamma ** sum(step >= milestone for milestone in training.step_milestones)


def _sanitise_gradient(gradient: torch.Tensor) -> torch.Tensor:
    # The official recipe zeroes NaN gradients and clamps inf to +-1e5 (its configured clip then never runs).
    return torch.nan_to_num(gradient, nan=0.0, posinf=1e5, neginf=-1e5)


def deepspeed_config(job: JobConfig, load_universal: bool = False) -> dict:
    """`load_universal`: the engine will load a checkpoint in DeepSpeed's universal form (a resized run)."""
    micro_batch = job.stream.batch_size
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": job.training.gradient_accumulation_steps,
        "train_batch_size": job.training.global_batch_size,
        "gradient_clipping": job.training.gradient_clip_norm or 0.0,  # 0: DeepSpeed does not clip
        "zero_optimization": {"stage": job.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if job.deepspeed.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif job.deepspeed.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if job.deepspeed.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": job.scaling.use_gpu}
        # Our AdamW is torch's (no compiled op needed); DeepSpeed otherwise insists on its own CPU Adam here.
        config["zero_force_ds_cpu_optimizer"] = False
    return _merged(config, job.deepspeed.extra_config)


def _merged(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def wrap_with_deepspeed(model: nn.Module, job: JobConfig, load_universal: bool = False):
    """DeepSpeed engine with AdamW and the schedule of the job; returns (engine, scheduler)."""
    import deepspeed

    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.register_hook(_sanitise_gradient)
    groups = parameter_groups(model, job.training.learning_rate, job.training.weight_decay,
                              job.training.backbone_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=job.training.learning_rate, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, job))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job, load_universal)
    )
    return engine, scheduler


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's state on every rank, as fp32 CPU tensors (in the training precision's values). Under
    ZeRO-3 every rank must call it: the partitioned parameters are gathered for the copy and released after."""
    import deepspeed

    module = engine.module
    gathered = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=gathered):
        return {name: tensor.detach().float().cpu().clone() if tensor.is_floating_point() else tensor.detach().cpu().clone()
                for name, tensor in module.state_dict().items()}


# ------------------------------------------------------------------------------------------ resizing
def checkpoint_client_state() -> dict:
    """What every checkpoint carries so that DeepSpeed's universal conversion accepts it."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def has_partitioned_optimizer(folder: str, tag: str) -> bool:
    """Whether the optimizer state of a DeepSpeed checkpoint is split by rank (ZeRO 1-3, bf16): then only the
    universal format loads it on another world size (stage 0 keeps it whole in the model states file)."""
    return any(Path(folder, tag).glob("*zero_pp_rank_*optim_states.pt"))


def load_resized(engine, folder: str, tag: str, key: str) -> None:
    """Load into `engine` (built with load_universal) a checkpoint written on another world size, through
    DeepSpeed's universal form of it (deepspeed.checkpoint.ds_to_universal): made once per node in the temporary
    folder by whichever rank gets there first (`key` names the checkpoint's content) and removed when every
    rank has loaded it."""
    import torch.distributed as dist

    group_names = [group["name"] for group in _torch_optimizer(engine).param_groups]
    root = Path(tempfile.gettempdir()) / "oneformer_universal" / key
    root.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(root) + ".lock"):
        made_here = not (root / "complete").exists()
        if made_here:
            _convert_to_universal(Path(folder, tag), root / tag)
            (root / "complete").touch()
    try:
        engine.load_checkpoint(str(root), tag=tag)
        _repair_zero3_universal_load(engine, root / tag, group_names)
    finally:
        if dist.is_initialized():
            dist.barrier()  # every rank has read it
        if made_here:
            shutil.rmtree(root, ignore_errors=True)


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def _convert_to_universal(source: Path, destination: Path) -> None:
    shutil.rmtree(destination, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(destination), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"DeepSpeed's universal conversion of {source} failed: {done.stderr.strip()[-2000:]}")


def _repair_zero3_universal_load(engine, universal: Path, group_names: list[str]) -> None:
    """Two gaps of DeepSpeed's (0.19.8) ZeRO-3 universal load: it gives every parameter group the
    hyperparameters of the first saved group (weight decay, lr, initial lr), and one step-count tensor to the
    optimizer states of all groups, which torch's AdamW then advances once per group and step (a wrong bias
    correction). Put back each group's own hyperparameters, matched by our group names, and its own step."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    if engine.zero_optimization_stage() != 3:
        return
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)[OPTIMIZER_STATE_DICT]["param_groups"]
    by_name = {group["name"]: group for group in saved}
    for name, group in zip(group_names, _torch_optimizer(engine).param_groups, strict=True):
        group.update({key: value for key, value in by_name[name].items() if key != "params"})
    for state in _torch_optimizer(engine).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
