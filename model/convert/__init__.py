"""Hugging Face OneFormer checkpoints -> our OneFormer (our model file itself is model/checkpoint.py's).

    model = from_transformers("path/to/oneformer_ade20k_swin_large")      # a save_pretrained directory
    # or: python -m model.convert DIR --out FILE.pt [--dataset ade20k] [--training] [--classes classes.json]

The model file carries the classes (model/classes.py) when they are known: --classes, else the names of
config.json's id2label with the thing flags of preprocessor_config.json (`transformers_classes`).

`from_transformers` reads config.json, derives `build_model` overrides from it (backbone type and sizes,
widths, queries, classes, layers), maps every weight, and fails on any HF weight it cannot place or any of
our weights left unfilled, except the text mapper: HF hub checkpoints do not carry it, so a model built with
`training=True` starts it fresh and logs that it did.

Deliberate differences from the Hugging Face port (converted weights, different numbers in these cases):
- Swin: when a stage's feature map is no larger than the window (min side <= window, e.g. inputs of 384 px
  or less for Swin-L's window 12), HF shrinks the window to the map and turns the shift off, and keeps that
  setting for every later call; we follow the official Swin, which pads the map to the window and keeps the
  shift. Above that size both compute the same.
- Pixel decoder: HF applies dropout whenever its config says `is_training`, even in eval mode; ours follows
  `module.training` (dropout off in eval).
- Text mapper: HF builds the causal mask of the text encoder but never applies it; we apply it, so text
  queries of an HF checkpoint saved with `is_training=True` differ after conversion (its weights still map).
- `criterion.logit_scale` becomes `text_mapper.logit_scale` (our model owns the contrastive temperature);
  `criterion.empty_weight` is dropped (the criterion rebuilds it from the no-object weight).
- Decoder self-attention: HF's separate q/k/v projections are packed into one `in_proj_weight` (q, k, v
  order) of `nn.MultiheadAttention`, as in the official code. Same computation.
- Layer count: HF's `decoder_layers` counts the prediction on the initial queries (10); ours counts
  masked-attention layers (9).
- Inference post-processing (model/inference.py) follows the official code, not HF's: instance results are
  the top-k overlapping masks with no score threshold.
- Unsupported HF configs (refused with the field named): pre_norm, use_task_norm=False, enforce_input_proj or
  conv_dim != hidden_dim (HF never saves those projections), norms other than GroupNorm, layer_norm_eps other
  than 1e-5, backbones other than Swin (and DiNAT when its adapter is present).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from model.checkpoint import build_from_config, load_state
from model.classes import ModelClasses
from model.convert.oneformer import (
    HF_BACKBONE_PREFIX,
    UnsupportedConfigError,
    convert_head_state_dict,
    head_overrides,
)
from model.oneformer import OneFormer
from model.presets import OneFormerConfig, make_config

# Class counts of the released checkpoints, used to pick the dataset settings when none is given.
DATASET_BY_NUM_CLASSES = {150: "ade20k", 133: "coco", 19: "cityscapes"}
# HF Swin config fields that must hold these values (our Swin implements only these).
_SWIN_REQUIRED = {
    "qkv_bias": True,
    "use_absolute_embeddings": False,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
_ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def read_hf_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The weights save_pretrained wrote: model.safetensors, pytorch_model.bin, or their sharded index."""
    directory = Path(directory)
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", _read_torch_bin)):  # fmt: skip
        index_path = directory / index_name
        if index_path.exists():
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(reader(directory / shard))
            return state
    if (directory / "model.safetensors").exists():
        return _read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").exists():
        return _read_torch_bin(directory / "pytorch_model.bin")
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or sharded index) in {directory}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def backbone_build_args(hf_config: dict) -> tuple[str, dict]:
    """(our backbone builder name, its keyword arguments) for the HF `backbone_config`."""
    backbone = hf_config.get("backbone_config") or {}
    if hf_config.get("backbone") and not backbone:
        raise UnsupportedConfigError(
            f"config.json field 'backbone' = {hf_config['backbone']!r} (a timm/hub backbone) is not supported; "
            "only an inline 'backbone_config' of model_type 'swin' or 'dinat'"
        )
    model_type = backbone.get("model_type")
    out_features = backbone.get("out_features", _ALL_STAGES)
    if list(out_features) != _ALL_STAGES:
        raise UnsupportedConfigError(f"backbone_config field 'out_features' must be {_ALL_STAGES}, got {out_features}")
    if model_type == "swin":
        return "swin", _swin_kwargs(backbone)
    if model_type == "dinat":
        return "dinat", _dinat_kwargs(backbone)
    raise UnsupportedConfigError(
        f"backbone_config field 'model_type' = {model_type!r} is not supported (only 'swin' and 'dinat')"
    )


