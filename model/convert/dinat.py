"""State-dict adapter: DiNAT weights in the Hugging Face `Dinat*` layout (transformers' modeling_dinat, also
inside Hugging Face OneFormer checkpoints) onto `model.backbones.dinat.DiNAT`, whose names are the official
ones (official / D2DiNAT checkpoints pass through unchanged).

    ours = convert_dinat_state_dict(hf_oneformer_state, prefix="model.pixel_level_module.encoder.")

Hugging Face splits qkv into query/key/value linears (concatenated here in q, k, v order), stores the two
layer-scale vectors as one [2, C] `layer_scale_parameters`, and calls the output norms hidden_states_norms.stageN.
"""

from __future__ import annotations

import re

import torch

_HF_RENAMES = (
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^encoder\.levels\.(\d+)\.layers\.", r"levels.\1.blocks."),
    (r"^encoder\.levels\.(\d+)\.downsample\.", r"levels.\1.downsample."),
    (r"^hidden_states_norms\.stage(\d+)\.", lambda m: f"norm{int(m.group(1)) - 1}."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.self\.rpb$", ".attn.rpb"),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)


def is_hugging_face_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return any("patch_embeddings.projection" in k for k in state_dict)


def convert_dinat_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Keys under `prefix` (stripped), Hugging Face or official layout -> our keys."""
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not is_hugging_face_layout(state_dict):
        return dict(state_dict)
    state_dict = {re.sub(r"^dinat\.", "", k): v for k, v in state_dict.items()}
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if re.search(r"\.attention\.self\.(query|key|value)\.", key):
            continue  # merged below
        if key.endswith(".layer_scale_parameters"):
            block = _rename(key[: -len("layer_scale_parameters")])
            converted[block + "gamma1"], converted[block + "gamma2"] = value[0], value[1]
            continue
        converted[_rename(key)] = value
    blocks = {m.group(1) for k in state_dict if (m := re.match(r"(.*)\.attention\.self\.query\.", k))}
    for block in sorted(blocks):
        for param in ("weight", "bias"):
            parts = [state_dict.get(f"{block}.attention.self.{name}.{param}") for name in ("query", "key", "value")]
            if all(p is not None for p in parts):
                converted[f"{_rename(block + '.')}attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return converted


def _rename(key: str) -> str:
    for pattern, replacement in _HF_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key
