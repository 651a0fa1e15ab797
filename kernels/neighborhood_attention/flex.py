"""Neighborhood attention through torch FlexAttention: the dilated, border-clamped window is a mask_mod,
the relative positional bias a score_mod, and the block mask lets the fused kernel skip empty tiles.

Tokens are reordered group-major first (all positions of dilation group (y % d, x % d) contiguous, row-major
inside the group), so a dilated neighbourhood becomes a dense band of the sequence and the block mask is as
sparse as a non-dilated one. Semantics are exactly `reference.py`'s (NATTEN v0.14); see that file.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from kernels.neighborhood_attention.reference import check_neighborhood_inputs


def group_major_order(height: int, width: int, dilation: int, device) -> torch.Tensor:
    """Flat positions (y * W + x) sorted by dilation group, then row-major within the group."""
    ys = torch.arange(height, device=device)[:, None].expand(height, width)
    xs = torch.arange(width, device=device)[None, :].expand(height, width)
    sort_key = (((ys % dilation) * dilation + xs % dilation) * height + ys // dilation) * width + xs // dilation
    return sort_key.flatten().argsort()


class NeighborhoodLayout:
    """Per-token lookup tables, in the reordered sequence, that the mask_mod and score_mod read."""

    def __init__(self, height: int, width: int, kernel_size: int, dilation: int, device):
        self.order = group_major_order(height, width, dilation, device)
        self.inverse_order = self.order.argsort()
        ys, xs = self.order // width, self.order % width
        self.group_row = ys // dilation
        self.group_col = xs // dilation
        self.group_id = (ys % dilation) * dilation + xs % dilation
        self.row_start = self._window_start(ys, height, kernel_size, dilation)
        self.col_start = self._window_start(xs, width, kernel_size, dilation)
        self.kernel_size = kernel_size

    @staticmethod
    def _window_start(position: torch.Tensor, length: int, kernel_size: int, dilation: int) -> torch.Tensor:
        group_length = (length - position % dilation + dilation - 1) // dilation
        start = (position // dilation - kernel_size // 2).clamp(min=0)
        return torch.minimum(start, group_length - kernel_size)

    def window_mask_mod(self):
        k = self.kernel_size

        # a plain function, not a bound method: create_block_mask insists on one
        def mask_mod(batch, head, q_idx, kv_idx):
            row_offset = self.group_row[kv_idx] - self.row_start[q_idx]
            col_offset = self.group_col[kv_idx] - self.col_start[q_idx]
            same_group = self.group_id[q_idx] == self.group_id[kv_idx]
            return same_group & (row_offset >= 0) & (row_offset < k) & (col_offset >= 0) & (col_offset < k)

        return mask_mod

    def bias_score_mod(self, rpb: torch.Tensor):
        k = self.kernel_size

        def score_mod(score, batch, head, q_idx, kv_idx):
            # clamped so masked-out pairs index inside the table; their scores are discarded anyway
            row = (self.group_row[kv_idx] - self.group_row[q_idx] + k - 1).clamp(0, 2 * k - 2)
            col = (self.group_col[kv_idx] - self.group_col[q_idx] + k - 1).clamp(0, 2 * k - 2)
            return score + rpb[head, row, col]

        return score_mod


@functools.lru_cache(maxsize=64)
def _layout_and_block_mask(height: int, width: int, kernel_size: int, dilation: int, device: torch.device):
    layout = NeighborhoodLayout(height, width, kernel_size, dilation, device)
    length = height * width
    block_mask = create_block_mask(layout.window_mask_mod(), None, None, length, length, device=device)
    return layout, block_mask


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def neighborhood_attention_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `neighborhood_attention_reference`. Compiled on CUDA; eager (unfused) on the CPU."""
    check_neighborhood_inputs(query, key, value, kernel_size, dilation, rpb)
    batch, heads, height, width, _ = query.shape
    layout, block_mask = _layout_and_block_mask(height, width, kernel_size, dilation, query.device)

    def to_sequence(tensor):
        return tensor.flatten(2, 3)[:, :, layout.order]

    score_mod = layout.bias_score_mod(rpb) if rpb is not None else None
    attend = _compiled_flex_attention() if query.is_cuda else flex_attention
    out = attend(
        to_sequence(query), to_sequence(key), to_sequence(value),
        score_mod=score_mod, block_mask=block_mask, scale=scale,
    )
    out = out[:, :, layout.inverse_order]
    return out.reshape(batch, heads, height, width, value.shape[-1])
