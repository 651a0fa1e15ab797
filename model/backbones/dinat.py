"""Dilated Neighborhood Attention Transformer (DiNAT, Hassani & Shi 2022) as a dense-prediction backbone.

Laid out like a timm model: blocks, model (with `feature_info`), builder, variants. Parameter names follow the
official DiNAT / OneFormer D2DiNAT checkpoints (patch_embed.proj.{0,1}, levels.i.blocks.j.attn.{qkv,rpb,proj},
levels.i.downsample.{reduction,norm}, norm0..norm3), so those load without renaming. Tensors stay
channels-last [B, H, W, C] inside, as in the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.neighborhood_attention import neighborhood_attention
from model.backbones.common import DropPath, Mlp, drop_path_rates, init_transformer_weights
from model.block_execution import run_block

# Per-dataset DiNAT-L settings from the OneFormer configs: kernel size and per-block dilations per stage.
DINAT_L_SETTINGS: dict[str, dict] = {
    "ade20k": {
        "kernel_size": 11,
        "dilations": [[1, 20, 1], [1, 5, 1, 10], [1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5], [1, 2, 1, 2, 1]],
    },
    "ade20k_1280": {
        "kernel_size": 11,
        "dilations": [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 5, 1, 7, 1, 3, 1, 5, 1, 5, 1, 7, 1, 7], [1, 3, 1, 3, 1]],
    },
    "cityscapes": {
        "kernel_size": 7,
        "dilations": [[1, 18, 1], [1, 5, 1, 9], [1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]],
    },
}
DINAT_L_SETTINGS["coco"] = DINAT_L_SETTINGS["ade20k"]


class ConvTokenizer(nn.Module):
    """Stem: two 3x3 stride-2 convs (stride 4 in all), then LayerNorm over channels; returns [B, H, W, C]."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """3x3 stride-2 conv doubling the channels, then LayerNorm; channels-last in and out."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NeighborhoodAttention2D(nn.Module):
    """Multi-head dilated neighborhood attention with relative positional bias (NATTEN 0.14 module)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, qkv_bias: bool = True,
                 attn_backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        # Maps smaller than the dilated window are zero-padded at the bottom/right BEFORE the qkv projection,
        # as NATTEN 0.14 does, so padded keys carry the projection bias; the released weights expect that.
        # Padded by sym_max without a branch, and cropped by gathers (crop_map), so that one torch.export
        # graph (model/export.py) serves maps smaller and larger than the window.
        window = self.kernel_size * self.dilation
        x = F.pad(x, (0, 0, 0, torch.sym_max(0, window - width), 0, torch.sym_max(0, window - height)))
        padded_h, padded_w = x.shape[1:3]
        qkv = self.qkv(x).reshape(batch, padded_h, padded_w, 3, self.num_heads, channels // self.num_heads)
        query, key, value = qkv.permute(3, 0, 4, 1, 2, 5)
        out = neighborhood_attention(query, key, value, self.kernel_size, self.dilation, rpb=self.rpb,
                                     backend=self.attn_backend)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        return self.proj(crop_map(out, height, width))


def crop_map(x: torch.Tensor, height, width) -> torch.Tensor:
    """x [B, H', W', C] -> [B, height, width, C] by gathering rows and columns rather than slicing: a slice's
    strides (and so the layout choices after it) would depend on whether padding happened, and a torch.export
    trace would fix that choice for every size."""
    rows = torch.arange(height, device=x.device)
    columns = torch.arange(width, device=x.device)
    return x.index_select(1, rows).index_select(2, columns)


class NATLayer(nn.Module):
    """Pre-norm transformer block: neighborhood attention then MLP, each with drop-path and optional layer scale."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, mlp_ratio: float,
                 drop_path: float, layer_scale: float | None, attn_backend: str | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation, attn_backend=attn_backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.norm1(x))
        if self.layer_scale:
            attended = self.gamma1 * attended
        x = x + self.drop_path(attended)
        mlp_out = self.mlp(self.norm2(x))
        if self.layer_scale:
            mlp_out = self.gamma2 * mlp_out
        return x + self.drop_path(mlp_out)


