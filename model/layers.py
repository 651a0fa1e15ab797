"""Small blocks shared by the OneFormer heads: the MLP, a Linear for exact inputs, the sine position encoding,
QuickGELU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (none after the last), as in DETR.

    The layers live in `self.layers` (a ModuleList), the layout of the official checkpoints."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        first_layer: type[nn.Linear] = nn.Linear,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        layer_types = [first_layer] + [nn.Linear] * (num_layers - 1)
        self.layers = nn.ModuleList(
            layer_type(i, o) for layer_type, i, o in zip(layer_types, in_dims, out_dims)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return x


class ExactInputLinear(nn.Linear):
    """A Linear whose inputs are numbers that half precision would round, such as raw token ids up to 49,407
    (bf16 keeps 8 significant bits: 29119 -> 29056). It computes in fp32 (or a wider input or weight dtype)
    with its weights upcast, then returns the weights' dtype; parameters, init and state-dict keys are
    nn.Linear's, so module casts and optimizers treat it like any other layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.weight.dtype), torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(self.weight.dtype)


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU; the released text encoders were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def sine_position_encoding(
    batch: int,
    height: int,
    width: int,
    num_features: int,
    device: torch.device,
    dtype: torch.dtype,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """DETR's normalised 2-D sine encoding of an unpadded map -> [batch, 2 * num_features, height, width].

    Rows and columns are numbered 1..h and 1..w, divided by the last one (+1e-6) and scaled to 2*pi; the
    first `num_features` channels encode y, the rest x, each as interleaved sin/cos pairs. Computed in
    float32 and cast, so half-precision callers get the same encoding up to rounding."""
    eps = 1e-6
    scale = 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (height + eps) * scale
    x = x / (width + eps) * scale
    exponent = (
        2 * torch.div(torch.arange(num_features, device=device), 2, rounding_mode="floor") / num_features
    )
    dim_t = temperature ** exponent.to(torch.float32)
    pos_y = _interleave_sin_cos(y[:, None] / dim_t)  # [h, F]
    pos_x = _interleave_sin_cos(x[:, None] / dim_t)  # [w, F]
    encoding = torch.cat(
        (
            pos_y[:, None, :].expand(height, width, num_features),
            pos_x[None, :, :].expand(height, width, num_features),
        ),
        dim=-1,
    )
    encoding = encoding.permute(2, 0, 1).to(dtype)
    return encoding.unsqueeze(0).expand(batch, -1, -1, -1)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """[n, F] angles -> [n, F]: sin of the even columns and cos of the odd ones, pairwise interleaved."""
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)
