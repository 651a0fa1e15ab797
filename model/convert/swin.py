"""State-dict adapter: Swin weights from the Hugging Face (old and new naming), timm or official layout
onto `model.backbones.swin.SwinTransformer` (official/D2 key names).

    ours = convert_swin_state_dict(hf_oneformer_state, prefix="model.pixel_level_module.encoder.")
    backbone.load_state_dict(ours)

Hugging Face splits qkv into three linears (q_proj/k_proj/v_proj, or attention.self.query/key/value before
transformers 5) which are concatenated in q, k, v order; its per-stage output norms hidden_states_norms.stageN
become norm{N-1}. timm puts each patch merging at the START of the next stage (layers.{i+1}.downsample);
the official layout, and ours, at the END of stage i.
"""

from __future__ import annotations

import re

import torch

# (Hugging Face suffix, our suffix) inside one block; both transformers naming generations.
_HF_BLOCK_RENAMES = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.o_proj.", "attn.proj."),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("self.query", "self.key", "self.value"))


def is_hugging_face_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return any("patch_embeddings.projection" in k for k in state_dict)


def is_timm_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    has_merge = {int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
    return bool(has_merge) and 0 not in has_merge


def convert_swin_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Keys under `prefix` (stripped) in any supported layout -> our keys. Keys outside `prefix` are dropped."""
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if is_hugging_face_layout(state_dict):
        return _from_hugging_face(state_dict)
    if is_timm_layout(state_dict):
        return {_timm_key_to_ours(k): v for k, v in state_dict.items()}
    return dict(state_dict)


def _timm_key_to_ours(key: str) -> str:
    return re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)


def _from_hugging_face(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = {re.sub(r"^swin\.", "", k): v for k, v in state_dict.items()}
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if any(f"attention.{name}." in key for names in _HF_QKV_NAMES for name in names):
            continue  # merged below
        converted[_hf_key_to_ours(key)] = value
    for block in sorted({m.group(1) for k in state_dict if (m := re.match(r"(encoder\.layers\.\d+\.blocks\.\d+)\.", k))}):
        ours = _hf_key_to_ours(block + ".") + "attn.qkv."
        for names in _HF_QKV_NAMES:
            if f"{block}.attention.{names[0]}.weight" in state_dict:
                for param in ("weight", "bias"):
                    parts = [state_dict.get(f"{block}.attention.{name}.{param}") for name in names]
                    if all(p is not None for p in parts):
                        converted[ours + param] = torch.cat(parts, dim=0)
    return converted


def _hf_key_to_ours(key: str) -> str:
    key = key.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
    key = key.replace("embeddings.norm.", "patch_embed.norm.")
    key = re.sub(r"^hidden_states_norms\.stage(\d+)\.", lambda m: f"norm{int(m.group(1)) - 1}.", key)
    key = re.sub(r"^encoder\.layers\.", "layers.", key)
    if ".blocks." in key:
        for hf_name, our_name in _HF_BLOCK_RENAMES:
            key = key.replace(hf_name, our_name)
    return key
