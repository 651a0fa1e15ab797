"""The model file: the one place that builds OneFormer from its config, writes it, and reads it back.

    save_model(model, config, "model.pt", classes)  # {"config": OneFormerConfig as a dict,
                                                    #  "model": state_dict, "classes": JSON entries, if known}
    config = read_config("model.pt")          # memory-mapped: no weights are read
    classes = read_classes("model.pt")        # model.classes.ModelClasses, or None for a file without them
    model = load_model("model.pt")            # strict; eval mode
    load_weights(model, "model.pt")           # initialise a built model from a model file, strictly
    report = load_finetuning_weights(model, "model.pt" or "hf_dir/")   # the same, for another class set

Loading is strict: every tensor of the model must be in the file with its shape, and every tensor of the file
must have a place in the model. The one allowed exception is named: a file without the text mapper (Hugging
Face hub checkpoints never carry it; they may carry its logit scale, which lives in their loss module) loaded
into a model that has one keeps the fresh text mapper, with a logged warning. Any other misfit raises `ModelFileError` naming the file and the first mismatching keys. A
file that is missing, truncated or not a torch file raises `ModelFileError` naming it too.

Fine-tuning (`load_finetuning_weights`) reads our model files and Hugging Face save_pretrained directories
(converted on the fly, as `python -m model.convert` does) with the same rules plus one more named exception:
the class head, the one part of the model whose shape depends on the class count (CLASS_HEAD_KEYS), is
re-initialised when the source has another class count; the report and a warning name it. (The criterion's
no-object weight also depends on the class count; it is no part of the model: the criterion is built from the
data's class count. Class names reach the model only as text at run time.)

Training exports, evaluation, prediction and `python -m model.convert` all go through this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model.classes import ModelClasses
from model.oneformer import OneFormer
from model.presets import OneFormerConfig, build_oneformer

log = logging.getLogger(__name__)
FILE_KEYS = {"config", "model"}
OPTIONAL_FILE_KEYS = {"classes"}
"""Keys a model file may have: "classes" (model.classes JSON entries form) since files name their classes."""
TEXT_MAPPER_PREFIX = "text_mapper."
SHOWN_KEYS = 8
"""How many mismatching keys an error lists (with the total count)."""
CLASS_HEAD_KEYS = ("transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias")
"""The model's tensors whose shape depends on the class count: the class linear (num_classes + 1 outputs)."""


class ModelFileError(ValueError):
    """A model file that cannot be read or does not fit the model; the message names the file."""


def build_from_config(config: OneFormerConfig) -> OneFormer:
    """A freshly initialised OneFormer for `config` (backbone by its builder name and keyword arguments)."""
    from model.backbones import build_backbone

    return build_oneformer(config, build_backbone(config.backbone, **config.backbone_kwargs))


def save_model(
    model: OneFormer,
    config: OneFormerConfig,
    path: str | os.PathLike,
    classes: ModelClasses | list[dict] | None = None,
) -> None:
    """Write {"config", "model"} and, when given, "classes" to `path` atomically: a reader sees the old file
    or the complete new one. `classes`: ModelClasses or their JSON entries form (ClassInfo.to_json's list)."""
    path = Path(path)
    saved = {"config": dataclasses.asdict(config), "model": model.state_dict()}
    if classes is not None:
        if not isinstance(classes, ModelClasses):
            classes = ModelClasses.from_json(classes, f"classes for {path}")
        if classes.num_classes != config.num_classes:
            raise ValueError(
                f"{path}: {classes.num_classes} classes given for a model of {config.num_classes}"
            )
        saved["classes"] = classes.to_json()
    partial = path.with_name(path.name + ".partial")
    torch.save(saved, partial)
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
    if not isinstance(saved, dict) or not FILE_KEYS <= set(saved) <= FILE_KEYS | OPTIONAL_FILE_KEYS:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ModelFileError(
            f"{path}: not a model file (expected the keys 'config' and 'model', and optionally 'classes'; "
            f"found {found})"
        )
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


def read_classes(path: str | os.PathLike) -> ModelClasses | None:
    """The classes saved in a model file (memory-mapped: no weights are read); None for a file written
    without them. Entries that are no class metadata raise model.classes.ClassesFileError naming the file."""
    entries = _read(path).get("classes")
    return None if entries is None else ModelClasses.from_json(entries, f"{path} (its classes)")


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


