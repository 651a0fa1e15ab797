"""ConvNeXt (Liu et al. 2022) from timm, wrapped to return res2..res5 each after its own LayerNorm.

The timm stem and stages are used as they are (keys stem.*, stages.i.*, timm's layout); the four output
norms are named norm0..norm3 like the official D2 ConvNeXt that OneFormer trains.
"""

from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from torch import nn

from model.block_execution import run_block


class ConvNeXtBackbone(nn.Module):
    """timm ConvNeXt trunk (no head) -> list of 4 NCHW maps at strides 4, 8, 16, 32."""

    def __init__(self, depths: list[int], dims: list[int], drop_path_rate: float, layer_scale_init: float = 1.0,
                 in_chans: int = 3):
        super().__init__()
        trunk = TimmConvNeXt(in_chans=in_chans, num_classes=0, depths=tuple(depths), dims=tuple(dims),
                             ls_init_value=layer_scale_init, drop_path_rate=drop_path_rate)
        self.stem = trunk.stem
        self.stages = trunk.stages
        self.out_channels = list(dims)
        self.out_strides = [4 * 2**i for i in range(len(dims))]
        self.feature_info = [
            {"num_chs": c, "reduction": s, "module": f"norm{i}"}
            for i, (c, s) in enumerate(zip(self.out_channels, self.out_strides))
        ]
        for i, channels in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(channels, eps=1e-6))

    def repeated_blocks(self) -> list[nn.Module]:
        return [block for stage in self.stages for block in stage.blocks]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        x = self.stem(images)
        features = []
        for i, stage in enumerate(self.stages):
            # timm's stage is downsample then blocks; its blocks run one by one here so that each can be
            # checkpointed or compiled like every other repeated block (model.block_execution).
            x = stage.downsample(x)
            for block in stage.blocks:
                x = run_block(block, x)
            normed = getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1))
            features.append(normed.permute(0, 3, 1, 2).contiguous())
        return features


def convnext_large(drop_path_rate: float = 0.4, layer_scale_init: float = 1.0, **kwargs) -> ConvNeXtBackbone:
    return ConvNeXtBackbone([3, 3, 27, 3], [192, 384, 768, 1536], drop_path_rate, layer_scale_init, **kwargs)


def convnext_xlarge(drop_path_rate: float = 0.4, layer_scale_init: float = 1.0, **kwargs) -> ConvNeXtBackbone:
    return ConvNeXtBackbone([3, 3, 27, 3], [256, 512, 1024, 2048], drop_path_rate, layer_scale_init, **kwargs)
