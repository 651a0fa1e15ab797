"""Mask2Former's multi-scale deformable-attention pixel decoder, as OneFormer uses it.

res3..res5 are projected to `conv_dim` channels (1x1 conv + GroupNorm), flattened into one token sequence
(coarsest level first) and refined by a Deformable-DETR encoder; one FPN step then adds res2, and a 1x1 conv
makes the stride-4 mask features. Returns the mask features and the three encoder maps ordered 1/32, 1/16,
1/8 for the transformer decoder.

Where the public implementations differ (and what we follow):
- The official code runs this whole block in fp32 under autocast (its CUDA op has no half precision). We run
  the learned layers in the weights' dtype (bf16 when DeepSpeed casts the model) but keep the geometry in
  fp32 (fp64 for a fp64 model): valid ratios and reference points are computed from the map shapes at
  forward time, never stored, so a module cast cannot round them; the sampling offsets come out of their
  Linear in the layer's dtype, but the division by the level size and the addition to the reference points
  happen in fp32, and the kernel receives fp32 locations beside bf16 values and weights (the Triton kernel
  interpolates and accumulates in fp32; the plain-PyTorch reference computes in the values' dtype). In bf16
  a coordinate near 1 has a resolution of 2**-8: up to 0.3 px on a 160-wide level; in fp32 below 1e-4 px.
  The sine position encoding is computed in fp32 and then cast: it is a feature added to the tokens, not a
  coordinate.
- Hugging Face applies dropout whenever its config says `is_training`, even in eval mode, and clamps
  non-finite activations in training; we follow the official code: dropout follows `module.training`, no clamp.
- Hugging Face keeps `level_embed` on the pixel decoder, the official code on its encoder wrapper; we keep it
  here (`PixelDecoder.level_embed`), same shape [3, conv_dim].
- The official code passes an all-false padding mask, so the valid ratios are all 1; our Deformable-DETR
  reference points are the pixel centres of each level with those ratios (images are padded by the caller,
  not masked).

The level layout travels as Python ints (`level_shapes`) beside its tensor form: the PyTorch reference kernel
gets the ints and slices by them instead of reading a tensor back with `.tolist()`, so torch.export
(model/export.py) traces this forward with symbolic sizes; the Triton kernel takes the tensors. The reference
points are `arange + 0.5` (the values of Deformable DETR's `linspace(0.5, n - 0.5, n)`, whose symbolic float
end a trace would freeze).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import choose_backend
from kernels.ms_deform_attn import ms_deform_attn
from model.block_execution import run_block
from model.layers import sine_position_encoding

NUM_ENCODER_LEVELS = 3


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype coordinates are computed in for layers of `dtype`: fp32, or fp64 for a fp64 model. Half
    precision would put a point near 1 on a grid of 2**-8 (bf16), a third of a pixel on a 160-wide map."""
    return torch.promote_types(dtype, torch.float32)


