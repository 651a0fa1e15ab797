"""Loading a local weights file into one of our backbones, whatever layout it was saved in.

Accepted: .pth/.pt (a state dict, or one under "model"/"state_dict"), .pkl (detectron2 pickles of numpy
arrays, as the official OneFormer/DiNAT releases ship), .safetensors. Keys may sit under a prefix
("backbone.", "module.", Hugging Face OneFormer's "model.pixel_level_module.encoder."); layouts other than
ours (timm Swin, official ConvNeXt, Hugging Face Swin/DiNAT) are converted first.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

KNOWN_PREFIXES = ("model.pixel_level_module.encoder.", "backbone.", "module.", "model.")
# Buffers recomputed from the config, and ImageNet classifier parts a dense backbone does not have.
IGNORED_KEY_PATTERNS = (r"relative_position_index$", r"attn_mask$", r"^head\.", r"^norm\.", r"^head_norm\.",
                        r"^layernorm\.", r"^pooler\.", r"^classifier\.")
# The per-output LayerNorms are new in a dense backbone: ImageNet checkpoints do not have them.
OPTIONAL_MISSING_PATTERN = r"^norm[0-3]\."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, unwrapped from a "model" / "state_dict" entry if present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="latin1")
    elif path.suffix in (".pth", ".pt", ".bin"):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"weights file must be .pth, .pt, .bin, .pkl or .safetensors, got {path.name}")
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    return {k: torch.as_tensor(v) for k, v in raw.items() if hasattr(v, "shape")}


def strip_known_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the backbone's keys when the file is a whole-model checkpoint."""
    for prefix in KNOWN_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def to_our_layout(backbone: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from model.backbones.convnext import ConvNeXtBackbone
    from model.backbones.dinat import DiNAT
    from model.backbones.swin import SwinTransformer

    if isinstance(backbone, SwinTransformer):
        from model.convert.swin import convert_swin_state_dict

        return convert_swin_state_dict(state_dict)
    if isinstance(backbone, DiNAT):
        from model.convert.dinat import convert_dinat_state_dict

        return convert_dinat_state_dict(state_dict)
    if isinstance(backbone, ConvNeXtBackbone):
        from timm.models.convnext import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, backbone)
    return state_dict


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load `path` into `backbone`; raise ValueError listing every missing or unexpected key.

    Only the output norms (norm0..norm3) may be missing: they do not exist in classification checkpoints
    and keep their fresh initialisation (logged)."""
    state_dict = to_our_layout(backbone, strip_known_prefix(read_state_dict(path)))
    state_dict = {k: v for k, v in state_dict.items() if not any(re.search(p, k) for p in IGNORED_KEY_PATTERNS)}
    result = backbone.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not re.match(OPTIONAL_MISSING_PATTERN, k)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights file {path} does not fit {type(backbone).__name__}: "
            f"{len(missing)} missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:20]}"
            f"{' ...' if len(result.unexpected_keys) > 20 else ''}"
        )
    fresh = sorted(set(result.missing_keys))
    if fresh:
        log.info("loaded %s; output norms not in the file keep their initialisation: %s", path, fresh)
    else:
        log.info("loaded %s", path)