def _swin_kwargs(backbone: dict) -> dict:
    for name, required in _SWIN_REQUIRED.items():
        if name in backbone and backbone[name] != required:
            raise UnsupportedConfigError(f"backbone_config field {name!r} = {backbone[name]!r} is not supported (only {required!r})")
    return {
        "embed_dim": backbone.get("embed_dim", 96),
        "depths": list(backbone.get("depths", [2, 2, 6, 2])),
        "num_heads": list(backbone.get("num_heads", [3, 6, 12, 24])),
        "window_size": backbone.get("window_size", 7),
        "mlp_ratio": float(backbone.get("mlp_ratio", 4.0)),
        "drop_path_rate": float(backbone.get("drop_path_rate", 0.1)),
        "patch_size": backbone.get("patch_size", 4),
    }


def _dinat_kwargs(backbone: dict) -> dict:
    if backbone.get("patch_size", 4) != 4:
        raise UnsupportedConfigError(f"backbone_config field 'patch_size' = {backbone['patch_size']} is not supported (only 4)")
    layer_scale = backbone.get("layer_scale_init_value", 0.0)
    return {
        "embed_dim": backbone.get("embed_dim", 64),
        "depths": list(backbone.get("depths", [3, 4, 6, 5])),
        "num_heads": list(backbone.get("num_heads", [2, 4, 8, 16])),
        "kernel_size": backbone.get("kernel_size", 7),
        "dilations": [list(d) for d in backbone["dilations"]] if "dilations" in backbone else None,
        "mlp_ratio": float(backbone.get("mlp_ratio", 3.0)),
        "drop_path_rate": float(backbone.get("drop_path_rate", 0.1)),
        "layer_scale": layer_scale if layer_scale > 0 else None,
    }


def config_from_transformers(hf_config: dict, dataset: str | None = None, training: bool = False) -> OneFormerConfig:
    """Our build config for an HF OneFormer config.json dict. `dataset` picks the inference thresholds; by
    default it is guessed from the class count (150 ADE20K, 133 COCO, 19 Cityscapes)."""
    overrides = head_overrides(hf_config)
    if dataset is None:
        dataset = DATASET_BY_NUM_CLASSES.get(overrides["num_classes"])
        if dataset is None:
            raise ValueError(
                f"cannot guess the dataset from {overrides['num_classes']} classes; pass dataset= "
                f"(one of {sorted(set(DATASET_BY_NUM_CLASSES.values()) | {'ade20k_1280'})})"
            )
    backbone_name, backbone_kwargs = backbone_build_args(hf_config)
    preset = "swin_l" if backbone_name == "swin" else "dinat_l"
    return make_config(
        preset, dataset=dataset, backbone=backbone_name, backbone_kwargs=backbone_kwargs, training=training, **overrides
    )


def _convert_backbone(backbone_name: str, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if backbone_name == "swin":
        from model.convert.swin import convert_swin_state_dict

        converted = convert_swin_state_dict(hf_state, prefix=HF_BACKBONE_PREFIX)
        # SwinBackbone keeps SwinModel's final LayerNorm but never uses it (it normalises each stage itself).
        return {key: value for key, value in converted.items() if not key.startswith("layernorm.")}
    try:
        adapter = importlib.import_module("model.convert.dinat")
        convert = adapter.convert_dinat_state_dict
    except (ImportError, AttributeError) as error:
        raise UnsupportedConfigError(f"DiNAT checkpoints need model.convert.dinat.convert_dinat_state_dict: {error}") from error
    return convert(hf_state, prefix=HF_BACKBONE_PREFIX)


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face save_pretrained directory)")
    hf_config = json.loads(path.read_text())
    if hf_config.get("model_type") != "oneformer":
        raise UnsupportedConfigError(f"config.json field 'model_type' must be 'oneformer', got {hf_config.get('model_type')!r}")
    return hf_config