def sampling_locations(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
) -> torch.Tensor:
    """reference_points [B, Lq, L, 2] in [0, 1], offsets [B, Lq, H, L, P, 2] in pixels of each level (any
    dtype), spatial_shapes [L, 2] (h, w) -> [B, Lq, H, L, P, 2] in [0, 1], in the reference points' dtype
    (at least fp32): only the offsets carry the layers' precision, the geometry is never rounded."""
    dtype = geometry_dtype(reference_points.dtype)
    normaliser = spatial_shapes.flip(-1).to(dtype)  # (w, h) per level
    return (
        reference_points.to(dtype)[:, :, None, :, None, :]
        + offsets.to(dtype) / normaliser[None, None, None, :, None, :]
    )


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's attention: each query samples `num_points` points per head and level around its
    reference point and mixes them with softmax weights. `backend` picks the kernel (None: Triton on CUDA,
    the PyTorch reference otherwise)."""

    def __init__(
        self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, backend: str | None = None
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offsets whose bias fans the points out along 8 directions per head,
        uniform attention, Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        if self.sampling_offsets.weight.is_meta:
            return
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        level_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query [B, Lq, C] (with position), reference_points [B, Lq, L, 2] in [0, 1] (x, y), at least fp32,
        value_input [B, Lv, C], spatial_shapes [L, 2] (h, w) and the same as ints, level_shapes
        -> [B, Lq, C]."""
        batch, num_queries, _ = query.shape
        num_values = value_input.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(batch, num_values, heads, self.embed_dim // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        # The reference takes the layout as Python ints (no `.tolist()`: module docstring), Triton as tensors.
        if choose_backend("ms_deform_attn", value.device, self.backend) == "reference":
            layout = (level_shapes, level_starts(level_shapes))
        else:
            layout = (spatial_shapes, level_start_index)
        sampled = ms_deform_attn(value, *layout, locations, weights, backend=self.backend)
        return self.output_proj(sampled)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN."""

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        dropout: float,
        num_heads: int,
        num_levels: int,
        num_points: int,
        backend: str | None = None,
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, num_heads, num_levels, num_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src, pos, reference_points, spatial_shapes, level_start_index, level_shapes
    ) -> torch.Tensor:
        attended = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, level_shapes
        )
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(hidden))


def level_starts(level_shapes: list[tuple[int, int]]) -> list[int]:
    """Where each level's tokens start in the flattened sequence."""
    starts = [0]
    for height, width in level_shapes[:-1]:
        starts.append(starts[-1] + height * width)
    return starts


def level_shapes_tensor(level_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """int64 [L, 2] (h, w), built element by element so that symbolic sizes stay symbolic under torch.export
    (torch.as_tensor of sizes would freeze the traced values)."""
    return torch.stack(
        [torch.stack([torch.full((), size, dtype=torch.long, device=device) for size in shape])
         for shape in level_shapes]
    )  # fmt: skip


def encoder_reference_points(
    level_shapes: list[tuple[int, int]], batch: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Deformable DETR's reference points with every valid ratio 1: every pixel centre of every level,
    normalised by its level's size, the same for each level's frame -> [B, sum(h*w), L, 2] (x, y)."""
    per_level = []
    for height, width in level_shapes:
        ref_y, ref_x = torch.meshgrid(
            (torch.arange(height, device=device).to(dtype) + 0.5) / height,
            (torch.arange(width, device=device).to(dtype) + 0.5) / width,
            indexing="ij",
        )
        per_level.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    points = torch.cat(per_level, 0)
    return points[None, :, None].expand(batch, -1, len(level_shapes), -1)


def conv_norm(
    in_channels: int, out_channels: int, kernel_size: int, bias: bool, relu: bool = False
) -> nn.Sequential:
    """Conv2d + GroupNorm(32) (+ ReLU), Xavier-initialised like detectron2's c2_xavier_fill."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if bias:
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv, nn.GroupNorm(32, out_channels)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    """MSDeformAttn pixel decoder over backbone maps res2..res5 (strides 4, 8, 16, 32).

    forward(features) -> (mask_features [B, mask_dim, H/4, W/4], [res5-, res4-, res3-level maps], each
    [B, conv_dim, h, w], ordered 1/32, 1/16, 1/8)."""

    def __init__(
        self,
        in_channels: list[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        num_layers: int = 6,
        num_points: int = 4,
        backend: str | None = None,
    ):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(
                f"in_channels must list the channels of res2..res5 (4 entries), got {in_channels}"
            )
        if conv_dim % 32:
            raise ValueError(f"conv_dim must be a multiple of 32 (GroupNorm(32)), got {conv_dim}")
        # Coarsest first: input_proj[0] takes res5, input_proj[2] takes res3.
        self.input_proj = nn.ModuleList(
            conv_norm(channels, conv_dim, kernel_size=1, bias=True) for channels in in_channels[:0:-1]
        )
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
        self.level_embed = nn.Parameter(torch.empty(NUM_ENCODER_LEVELS, conv_dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                conv_dim, ffn_dim, dropout, num_heads, NUM_ENCODER_LEVELS, num_points, backend
            )
            for _ in range(num_layers)
        )
        # Xavier on every matrix of the encoder, then the deformable attention's own init, as the official code.
        for parameter in self.layers.parameters():
            if parameter.dim() > 1 and not parameter.is_meta:
                nn.init.xavier_uniform_(parameter)
        for module in self.layers.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        self.lateral_conv = conv_norm(in_channels[0], conv_dim, kernel_size=1, bias=False)
        self.output_conv = conv_norm(conv_dim, conv_dim, kernel_size=3, bias=False, relu=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)
        self.conv_dim = conv_dim

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if len(features) != 4:
            raise ValueError(f"features must be the 4 backbone maps res2..res5, got {len(features)}")
        encoder_inputs = features[:0:-1]  # res5, res4, res3
        sources, positions, shapes = [], [], []
        for level, (feature, projection) in enumerate(zip(encoder_inputs, self.input_proj)):
            batch, _, height, width = feature.shape
            source = projection(feature)
            position = sine_position_encoding(
                batch, height, width, self.conv_dim // 2, feature.device, source.dtype
            )
            sources.append(source.flatten(2).transpose(1, 2))
            positions.append(position.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
            shapes.append((height, width))
        src = torch.cat(sources, 1)
        pos = torch.cat(positions, 1)
        spatial_shapes = level_shapes_tensor(shapes, src.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        # fp32 even when the layers run in bf16: see the module docstring.
        reference_points = encoder_reference_points(
            shapes, src.shape[0], geometry_dtype(src.dtype), src.device
        )
        for layer in self.layers:
            src = run_block(layer, src, pos, reference_points, spatial_shapes, level_start_index, shapes)

        batch = src.shape[0]
        encoder_maps = [
            tokens.transpose(1, 2).reshape(batch, -1, height, width)
            for tokens, (height, width) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        lateral = self.lateral_conv(features[0])
        upsampled = F.interpolate(
            encoder_maps[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
        )
        stride4 = self.output_conv(lateral + upsampled)
        return self.mask_features(stride4), encoder_maps
