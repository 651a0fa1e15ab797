"""Typed OneFormer configuration, the named presets, the dataset settings, and `build_model`.

    model = build_model("swin_l", dataset="coco", training=True)

A preset fixes the backbone and head sizes (ADE20K settings by default); `dataset=` then applies a dataset's
classes, queries, DiNAT neighbourhood settings and inference thresholds; any other keyword overrides one
field of `OneFormerConfig` and is validated (an unknown name or a bad value raises ValueError naming it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from model.oneformer import OneFormer
from model.pixel_decoder import PixelDecoder
from model.task_conditioning import TaskEncoder
from model.text_mapper import TextMapper
from model.transformer_decoder import TransformerDecoder

DATASETS = ("ade20k", "ade20k_1280", "coco", "cityscapes")
DINAT_BACKBONES = ("dinat_l",)


@dataclass(frozen=True)
class OneFormerConfig:
    """Everything `build_model` needs; defaults are the official ADE20K large-model settings."""

    backbone: str
    """Name passed to `model.backbones.build_backbone` ("swin_l", "convnext_l", "convnext_xl", "dinat_l", "tiny")."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for the backbone builder (DiNAT gets `dataset`, which picks its kernel and dilations)."""
    dataset: str = "ade20k"
    """Dataset whose settings were applied: one of DATASETS."""
    num_classes: int = 150
    """K, the number of classes without the no-object class."""
    num_queries: int = 250
    """N, object queries (N-1 refined from the task token, plus the task token itself)."""
    hidden_dim: int = 256
    """Width of the transformer decoder, the task token and the text queries."""
    conv_dim: int = 256
    """Width of the pixel decoder (a multiple of 32 for GroupNorm)."""
    mask_dim: int = 256
    """Channels of the stride-4 mask features."""
    pixel_decoder_layers: int = 6
    """Deformable-attention encoder layers."""
    pixel_decoder_heads: int = 8
    pixel_decoder_ffn_dim: int = 1024
    pixel_decoder_points: int = 4
    """Sampling points per head and level."""
    pixel_decoder_dropout: float = 0.1
    decoder_layers: int = 9
    """Masked-attention layers; the decoder makes decoder_layers + 1 predictions."""
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    query_init_layers: int = 2
    """Layers of the DETR decoder that refines the task-token queries."""
    query_init_dropout: float = 0.1
    task_context_length: int = 77
    """Token ids per task text; the task MLP's input width."""
    training: bool = False
    """Build the text mapper (needed for the contrastive loss); inference models leave it out."""
    text_width: int = 256
    text_layers: int = 6
    text_heads: int = 4
    text_context_length: int = 77
    text_vocab_size: int = 49408
    text_projection_layers: int = 2
    text_num_context: int = 16
    """Learned context embeddings appended to the N - text_num_context encoded texts."""
    contrastive_temperature: float = 0.07
    """Initial temperature; the learnable logit scale starts at log(1 / temperature)."""
    object_mask_threshold: float = 0.5
    """Panoptic inference: keep queries whose top class score exceeds this."""
    overlap_threshold: float = 0.8
    """Panoptic inference: drop a segment that keeps less than this share of its mask."""
    test_topk: int = 250
    """Instance inference: (query, class) pairs kept per image."""
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    """Input height and width must be multiples of this (the caller pads)."""
    ms_deform_attn_backend: str | None = None
    """"reference", "triton" or None (Triton on CUDA, reference otherwise)."""

    def __post_init__(self) -> None:
        _validate(self)


_POSITIVE_INTS = (
    "num_classes", "hidden_dim", "conv_dim", "mask_dim", "pixel_decoder_layers", "pixel_decoder_heads",
    "pixel_decoder_ffn_dim", "pixel_decoder_points", "decoder_layers", "decoder_heads", "decoder_ffn_dim",
    "query_init_layers", "task_context_length", "text_width", "text_layers", "text_heads", "text_context_length",
    "text_vocab_size", "text_projection_layers", "test_topk", "size_divisibility",
)  # fmt: skip


def _validate(config: OneFormerConfig) -> None:
    for name in _POSITIVE_INTS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if config.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {config.dataset!r}")
    if not isinstance(config.training, bool):
        raise ValueError(f"training must be a bool, got {config.training!r}")
    if isinstance(config.num_queries, bool) or not isinstance(config.num_queries, int):
        raise ValueError(f"num_queries must be an int, got {config.num_queries!r}")
    if config.num_queries <= max(config.text_num_context, 1):
        raise ValueError(
            f"num_queries must exceed text_num_context ({config.text_num_context}) and 1, got {config.num_queries}"
        )
    if config.text_num_context < 0:
        raise ValueError(f"text_num_context must be >= 0, got {config.text_num_context}")
    for name in ("pixel_decoder_dropout", "query_init_dropout"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)!r}")
    for name in ("object_mask_threshold", "overlap_threshold"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)!r}")
    if config.contrastive_temperature <= 0:
        raise ValueError(f"contrastive_temperature must be > 0, got {config.contrastive_temperature}")
    for dim_name, heads_name in (
        ("conv_dim", "pixel_decoder_heads"),
        ("hidden_dim", "decoder_heads"),
        ("text_width", "text_heads"),
    ):
        if getattr(config, dim_name) % getattr(config, heads_name):
            raise ValueError(f"{dim_name} ({getattr(config, dim_name)}) must be divisible by {heads_name}")
    if config.conv_dim % 32:
        raise ValueError(f"conv_dim must be a multiple of 32 (GroupNorm(32)), got {config.conv_dim}")
    if config.hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even (sine position encoding), got {config.hidden_dim}")
    if config.decoder_layers != 9 and config.backbone != "tiny":
        raise ValueError(
            f"decoder_layers other than 9 is allowed only for the tiny preset, got {config.decoder_layers}"
        )
    if config.ms_deform_attn_backend not in (None, "reference", "triton"):
        raise ValueError(
            f"ms_deform_attn_backend must be None, 'reference' or 'triton', got {config.ms_deform_attn_backend!r}"
        )


