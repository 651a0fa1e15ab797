"""Plain-PyTorch OneFormer: `build_model(preset, **overrides)` is the entry point."""

from model.oneformer import OneFormer
from model.presets import PRESETS, OneFormerConfig, build_model, build_oneformer, make_config

__all__ = ["OneFormer", "OneFormerConfig", "PRESETS", "build_model", "build_oneformer", "make_config"]
