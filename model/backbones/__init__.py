"""Backbones by name: `build_backbone(name, **kwargs)` -> module with `out_channels` (res2..res5),
`out_strides == [4, 8, 16, 32]`, `feature_info`, and forward(normalised images [B, 3, H, W]) -> 4 NCHW maps,
each after its own LayerNorm.

    build_backbone("swin_l")                              # OneFormer's Swin-L, window 12
    build_backbone("dinat_l", dataset="ade20k_1280")      # DiNAT-L with that dataset's kernel/dilations
    build_backbone("swin", embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7)
    build_backbone("convnext_l", weights="convnext_large_22k_224.pth")

`weights=` loads a local .pth/.pt/.pkl/.safetensors file (official, timm, Hugging Face or full OneFormer
checkpoint layouts) or a remote reference (https://, s3://, timm:<model>.<tag>; see weights_source) through
`load_backbone_weights`, strictly; the returned backbone carries the `WeightsReport` as `weights_report`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from model.backbones.convnext import ConvNeXtBackbone, convnext_large, convnext_xlarge
from model.backbones.dinat import DINAT_L_SETTINGS, DiNAT, dinat_large, dinat_mini, dinat_tiny_test
from model.backbones.swin import SwinTransformer, swin_large
from model.backbones.weights import WeightsReport, load_backbone_weights

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "swin_l": swin_large,
    "convnext_l": convnext_large,
    "convnext_xl": convnext_xlarge,
    "dinat_l": dinat_large,
    "dinat_mini": dinat_mini,
    "tiny": dinat_tiny_test,
    # generic builders taking every size argument explicitly (small models for parity tests)
    "swin": SwinTransformer,
    "convnext": ConvNeXtBackbone,
    "dinat": DiNAT,
}

# Kernel size and per-block dilations of DiNAT-L per dataset, for presets selecting by dataset name.
DINAT_SETTINGS = DINAT_L_SETTINGS


def build_backbone(name: str, weights: str | None = None, **kwargs) -> nn.Module:
    """Build backbone `name` (see BACKBONES) with builder keyword arguments; optionally load `weights` (a path
    or remote reference, cached in the default weights cache), reported in `backbone.weights_report`."""
    if name not in BACKBONES:
        raise ValueError(f"backbone name must be one of {sorted(BACKBONES)}, got {name!r}")
    backbone = BACKBONES[name](**kwargs)
    if weights is not None:
        backbone.weights_report = load_backbone_weights(backbone, weights)
    return backbone


__all__ = [
    "BACKBONES",
    "DINAT_SETTINGS",
    "ConvNeXtBackbone",
    "DiNAT",
    "SwinTransformer",
    "WeightsReport",
    "build_backbone",
    "load_backbone_weights",
]