DATASET_SETTINGS: dict[str, dict] = {
    "ade20k": {"num_classes": 150, "num_queries": 250, "object_mask_threshold": 0.5, "overlap_threshold": 0.8, "test_topk": 250},
    "ade20k_1280": {"num_classes": 150, "num_queries": 250, "object_mask_threshold": 0.5, "overlap_threshold": 0.8, "test_topk": 250},
    "coco": {"num_classes": 133, "num_queries": 150, "object_mask_threshold": 0.8, "overlap_threshold": 0.8, "test_topk": 150},
    "cityscapes": {"num_classes": 19, "num_queries": 250, "object_mask_threshold": 0.8, "overlap_threshold": 0.8, "test_topk": 250},
}  # fmt: skip
PRESETS: dict[str, OneFormerConfig] = {
    "swin_l": OneFormerConfig(backbone="swin_l"),
    "convnext_l": OneFormerConfig(backbone="convnext_l"),
    "convnext_xl": OneFormerConfig(backbone="convnext_xl"),
    "dinat_l": OneFormerConfig(backbone="dinat_l", backbone_kwargs={"dataset": "ade20k"}),
    # Debug size: trains on a CPU in seconds per step at 128x128.
    "tiny": OneFormerConfig(
        backbone="tiny",
        num_queries=24,
        hidden_dim=64,
        conv_dim=64,
        mask_dim=64,
        pixel_decoder_layers=2,
        pixel_decoder_heads=4,
        pixel_decoder_ffn_dim=128,
        decoder_heads=4,
        decoder_ffn_dim=128,
        query_init_layers=1,
        query_init_dropout=0.0,
        pixel_decoder_dropout=0.0,
        text_width=64,
        text_layers=2,
        text_heads=2,
    ),
}


def make_config(preset: str, **overrides) -> OneFormerConfig:
    """The preset's config with `dataset` settings and then the other overrides applied, validated."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    config = PRESETS[preset]
    names = {f.name for f in dataclasses.fields(OneFormerConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; valid names: {sorted(names)}")
    dataset = overrides.pop("dataset", None)
    if dataset is not None:
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        config = _with_dataset(config, dataset)
    return dataclasses.replace(config, **overrides)


def _with_dataset(config: OneFormerConfig, dataset: str) -> OneFormerConfig:
    settings = dict(DATASET_SETTINGS[dataset])
    if config.backbone == "tiny":
        settings.pop("num_queries")  # the debug model keeps its small query count
    if config.backbone in DINAT_BACKBONES:
        # DiNAT picks its kernel size and dilations by dataset name.
        settings["backbone_kwargs"] = {**config.backbone_kwargs, "dataset": dataset}
    return dataclasses.replace(config, dataset=dataset, **settings)


def build_model(preset: str, **overrides) -> OneFormer:
    """Build OneFormer from a preset name plus overrides (see `OneFormerConfig` for the names)."""
    from model.checkpoint import build_from_config

    return build_from_config(make_config(preset, **overrides))


def build_oneformer(config: OneFormerConfig, backbone: nn.Module) -> OneFormer:
    """Assemble the heads of `config` around an already built backbone (res2..res5 with `out_channels`)."""
    pixel_decoder = PixelDecoder(
        in_channels=list(backbone.out_channels),
        conv_dim=config.conv_dim,
        mask_dim=config.mask_dim,
        num_heads=config.pixel_decoder_heads,
        ffn_dim=config.pixel_decoder_ffn_dim,
        dropout=config.pixel_decoder_dropout,
        num_layers=config.pixel_decoder_layers,
        num_points=config.pixel_decoder_points,
        backend=config.ms_deform_attn_backend,
    )
    transformer_decoder = TransformerDecoder(
        in_channels=config.conv_dim,
        mask_dim=config.mask_dim,
        num_classes=config.num_classes,
        hidden_dim=config.hidden_dim,
        num_queries=config.num_queries,
        num_heads=config.decoder_heads,
        ffn_dim=config.decoder_ffn_dim,
        num_layers=config.decoder_layers,
        query_init_layers=config.query_init_layers,
        query_init_dropout=config.query_init_dropout,
    )
    text_mapper = None
    if config.training:
        text_mapper = TextMapper(
            hidden_dim=config.hidden_dim,
            width=config.text_width,
            num_layers=config.text_layers,
            num_heads=config.text_heads,
            context_length=config.text_context_length,
            vocab_size=config.text_vocab_size,
            projection_layers=config.text_projection_layers,
            num_context=config.text_num_context,
            temperature=config.contrastive_temperature,
        )
    return OneFormer(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        task_encoder=TaskEncoder(config.hidden_dim, config.task_context_length),
        transformer_decoder=transformer_decoder,
        text_mapper=text_mapper,
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
        size_divisibility=config.size_divisibility,
    )