def transformers_state_dict(directory: str | Path, training: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict of an HF save_pretrained directory, without the text mapper unless `training` (hub
    checkpoints never carry one beyond the logit scale). Every HF weight must find its place."""
    directory = Path(directory)
    backbone_name, _ = backbone_build_args(_read_hf_config(directory))
    hf_state = read_hf_state_dict(directory)
    state, unclaimed = convert_head_state_dict(hf_state)
    if unclaimed:
        raise KeyError(f"{len(unclaimed)} HF weights have no place in our model: {unclaimed[:10]}")
    backbone = _convert_backbone(backbone_name, hf_state)
    state.update({f"backbone.{key}": value for key, value in backbone.items()})
    if not training:
        state = {key: value for key, value in state.items() if not key.startswith("text_mapper.")}
    return state


def transformers_classes(directory: str | Path, num_classes: int) -> tuple[ModelClasses | None, str]:
    """(classes, "") of an HF save_pretrained directory when it says enough, else (None, why not): names from
    config.json's id2label, thing flags from the `metadata` of preprocessor_config.json (the "thing_ids" that
    OneFormerImageProcessor derives from its class_info_file). HF keeps no dataset category ids: the
    contiguous ids stand in for them."""
    directory = Path(directory)
    labels = _read_hf_config(directory).get("id2label") or {}
    if len(labels) != num_classes:
        return None, f"config.json's id2label names {len(labels)} classes, not the model's {num_classes}"
    processor = directory / "preprocessor_config.json"
    metadata = json.loads(processor.read_text()).get("metadata") if processor.is_file() else None
    if not isinstance(metadata, dict) or "thing_ids" not in metadata:
        return None, f"no thing_ids in {processor.name}'s metadata: which classes are things is unknown"
    thing_ids = {int(index) for index in metadata["thing_ids"]}
    ids = sorted(int(key) for key in labels)
    names = {int(key): str(name) for key, name in labels.items()}
    classes = ModelClasses(tuple(names[i] for i in ids), tuple(i in thing_ids for i in ids), tuple(ids))
    return classes, ""


def transformers_config(directory: str | Path, dataset: str | None = None,
                        training: bool = False) -> OneFormerConfig:
    """Our build config for an HF save_pretrained directory (see config_from_transformers for `dataset`)."""
    return config_from_transformers(_read_hf_config(Path(directory)), dataset=dataset, training=training)


def convert_transformers_checkpoint(
    directory: str | Path, dataset: str | None = None, training: bool = False
) -> tuple[OneFormerConfig, dict[str, torch.Tensor]]:
    """(our config, our state dict) for an HF save_pretrained directory. The state dict lacks the text mapper
    when the HF checkpoint does (hub checkpoints always do)."""
    config = transformers_config(directory, dataset=dataset, training=training)
    return config, transformers_state_dict(directory, training=training)


def from_transformers(directory: str | Path, dataset: str | None = None, training: bool = False) -> OneFormer:
    """Our OneFormer, in eval mode, with the weights of an HF OneFormerForUniversalSegmentation
    save_pretrained directory. training=True also builds the text mapper (fresh unless the HF checkpoint
    has one)."""
    config, state = convert_transformers_checkpoint(directory, dataset=dataset, training=training)
    model = build_from_config(config)
    load_state(model, state, source=str(directory))
    return model.eval()


__all__ = [
    "UnsupportedConfigError",
    "config_from_transformers",
    "convert_transformers_checkpoint",
    "from_transformers",
    "read_hf_state_dict",
    "transformers_classes",
    "transformers_config",
    "transformers_state_dict",
]
