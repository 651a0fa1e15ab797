"""OneFormer: composes backbone, pixel decoder, task encoder, transformer decoder and (training) text mapper.

forward(images [B, 3, H, W] RGB 0-255 in any dtype (fp32 preferred, whatever the weights' dtype), padded by
the caller to a multiple of `size_divisibility`,
tasks list[str] of length B, text_tokens int64 [B, N-16, 77] or None) -> dict with
"pred_logits" [B, N, K+1], "pred_masks" [B, N, H/4, W/4] (mask logits), "aux_outputs" (list of the earlier
predictions, the first from the initial queries) and, when the text mapper runs, "object_queries" [B, N, D],
"text_queries" [B, N, D] and "logit_scale" ([1], log of the contrastive scale).

Precision (a deviation from the official code, which normalises in fp32 and runs under autocast): the pixel
statistics stay fp32 buffers even when the module is cast to bf16/fp16 as DeepSpeed does (`module.bfloat16()`
would turn the mean 123.675 into 123.5), and images are normalised in fp32 (fp64 for fp64 inputs or models)
and only then cast to the weights' dtype, so 0-255 inputs are never rounded to bf16 (spacing 1 above 128).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.pixel_decoder import PixelDecoder
from model.task_conditioning import TaskEncoder
from model.text_mapper import TextMapper
from model.transformer_decoder import TransformerDecoder


class OneFormer(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        pixel_decoder: PixelDecoder,
        task_encoder: TaskEncoder,
        transformer_decoder: TransformerDecoder,
        text_mapper: TextMapper | None,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
    ):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.task_encoder = task_encoder
        self.transformer_decoder = transformer_decoder
        self.text_mapper = text_mapper
        self.size_divisibility = size_divisibility
        self._pixel_statistics = {"pixel_mean": tuple(pixel_mean), "pixel_std": tuple(pixel_std)}
        for name, values in self._pixel_statistics.items():
            self.register_buffer(name, _channel_buffer(values, torch.device("cpu")), persistent=False)

    def _apply(self, fn, recurse=True):
        """Module casts (`.to`, `.cuda`, `.bfloat16()`) reach the buffers through here: let them move the
        pixel statistics but never lower them below fp32, rebuilding them from the exact values."""
        super()._apply(fn, recurse)
        for name, values in self._pixel_statistics.items():
            buffer = getattr(self, name)
            if buffer.is_floating_point() and buffer.dtype.itemsize < 4:
                setattr(self, name, _channel_buffer(values, buffer.device))
        return self

    @property
    def num_queries(self) -> int:
        return self.transformer_decoder.query_embed.num_embeddings

    def forward(
        self, images: torch.Tensor, tasks: list[str], text_tokens: torch.Tensor | None = None
    ) -> dict:
        self._check_inputs(images, tasks, text_tokens)
        features = self.backbone(self.normalise(images))
        mask_features, multi_scale_features = self.pixel_decoder(features)
        task_token = self.task_encoder(tasks)
        outputs = self.transformer_decoder(multi_scale_features, mask_features, task_token)
        object_queries = outputs.pop("object_queries")
        if text_tokens is not None:
            outputs["object_queries"] = object_queries
            outputs["text_queries"], outputs["logit_scale"] = self.text_mapper(text_tokens)
        return outputs

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """0-255 images -> (images - mean) / std, computed in at least fp32 and returned in the weights' dtype."""
        dtype = torch.promote_types(torch.promote_types(images.dtype, self.pixel_mean.dtype), torch.float32)
        normalised = (images.to(dtype) - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)
        return normalised.to(self._weights_dtype)

    @property
    def _weights_dtype(self) -> torch.dtype:
        # Every OneFormer has this parameter, and module casts (DeepSpeed's included) give all of them one dtype.
        return self.pixel_decoder.level_embed.dtype

    def _check_inputs(self, images: torch.Tensor, tasks: list[str], text_tokens: torch.Tensor | None) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.size_divisibility or width % self.size_divisibility:
            raise ValueError(
                f"images must be padded to a multiple of {self.size_divisibility}, got H={height}, W={width}"
            )
        if len(tasks) != images.shape[0]:
            raise ValueError(f"tasks must have one entry per image ({images.shape[0]}), got {len(tasks)}")
        if text_tokens is None:
            return
        if self.text_mapper is None:
            raise ValueError(
                "text_tokens given but the model has no text mapper; build it with training=True"
            )
        num_texts = self.num_queries - (self.text_mapper.num_context)
        context_length = self.text_mapper.text_encoder.context_length
        expected = [images.shape[0], num_texts, context_length]
        if list(text_tokens.shape) != expected:
            raise ValueError(
                f"text_tokens must be {expected} (B, N - num_context, context), got {list(text_tokens.shape)}"
            )


def _channel_buffer(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
