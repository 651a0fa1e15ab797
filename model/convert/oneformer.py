"""Hugging Face OneFormer -> ours, for everything after the backbone: the HF config fields that become our
build overrides, and the renaming of the pixel decoder, task encoder, transformer decoder and (when the HF
checkpoint has one) text mapper weights. Backbone weights are handed to model/convert/swin.py or dinat.py.

Every mapping is an explicit rule; a key no rule claims is an error (see `convert_head_state_dict`).
"""

from __future__ import annotations

import re

import torch

HF_BACKBONE_PREFIX = "model.pixel_level_module.encoder."
# Loss-module buffers of the HF model: `empty_weight` is rebuilt from the no-object weight by our criterion.
HF_IGNORED_KEYS = ("criterion.empty_weight",)
HF_LOGIT_SCALE_KEY = "criterion.logit_scale"

# The HF fields that must hold these values: our modules implement only the released architecture.
_REQUIRED_HF_VALUES: dict[str, object] = {
    "pre_norm": False,
    "use_task_norm": True,
    "enforce_input_proj": False,
    "norm": "GN",
    "common_stride": 4,
    "strides": [4, 8, 16, 32],
    "layer_norm_eps": 1e-5,
    "text_encoder_context_length": 77,
}


class UnsupportedConfigError(ValueError):
    """The HF config describes a model our modules cannot represent exactly."""