class NATBlock(nn.Module):
    """One stage: `depth` NAT layers with per-layer dilation, then an optional downsampler.
    Returns (input of the next stage, this stage's output)."""

    def __init__(self, dim: int, depth: int, num_heads: int, kernel_size: int, dilations: list[int],
                 mlp_ratio: float, drop_path: list[float], downsample: bool, layer_scale: float | None,
                 attn_backend: str | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            NATLayer(dim, num_heads, kernel_size, dilations[i], mlp_ratio, drop_path[i], layer_scale, attn_backend)
            for i in range(depth)
        )
        self.downsample = ConvDownsampler(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = run_block(block, x)
        return (x if self.downsample is None else self.downsample(x)), x


class DiNAT(nn.Module):
    """DiNAT backbone: res2..res5 (strides 4..32), each through its own LayerNorm, returned NCHW."""

    def __init__(self, embed_dim: int, depths: list[int], num_heads: list[int], kernel_size: int,
                 dilations: list[list[int]] | None = None, mlp_ratio: float = 4.0, drop_path_rate: float = 0.2,
                 layer_scale: float | None = None, in_chans: int = 3, attn_backend: str | None = None):
        super().__init__()
        num_levels = len(depths)
        if len(num_heads) != num_levels:
            raise ValueError(f"num_heads {num_heads} must have one entry per stage of depths {depths}")
        dilations = dilations if dilations is not None else [[1] * depth for depth in depths]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f"dilations {dilations} must list one dilation per block of depths {depths}")
        self.out_channels = [embed_dim * 2**i for i in range(num_levels)]
        self.out_strides = [4 * 2**i for i in range(num_levels)]
        self.feature_info = [
            {"num_chs": c, "reduction": s, "module": f"norm{i}"}
            for i, (c, s) in enumerate(zip(self.out_channels, self.out_strides))
        ]
        self.patch_embed = ConvTokenizer(in_chans, embed_dim)
        rates = drop_path_rates(drop_path_rate, depths)
        self.levels = nn.ModuleList()
        for i in range(num_levels):
            self.levels.append(NATBlock(
                self.out_channels[i], depths[i], num_heads[i], kernel_size, dilations[i], mlp_ratio,
                rates[i], downsample=i < num_levels - 1, layer_scale=layer_scale,
                attn_backend=attn_backend,
            ))
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.apply(init_transformer_weights)

    def repeated_blocks(self) -> list[nn.Module]:
        return [block for level in self.levels for block in level.blocks]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        x = self.patch_embed(images)
        features = []
        for i, level in enumerate(self.levels):
            x, stage_out = level(x)
            features.append(getattr(self, f"norm{i}")(stage_out).permute(0, 3, 1, 2).contiguous())
        return features


def dinat_large(dataset: str = "ade20k", kernel_size: int | None = None,
                dilations: list[list[int]] | None = None, drop_path_rate: float = 0.3, **kwargs) -> DiNAT:
    """DiNAT-L (192/384/768/1536, depths 3,4,18,5); `dataset` picks kernel/dilations from DINAT_L_SETTINGS,
    explicit `kernel_size` / `dilations` override them."""
    if dataset not in DINAT_L_SETTINGS:
        raise ValueError(f"dataset must be one of {sorted(DINAT_L_SETTINGS)}, got {dataset!r}")
    settings = DINAT_L_SETTINGS[dataset]
    return DiNAT(
        embed_dim=192, depths=[3, 4, 18, 5], num_heads=[6, 12, 24, 48],
        kernel_size=kernel_size if kernel_size is not None else settings["kernel_size"],
        dilations=dilations if dilations is not None else settings["dilations"],
        mlp_ratio=2.0, drop_path_rate=drop_path_rate, **kwargs,
    )


def dinat_mini(kernel_size: int = 7, dilations: list[list[int]] | None = None, drop_path_rate: float = 0.2,
               **kwargs) -> DiNAT:
    """The paper's DiNAT-Mini (ImageNet-224 dilations by default)."""
    return DiNAT(
        embed_dim=64, depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], kernel_size=kernel_size,
        dilations=dilations if dilations is not None else [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1] * 5],
        mlp_ratio=3.0, drop_path_rate=drop_path_rate, **kwargs,
    )


def dinat_tiny_test(kernel_size: int = 7, dilations: list[list[int]] | None = None, drop_path_rate: float = 0.0,
                    **kwargs) -> DiNAT:
    """A few-hundred-thousand-parameter DiNAT for CPU tests (dims 32..256, depths 1,1,2,1)."""
    return DiNAT(
        embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], kernel_size=kernel_size,
        dilations=dilations if dilations is not None else [[1], [2], [1, 2], [1]],
        mlp_ratio=2.0, drop_path_rate=drop_path_rate, **kwargs,
    )