# ---------------------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class WeightsReport:
    """What `load_finetuning_weights` did: every tensor of the model is loaded, re-initialised (the class head
    of a source with another class count) or a fresh text mapper tensor (a source without one)."""

    source: str
    loaded: int
    total: int
    reinitialised: tuple[str, ...] = ()
    source_num_classes: int | None = None
    model_num_classes: int | None = None

    @property
    def fresh_text_mapper(self) -> int:
        return self.total - self.loaded - len(self.reinitialised)

    def summary(self) -> str:
        line = f"{self.loaded}/{self.total} tensors from {self.source}"
        if self.reinitialised:
            line += (f"; class head re-initialised for the model's {self.model_num_classes} classes (the "
                     f"weights' {self.source_num_classes} are another class set): "
                     f"{', '.join(self.reinitialised)}")
        if self.fresh_text_mapper:
            line += f"; text mapper fresh ({self.fresh_text_mapper} tensors, not in the weights)"
        return line


def is_transformers_directory(source: str | os.PathLike) -> bool:
    return Path(source).is_dir()


def weights_config(source: str | os.PathLike, dataset: str | None = None) -> OneFormerConfig:
    """The architecture saved with weights: our model file's config, or what a Hugging Face directory's
    config.json describes (`dataset` as model.convert's --dataset: guessed from released class counts)."""
    if is_transformers_directory(source):
        from model.convert import transformers_config

        return transformers_config(source, dataset=dataset)
    return read_config(source)


def _source_state(source: str | os.PathLike, with_text_mapper: bool) -> dict[str, torch.Tensor]:
    if is_transformers_directory(source):
        from model.convert import transformers_state_dict

        try:
            return transformers_state_dict(source, training=with_text_mapper)
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise ModelFileError(f"{source}: cannot convert this Hugging Face directory ({error})") from None
    state = _read(source)["model"]
    if not with_text_mapper:
        state = {key: value for key, value in state.items() if not key.startswith(TEXT_MAPPER_PREFIX)}
    return state


def source_class_names(source: str | os.PathLike) -> tuple[str, ...] | None:
    """The class names weights were trained for, when the source says: a Hugging Face config's id2label, or
    our model file's own classes, or the classes.json training writes beside it."""
    from model.classes import ClassesFileError, known_classes

    if is_transformers_directory(source):
        labels = json.loads((Path(source) / "config.json").read_text()).get("id2label") or {}
        return tuple(str(labels[key]) for key in sorted(labels, key=int))
    try:
        known = known_classes(source)
    except ClassesFileError:
        return None
    return None if known is None else known[0].names


def _class_head_to_reinitialise(state: dict, expected: dict, same_classes: bool) -> list[str]:
    """The class head keys whose shapes differ only in the class count (the output dimension), or all of
    them when the class count is the same but the classes are not."""
    fits = [key for key in CLASS_HEAD_KEYS if key in state and key in expected
            and state[key].shape[1:] == expected[key].shape[1:]]
    return [key for key in fits if not same_classes or state[key].shape != expected[key].shape]


def load_finetuning_weights(model: OneFormer, source: str | os.PathLike,
                            class_names: tuple[str, ...] | None = None) -> WeightsReport:
    """Initialise `model` from our model file or a Hugging Face save_pretrained directory: strictly, except
    the class head of a source with another class set (another count, or other names than `class_names`
    where the source names its classes), which keeps its fresh initialisation (logged and reported), and
    the named text-mapper exception of `load_state`. Anything else that does not fit raises ModelFileError
    naming the source and the keys."""
    state = _source_state(source, with_text_mapper=model.text_mapper is not None)
    expected = model.state_dict()
    known = source_class_names(source) if class_names is not None else None
    same_classes = known is None or tuple(known) == tuple(class_names)
    reinitialised = _class_head_to_reinitialise(state, expected, same_classes)
    source_classes = state[CLASS_HEAD_KEYS[1]].shape[0] - 1 if CLASS_HEAD_KEYS[1] in state else None
    model_classes = expected[CLASS_HEAD_KEYS[1]].shape[0] - 1
    if reinitialised:
        log.warning("class head re-initialised: the classes of %s (%d) are not the model's (%d): %s", source,
                    source_classes, model_classes, ", ".join(reinitialised))
        state = {**state, **{key: expected[key] for key in reinitialised}}
    loaded = load_state(model, state, source=str(source)) - len(reinitialised)
    return WeightsReport(str(source), loaded, len(expected), tuple(reinitialised), source_classes,
                         model_classes)