def head_overrides(hf_config: dict) -> dict:
    """`build_model` overrides for the heads described by an HF OneFormer config.json dict."""
    for name, required in _REQUIRED_HF_VALUES.items():
        if name in hf_config and _normalised(hf_config[name]) != _normalised(required):
            raise UnsupportedConfigError(
                f"config.json field {name!r} = {hf_config[name]!r} is not supported (only {required!r})"
            )
    if hf_config.get("conv_dim", 256) != hf_config.get("hidden_dim", 256):
        # HF keeps the decoder's input projections in a plain list, so they are never saved: a converted
        # model with conv_dim != hidden_dim would have random projections.
        raise UnsupportedConfigError(
            f"config.json fields 'conv_dim' ({hf_config.get('conv_dim')}) and 'hidden_dim' "
            f"({hf_config.get('hidden_dim')}) must be equal: HF does not save the projections between them"
        )
    id2label = hf_config.get("id2label")
    if not id2label:
        raise UnsupportedConfigError("config.json field 'id2label' is missing: the number of classes is unknown")
    decoder_layers = hf_config.get("decoder_layers", 10)
    if decoder_layers < 2:
        raise UnsupportedConfigError(f"config.json field 'decoder_layers' must be >= 2, got {decoder_layers}")
    heads = hf_config.get("num_attention_heads", 8)
    text_width = hf_config.get("text_encoder_width", 256)
    dropout = float(hf_config.get("dropout", 0.1))
    return {
        "num_classes": len(id2label),
        "num_queries": hf_config.get("num_queries", 150),
        "hidden_dim": hf_config.get("hidden_dim", 256),
        "conv_dim": hf_config.get("conv_dim", 256),
        "mask_dim": hf_config.get("mask_dim", 256),
        "pixel_decoder_layers": hf_config.get("encoder_layers", 6),
        "pixel_decoder_heads": heads,
        "pixel_decoder_ffn_dim": hf_config.get("encoder_feedforward_dim", 1024),
        "pixel_decoder_dropout": dropout,
        # HF counts the prediction on the initial queries as a decoder layer; we count attention layers.
        "decoder_layers": decoder_layers - 1,
        "decoder_heads": heads,
        "decoder_ffn_dim": hf_config.get("dim_feedforward", 2048),
        "query_init_layers": hf_config.get("query_dec_layers", 2),
        "query_init_dropout": dropout,
        "task_context_length": hf_config.get("task_seq_len", 77),
        "text_width": text_width,
        "text_layers": hf_config.get("text_encoder_num_layers", 6),
        "text_heads": max(text_width // 64, 1),  # HF (like CLIP) derives the heads from the width
        "text_vocab_size": hf_config.get("text_encoder_vocab_size", 49408),
        "text_projection_layers": hf_config.get("text_encoder_proj_layers", 2),
        "text_num_context": hf_config.get("text_encoder_n_ctx", 16),
        "contrastive_temperature": hf_config.get("contrastive_temperature", 0.07) or 0.07,
    }


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value


def _pack_qkv(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


# (HF regex, our template). Groups are substituted into the template with str.format.
_RENAMES: list[tuple[str, str]] = [
    # Pixel decoder.
    (r"model\.pixel_level_module\.decoder\.level_embed", "pixel_decoder.level_embed"),
    (r"model\.pixel_level_module\.decoder\.input_projections\.(\d+)\.([01])\.(weight|bias)",
     "pixel_decoder.input_proj.{0}.{1}.{2}"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn\."
     r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     "pixel_decoder.layers.{0}.self_attn.{1}.{2}"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
     "pixel_decoder.layers.{0}.norm1.{1}"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc1\.(weight|bias)",
     "pixel_decoder.layers.{0}.linear1.{1}"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc2\.(weight|bias)",
     "pixel_decoder.layers.{0}.linear2.{1}"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
     "pixel_decoder.layers.{0}.norm2.{1}"),
    (r"model\.pixel_level_module\.decoder\.mask_projection\.(weight|bias)", "pixel_decoder.mask_features.{0}"),
    (r"model\.pixel_level_module\.decoder\.adapter_1\.([01])\.(weight|bias)", "pixel_decoder.lateral_conv.{0}.{1}"),
    (r"model\.pixel_level_module\.decoder\.layer_1\.([01])\.(weight|bias)", "pixel_decoder.output_conv.{0}.{1}"),
    # Task encoder: HF wraps each Linear of the MLP in a block (`layers.i.0`).
    (r"model\.task_encoder\.task_mlp\.layers\.(\d+)\.0\.(weight|bias)", "task_encoder.task_mlp.layers.{0}.{1}"),
    # Transformer decoder and the query initialiser inside it.
    (r"model\.transformer_module\.queries_embedder\.weight", "transformer_decoder.query_embed.weight"),
    (r"model\.transformer_module\.level_embed\.weight", "transformer_decoder.level_embed.weight"),
    (r"model\.transformer_module\.decoder\.query_transformer\.decoder\.layers\.(\d+)\.(.+)",
     "transformer_decoder.query_initializer.layers.{0}.{1}"),
    (r"model\.transformer_module\.decoder\.query_transformer\.decoder\.norm\.(weight|bias)",
     "transformer_decoder.query_initializer.norm.{0}"),
    (r"model\.transformer_module\.decoder\.query_input_projection\.(weight|bias)",
     "transformer_decoder.query_initializer.input_proj.{0}"),
    (r"model\.transformer_module\.decoder\.decoder_norm\.(weight|bias)", "transformer_decoder.decoder_norm.{0}"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.(multihead_attn\..+|norm\.weight|norm\.bias)",
     "transformer_decoder.cross_attention_layers.{0}.{1}"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.self_attn\.out_proj\.(weight|bias)",
     "transformer_decoder.self_attention_layers.{0}.self_attn.out_proj.{1}"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.norm\.(weight|bias)",
     "transformer_decoder.self_attention_layers.{0}.norm.{1}"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.ffn\.(linear1|linear2|norm)\.(weight|bias)",
     "transformer_decoder.ffn_layers.{0}.{1}.{2}"),
    (r"model\.transformer_module\.decoder\.class_embed\.(weight|bias)", "transformer_decoder.class_embed.{0}"),
    (r"model\.transformer_module\.decoder\.mask_embed\.layers\.(\d+)\.0\.(weight|bias)",
     "transformer_decoder.mask_embed.layers.{0}.{1}"),
    # Text mapper (only in HF checkpoints saved with is_training=True; hub checkpoints have none).
    (r"model\.text_mapper\.text_encoder\.transformer\.layers\.(\d+)\.self_attn\.(.+)",
     "text_mapper.text_encoder.resblocks.{0}.attn.{1}"),
    (r"model\.text_mapper\.text_encoder\.transformer\.layers\.(\d+)\.layer_norm1\.(weight|bias)",
     "text_mapper.text_encoder.resblocks.{0}.ln_1.{1}"),
    (r"model\.text_mapper\.text_encoder\.transformer\.layers\.(\d+)\.layer_norm2\.(weight|bias)",
     "text_mapper.text_encoder.resblocks.{0}.ln_2.{1}"),
    (r"model\.text_mapper\.text_encoder\.transformer\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)",
     "text_mapper.text_encoder.resblocks.{0}.mlp.c_fc.{1}"),
    (r"model\.text_mapper\.text_encoder\.transformer\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)",
     "text_mapper.text_encoder.resblocks.{0}.mlp.c_proj.{1}"),
    (r"model\.text_mapper\.text_encoder\.(positional_embedding|token_embedding\.weight|ln_final\.weight|ln_final\.bias)",
     "text_mapper.text_encoder.{0}"),
    (r"model\.text_mapper\.text_projector\.layers\.(\d+)\.0\.(weight|bias)", "text_mapper.text_projector.layers.{0}.{1}"),
    (r"model\.text_mapper\.prompt_ctx\.weight", "text_mapper.prompt_ctx.weight"),
]  # fmt: skip
_COMPILED_RENAMES = [(re.compile(pattern), template) for pattern, template in _RENAMES]

# HF splits the decoder self-attention into q/k/v Linears; ours is nn.MultiheadAttention with one packed
# in_proj in q, k, v order.
_SPLIT_QKV = re.compile(
    r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.self_attn\.([qkv])_proj\.(weight|bias)"
)


def renamed_key(hf_key: str) -> str | None:
    """Our name for an HF head key that maps one-to-one, or None."""
    for pattern, template in _COMPILED_RENAMES:
        match = pattern.fullmatch(hf_key)
        if match:
            return template.format(*match.groups())
    return None


def convert_head_state_dict(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF keys outside the backbone -> (our state dict entries, HF keys no rule claims).

    `criterion.logit_scale` becomes `text_mapper.logit_scale`; the caller drops it for inference models."""
    converted: dict[str, torch.Tensor] = {}
    split_qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unclaimed = []
    for key, tensor in hf_state.items():
        if key.startswith(HF_BACKBONE_PREFIX) or key in HF_IGNORED_KEYS:
            continue
        if key == HF_LOGIT_SCALE_KEY:
            converted["text_mapper.logit_scale"] = tensor
            continue
        match = _SPLIT_QKV.fullmatch(key)
        if match:
            layer, part, kind = match.groups()
            split_qkv.setdefault((layer, kind), {})[part] = tensor
            continue
        ours = renamed_key(key)
        if ours is None:
            unclaimed.append(key)
        else:
            converted[ours] = tensor
    for (layer, kind), parts in split_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"decoder layer {layer} self-attention {kind}: HF checkpoint has only {sorted(parts)} of q/k/v")
        suffix = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        converted[f"transformer_decoder.self_attention_layers.{layer}.self_attn.{suffix}"] = _pack_qkv(parts)
    return converted, unclaimed


def backbone_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF backbone entries with the `model.pixel_level_module.encoder.` prefix removed."""
    return {key[len(HF_BACKBONE_PREFIX) :]: value for key, value in hf_state.items() if key.startswith(HF_BACKBONE_PREFIX)}

