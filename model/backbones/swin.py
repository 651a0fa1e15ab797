"""Swin Transformer (Liu et al. 2021) as a dense-prediction backbone for any input size.

Written here rather than taken from timm because timm's Swin fixes its attention masks to one image size,
while detection/segmentation Swin (the official D2 one OneFormer trains, and the Hugging Face SwinBackbone)
pads the image to the patch size and every stage to window multiples and builds the shifted-window mask for
the padded size. Same layout as timm's model files: blocks, model with `feature_info`, builder, variants.
Parameter names are the official/D2 ones (layers.i.blocks.j.attn.qkv, layers.i.downsample at the END of
stage i, norm0..norm3), so OneFormer checkpoints load without renaming; model/convert/swin.py maps others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones.common import DropPath, Mlp, drop_path_rates, init_transformer_weights
from model.block_execution import run_block

# Added to attention logits between tokens from different regions of a shifted window (the official value;
# exp(-100) underflows to 0 in fp32 so it acts as a hard mask).
SHIFTED_WINDOW_MASK_VALUE = -100.0


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size conv after right/bottom zero padding, then LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.patch_size, -width % self.patch_size
        images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(images).permute(0, 2, 3, 1))  # [B, H, W, C]


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of window) -> [B * windows, window * window, C]."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, window: int, shift: int, device) -> torch.Tensor:
    """[windows, window^2, window^2] additive mask keeping attention inside each pre-shift region."""
    def regions(length):
        index = torch.arange(length, device=device)
        return (index >= length - window).long() + (index >= length - shift).long()

    region = (regions(height)[:, None] * 3 + regions(width)[None, :]).float()
    region_windows = window_partition(region[None, :, :, None], window).squeeze(-1)
    different = region_windows[:, None, :] != region_windows[:, :, None]
    return different.float() * SHIFTED_WINDOW_MASK_VALUE


class WindowAttention(nn.Module):
    """Multi-head self-attention inside window x window windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        relative = (coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]) + window_size - 1
        # non-persistent: it is a pure function of window_size (official checkpoints carry it; we drop it)
        self.register_buffer("relative_position_index", relative[0] * (2 * window_size - 1) + relative[1],
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> torch.Tensor:
        area = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        return bias.view(area, area, self.num_heads).permute(2, 0, 1)  # [heads, area, area]

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        num_windows_total, area, channels = windows.shape
        qkv = self.qkv(windows).reshape(num_windows_total, area, 3, self.num_heads, channels // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias().unsqueeze(0)
        if mask is not None:  # mask: [windows per image, area, area], windows of one image are consecutive
            per_image = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask[None, :, None]).reshape(-1, self.num_heads, area, area)
            bias = bias.repeat(num_windows_total // per_image, 1, 1, 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype), scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(num_windows_total, area, channels))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and MLP, pre-norm, with drop-path."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float,
                 drop_path: float):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        window, shift = self.window_size, self.shift_size
        shifted = F.pad(self.norm1(x), (0, 0, 0, -width % window, 0, -height % window))
        padded_h, padded_w = shifted.shape[1:3]
        mask = None
        if shift > 0:
            shifted = torch.roll(shifted, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(padded_h, padded_w, window, shift, x.device)
        attended = self.attn(window_partition(shifted, window), mask)
        attended = window_reverse(attended, window, padded_h, padded_w)
        if shift > 0:
            attended = torch.roll(attended, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(attended[:, :height, :width])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Blocks alternating regular and shifted windows, then optional patch merging.
    Returns (input of the next stage, this stage's output)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: list[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = run_block(block, x)
        return (x if self.downsample is None else self.downsample(x)), x


class SwinTransformer(nn.Module):
    """Swin backbone: res2..res5 (strides 4..32), each through its own LayerNorm, returned NCHW."""

    def __init__(self, embed_dim: int, depths: list[int], num_heads: list[int], window_size: int = 7,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.2, patch_size: int = 4, in_chans: int = 3):
        super().__init__()
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads {num_heads} must have one entry per stage of depths {depths}")
        num_levels = len(depths)
        self.out_channels = [embed_dim * 2**i for i in range(num_levels)]
        self.out_strides = [patch_size * 2**i for i in range(num_levels)]
        self.feature_info = [
            {"num_chs": c, "reduction": s, "module": f"norm{i}"}
            for i, (c, s) in enumerate(zip(self.out_channels, self.out_strides))
        ]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        rates = drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList(
            SwinStage(self.out_channels[i], depths[i], num_heads[i], window_size, mlp_ratio,
                      rates[i], downsample=i < num_levels - 1)
            for i in range(num_levels)
        )
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.apply(init_transformer_weights)

    def repeated_blocks(self) -> list[nn.Module]:
        return [block for stage in self.layers for block in stage.blocks]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        x = self.patch_embed(images)
        features = []
        for i, stage in enumerate(self.layers):
            x, stage_out = stage(x)
            features.append(getattr(self, f"norm{i}")(stage_out).permute(0, 3, 1, 2).contiguous())
        return features


def swin_large(window_size: int = 12, drop_path_rate: float = 0.3, **kwargs) -> SwinTransformer:
    """Swin-L (192/384/768/1536, depths 2,2,18,2, heads 6,12,24,48), window 12 as in OneFormer."""
    return SwinTransformer(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                           window_size=window_size, drop_path_rate=drop_path_rate, **kwargs)
