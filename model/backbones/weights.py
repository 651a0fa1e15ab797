"""Loading backbone weights into one of our backbones, whatever layout they were saved in, strictly.

    report = load_backbone_weights(backbone, "timm:convnext_large.fb_in22k")   # or a path, https://, s3://
    report.loaded, report.backbone_tensors, report.path                         # see WeightsReport

Where the file comes from (local, URL, object store, timm hub; cache, lock, checksum): weights_source.
Accepted files: .pth/.pt/.bin (a state dict, or one under "model"/"state_dict"), .pkl (detectron2 pickles of
numpy arrays, as the official OneFormer/DiNAT releases ship), .safetensors. Keys may sit under a prefix
("backbone.", "module.", Hugging Face OneFormer's "model.pixel_level_module.encoder."); layouts other than
ours (timm Swin, official ConvNeXt, Hugging Face Swin/DiNAT) are converted first. Then every backbone tensor
must come from the file with its shape, and every file tensor must have a place, except the one allowed set
below (IGNORED_KEY_PATTERNS, OPTIONAL_MISSING_PATTERN); a partial load is not possible through this module.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.backbones.weights_source import resolve_weights

log = logging.getLogger(__name__)

KNOWN_PREFIXES = ("model.pixel_level_module.encoder.", "backbone.", "module.", "model.")

# The one allowed set of differences between a weights file and a backbone; anything else fails the load.
# Keys of the file dropped unread: buffers our backbones recompute from their config, and the ImageNet
# classifier parts (final norm, pooler, head) that a dense backbone does not have.
IGNORED_KEY_PATTERNS = (
    r"relative_position_index$",  # Swin: a pure function of the window size
    r"attn_mask$",  # Swin: the shifted-window mask, a function of the feature-map size
    r"^head\.", r"^classifier\.", r"^pooler\.",  # classifier heads (official/timm, Hugging Face)
    r"^norm\.", r"^head_norm\.", r"^layernorm\.",  # the norm before the classifier (official/timm, HF)
)
# Backbone tensors a file may lack: the per-output LayerNorms are new in a dense backbone, so ImageNet
# checkpoints do not have them; they keep their fresh initialisation and the report lists them.
OPTIONAL_MISSING_PATTERN = r"^norm[0-3]\."
# How many keys an error message names before it only counts.
_NAMED_KEYS = 8


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


@dataclass(frozen=True)
class WeightsReport:
    """What `load_backbone_weights` did. `source`: the reference as given; `path`: the local file read;
    `loaded` of `backbone_tensors` state-dict entries came from the file; `skipped`: file keys dropped as
    derived buffers or classifier parts (IGNORED_KEY_PATTERNS); `kept_initialisation`: backbone tensors the
    file lacks that may be absent (OPTIONAL_MISSING_PATTERN: the output norms)."""

    source: str
    path: Path
    loaded: int
    backbone_tensors: int
    skipped: tuple[str, ...]
    kept_initialisation: tuple[str, ...]

    def summary(self) -> str:
        text = f"{self.loaded}/{self.backbone_tensors} backbone tensors from {self.source}"
        if self.kept_initialisation:
            text += f" ({len(self.kept_initialisation)} output-norm tensors keep their initialisation)"
        return text


def load_backbone_weights(backbone: nn.Module, reference: str | Path,
                          cache_dir: str | Path | None = None) -> WeightsReport:
    """Load the weights `reference` names (a local file or a remote reference, see weights_source) into
    `backbone`, strictly: raise ValueError naming the file and the first keys if any backbone tensor is
    missing (other than the output norms) or mis-shaped, or if the file has tensors the backbone lacks
    (other than IGNORED_KEY_PATTERNS)."""
    path = resolve_weights(reference, cache_dir)
    state_dict = to_our_layout(backbone, strip_known_prefix(read_state_dict(path)))
    skipped = tuple(sorted(k for k in state_dict if _is_ignored(k)))
    state_dict = {k: v for k, v in state_dict.items() if not _is_ignored(k)}
    expected = backbone.state_dict()
    absent = [k for k in expected if k not in state_dict]
    kept_initialisation = tuple(k for k in absent if re.match(OPTIONAL_MISSING_PATTERN, k))
    missing = [k for k in absent if k not in kept_initialisation]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [f"{k} {tuple(v.shape)} (backbone {tuple(expected[k].shape)})" for k, v in state_dict.items()
                  if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        raise ValueError(f"weights file {path} does not fit {type(backbone).__name__}: "
                         f"{_count_and_name('missing keys', missing)}; "
                         f"{_count_and_name('unexpected keys', unexpected)}; "
                         f"{_count_and_name('mis-shaped tensors', mis_shaped)}")
    # Every difference was checked above; strict=False only lets the allowed output norms stay absent.
    backbone.load_state_dict(state_dict, strict=False)
    report = WeightsReport(str(reference), path, len(state_dict), len(expected), skipped, kept_initialisation)
    log.info("loaded %s (file %s)", report.summary(), path)
    return report


def _is_ignored(key: str) -> bool:
    return any(re.search(pattern, key) for pattern in IGNORED_KEY_PATTERNS)


def _count_and_name(what: str, keys: list[str]) -> str:
    more = f" and {len(keys) - _NAMED_KEYS} more" if len(keys) > _NAMED_KEYS else ""
    return f"{len(keys)} {what} {keys[:_NAMED_KEYS]}{more}"
