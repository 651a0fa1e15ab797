"""The model file: the one place that builds OneFormer from its config, writes it, and reads it back.

    save_model(model, config, "model.pt")     # {"config": OneFormerConfig as a dict, "model": state_dict}
    config = read_config("model.pt")          # memory-mapped: no weights are read
    model = load_model("model.pt")            # strict; eval mode
    load_weights(model, "model.pt")           # initialise a built model from a model file, strictly

Loading is strict: every tensor of the model must be in the file with its shape, and every tensor of the file
must have a place in the model. The one allowed exception is named: a file without the text mapper (Hugging
Face hub checkpoints never carry it; they may carry its logit scale, which lives in their loss module) loaded
into a model that has one keeps the fresh text mapper, with a logged warning. Any other misfit raises `ModelFileError` naming the file and the first mismatching keys. A
file that is missing, truncated or not a torch file raises `ModelFileError` naming it too.

Training exports, evaluation, prediction and `python -m model.convert` all go through this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from model.oneformer import OneFormer
from model.presets import OneFormerConfig, build_oneformer

log = logging.getLogger(__name__)
FILE_KEYS = {"config", "model"}
TEXT_MAPPER_PREFIX = "text_mapper."
SHOWN_KEYS = 8
"""How many mismatching keys an error lists (with the total count)."""


class ModelFileError(ValueError):
    """A model file that cannot be read or does not fit the model; the message names the file."""


def build_from_config(config: OneFormerConfig) -> OneFormer:
    """A freshly initialised OneFormer for `config` (backbone by its builder name and keyword arguments)."""
    from model.backbones import build_backbone

    return build_oneformer(config, build_backbone(config.backbone, **config.backbone_kwargs))


def save_model(model: OneFormer, config: OneFormerConfig, path: str | os.PathLike) -> None:
    """Write {"config", "model"} to `path` atomically: a reader sees the old file or the complete new one."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save({"config": dataclasses.asdict(config), "model": model.state_dict()}, partial)
    os.replace(partial, path)


def _read(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, IndexError, pickle errors ... for bad bytes
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelFileError(f"{path}: not a readable torch file ({reason})") from None
    if not isinstance(saved, dict) or set(saved) != FILE_KEYS:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ModelFileError(f"{path}: not a model file (expected the keys 'config' and 'model', found {found})")
    return saved


def _config_of(saved: dict, path: str | os.PathLike) -> OneFormerConfig:
    fields = {f.name for f in dataclasses.fields(OneFormerConfig)}
    unknown = sorted(set(saved["config"]) - fields)
    if unknown:
        raise ModelFileError(f"{path}: config has fields this version does not know: {unknown}")
    try:
        return OneFormerConfig(**saved["config"])
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path}: invalid model config: {error}") from None


def read_config(path: str | os.PathLike) -> OneFormerConfig:
    """The OneFormerConfig saved in a model file (memory-mapped: no weights are read)."""
    return _config_of(_read(path), path)


def load_model(path: str | os.PathLike, training: bool | None = None) -> OneFormer:
    """OneFormer (eval mode) from a model file. `training` overrides the saved flag: True adds a fresh text
    mapper to an inference file (the named exception), False drops a saved one."""
    saved = _read(path)
    config = _config_of(saved, path)
    state = saved["model"]
    if training is not None and training != config.training:
        config = dataclasses.replace(config, training=training)
        if not training:
            state = {key: value for key, value in state.items() if not key.startswith(TEXT_MAPPER_PREFIX)}
    model = build_from_config(config)
    load_state(model, state, source=str(path))
    return model.eval()


def load_weights(model: OneFormer, path: str | os.PathLike) -> int:
    """Initialise `model` from the weights of a model file, strictly (same rules as `load_model`); the file's
    config may differ only in what does not change a tensor. Returns the number of tensors loaded."""
    saved = _read(path)
    state = saved["model"]
    if model.text_mapper is None:
        state = {key: value for key, value in state.items() if not key.startswith(TEXT_MAPPER_PREFIX)}
    return load_state(model, state, source=str(path))


def _listed(keys: list[str]) -> str:
    return f"{keys[:SHOWN_KEYS]}" + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def load_state(model: OneFormer, state: dict[str, torch.Tensor], source: str) -> int:
    """Load `state` into `model` strictly, except that a text mapper absent from `state` keeps its fresh
    initialisation (logged). Raises ModelFileError naming `source` and the keys that do not fit."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    fresh_text_mapper = [key for key in missing if key.startswith(TEXT_MAPPER_PREFIX)]
    carried = {key for key in state if key.startswith(TEXT_MAPPER_PREFIX)} - {TEXT_MAPPER_PREFIX + "logit_scale"}
    if carried:
        fresh_text_mapper = []  # a partial text mapper is a misfit, not the named exception
    missing = [key for key in missing if key not in fresh_text_mapper]
    if unexpected or missing:
        raise ModelFileError(
            f"{source}: does not fit the model: {len(missing)} missing {_listed(missing)}, "
            f"{len(unexpected)} unexpected {_listed(unexpected)}"
        )
    state = _scalar_logit_scale(state, expected)
    mismatched = [f"{key} {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
                  for key, value in state.items() if value.shape != expected[key].shape]
    if mismatched:
        raise ModelFileError(f"{source}: {len(mismatched)} tensors have the wrong shape: {_listed(mismatched)}")
    if fresh_text_mapper:
        log.warning("%s has no text mapper weights (%d tensors); the text mapper starts from its fresh "
                    "initialisation, as Hugging Face hub checkpoints never include it", source, len(fresh_text_mapper))
        state = {**{key: expected[key] for key in fresh_text_mapper}, **state}
    model.load_state_dict(state, strict=True)
    return len(state) - len(fresh_text_mapper)


def _scalar_logit_scale(state: dict, expected: dict) -> dict:
    """The logit scale is a scalar in Hugging Face files (and older ones of ours), shape [1] here."""
    key = TEXT_MAPPER_PREFIX + "logit_scale"
    if key in state and key in expected and state[key].numel() == expected[key].numel():
        return {**state, key: state[key].reshape(expected[key].shape)}
    return state
