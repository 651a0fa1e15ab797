"""Neighborhood attention through torch FlexAttention: the dilated, border-clamped window is a mask_mod,
the relative positional bias a score_mod, and a block mask lets the fused kernel skip empty tiles.

Tokens are reordered group-major first (all positions of dilation group (y % d, x % d) contiguous, row-major
inside the group), so a dilated neighbourhood becomes a dense band of the sequence and the block mask is as
sparse as a non-dilated one. Semantics are exactly `reference.py`'s (NATTEN v0.14); see that file.

Any image size, a bounded number of compilations: the sequence is padded to a bucketed length (a whole
number of 128-token tiles from {1, 2, 3, 4, 6, 8, 12, ...}), and the per-token layout tables and the block
mask are tensor *arguments* of one compiled function rather than closures made per size. So the compiled
kernel depends only on the bucket, batch, heads, head dim, dtype, kernel size and whether there is a bias, not
on the image size or the dilation: training at a fixed crop compiles once per stage, evaluation at arbitrary
sizes at most twice more per doubling of the sequence length. Padded tokens belong to no dilation group: they
attend to nothing and nothing attends to them, and the block mask never visits their tiles, so padding costs
memory for the reordered copies only. (Dynamic shapes would avoid even that, but inductor's CPU FlexAttention
template fails to compile with a symbolic sequence length, and the CPU is where the tests run.)
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kernels.neighborhood_attention.reference import check_neighborhood_inputs

BLOCK_SIZE = 128  # FlexAttention's default tile along both sequence dims
# Distinct compiled variants we allow (buckets x stages x dtypes x bias or not), above Dynamo's default of 8.
MAX_COMPILED_VARIANTS = 64
PADDING_GROUP = -1


def bucketed_length(length: int) -> int:
    """length rounded up to a whole number of tiles from {1, 2, 3, 4, 6, 8, 12, 16, ...}: powers of two and
    1.5 times them, so at most two buckets per doubling and at most a third of a bucket is padding."""
    tiles = -(-length // BLOCK_SIZE)
    power = 1 << (tiles - 1).bit_length()  # smallest power of two >= tiles
    return (3 * power // 4 if 2 < tiles <= 3 * power // 4 else power) * BLOCK_SIZE


def group_major_order(height: int, width: int, dilation: int, device) -> torch.Tensor:
    """Flat positions (y * W + x) sorted by dilation group, then row-major within the group."""
    ys = torch.arange(height, device=device)[:, None].expand(height, width)
    xs = torch.arange(width, device=device)[None, :].expand(height, width)
    sort_key = (((ys % dilation) * dilation + xs % dilation) * height + ys // dilation) * width + xs // dilation
    return sort_key.flatten().argsort()


class NeighborhoodLayout:
    """Per-token lookup tables in the reordered, padded sequence, and the block mask they imply.

    `tables` [5, padded length] holds, per token: row and column inside its dilation group, the group id
    (PADDING_GROUP for padding), and the first row and column of its window in group coordinates."""

    def __init__(self, height: int, width: int, kernel_size: int, dilation: int, device):
        self.length = height * width
        self.padded_length = bucketed_length(self.length)
        self.order = group_major_order(height, width, dilation, device)
        self.inverse_order = self.order.argsort()
        ys, xs = self.order // width, self.order % width
        group_id = (ys % dilation) * dilation + xs % dilation
        row_start = self._window_start(ys, height, kernel_size, dilation)
        col_start = self._window_start(xs, width, kernel_size, dilation)
        tables = torch.stack([ys // dilation, xs // dilation, group_id, row_start, col_start])
        padding = torch.zeros(5, self.padded_length - self.length, dtype=tables.dtype, device=device)
        padding[2] = PADDING_GROUP
        self.tables = torch.cat([tables, padding], dim=1)
        # Gather index of the padded sequence: padding slots read token 0, which the mask hides.
        self.gather_index = torch.cat([self.order, self.order.new_zeros(self.padded_length - self.length)])
        self.kv_num_blocks, self.kv_indices = self._kv_blocks(height, width, kernel_size, dilation, group_id,
                                                              row_start, col_start)  # fmt: skip

    @staticmethod
    def _window_start(position: torch.Tensor, length: int, kernel_size: int, dilation: int) -> torch.Tensor:
        group_length = (length - position % dilation + dilation - 1) // dilation
        start = (position // dilation - kernel_size // 2).clamp(min=0)
        return torch.minimum(start, group_length - kernel_size)

    def _kv_blocks(self, height, width, kernel_size, dilation, group_id, row_start, col_start):
        """Key tiles each query tile must visit, from the windows: the k rows of a window are k runs of k
        consecutive tokens of the reordered sequence, each touching at most two tiles (k <= BLOCK_SIZE)."""
        device = group_id.device
        group_x = group_id % dilation
        group_width = (width - group_x + dilation - 1) // dilation
        group_sizes = torch.bincount(group_id, minlength=dilation * dilation)
        group_offset = (torch.cumsum(group_sizes, 0) - group_sizes)[group_id]
        window_rows = row_start[:, None] + torch.arange(kernel_size, device=device)[None, :]
        run_start = group_offset[:, None] + window_rows * group_width[:, None] + col_start[:, None]
        query_tile = (torch.arange(self.length, device=device) // BLOCK_SIZE)[:, None].expand_as(run_start)
        num_tiles = self.padded_length // BLOCK_SIZE
        visited = torch.zeros(num_tiles, num_tiles, dtype=torch.bool, device=device)
        for run_end in (run_start, run_start + kernel_size - 1):
            visited[query_tile.flatten(), (run_end // BLOCK_SIZE).flatten()] = True
        kv_num_blocks = visited.sum(dim=1, dtype=torch.int32)
        kv_indices = torch.argsort(visited.to(torch.int8), dim=1, descending=True, stable=True).to(torch.int32)
        return kv_num_blocks[None, None], kv_indices[None, None]


def _window_mask_mod(tables: torch.Tensor, kernel_size: int):
    group_row, group_col, group_id, row_start, col_start = tables.unbind(0)

    def mask_mod(batch, head, q_idx, kv_idx):
        row_offset = group_row[kv_idx] - row_start[q_idx]
        col_offset = group_col[kv_idx] - col_start[q_idx]
        same_group = (group_id[q_idx] == group_id[kv_idx]) & (group_id[q_idx] != PADDING_GROUP)
        inside = (row_offset >= 0) & (row_offset < kernel_size) & (col_offset >= 0) & (col_offset < kernel_size)
        return same_group & inside

    return mask_mod


def _bias_score_mod(tables: torch.Tensor, kernel_size: int, rpb: torch.Tensor):
    group_row, group_col = tables[0], tables[1]

    def score_mod(score, batch, head, q_idx, kv_idx):
        # clamped so masked-out pairs index inside the table; their scores are discarded anyway
        row = (group_row[kv_idx] - group_row[q_idx] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
        col = (group_col[kv_idx] - group_col[q_idx] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
        return score + rpb[head, row, col]

    return score_mod


def _attend(query, key, value, tables, kernel_size, kv_num_blocks, kv_indices, rpb, scale):
    """FlexAttention over padded sequences; everything that depends on the image size is a tensor here."""
    length = query.shape[-2]
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, BLOCK_SIZE=BLOCK_SIZE, mask_mod=_window_mask_mod(tables, kernel_size),
        seq_lengths=(length, length),
    )  # fmt: skip
    score_mod = None if rpb is None else _bias_score_mod(tables, kernel_size, rpb)
    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)


@functools.lru_cache(maxsize=64)
def _layout(height: int, width: int, kernel_size: int, dilation: int, device: torch.device) -> NeighborhoodLayout:
    return NeighborhoodLayout(height, width, kernel_size, dilation, device)


@functools.lru_cache(maxsize=1)
def compiled_attend():
    """The one compiled function every size, kernel size and dilation goes through."""
    return torch.compile(_attend, dynamic=False)


def neighborhood_attention_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `neighborhood_attention_reference`, as one fused (compiled) FlexAttention kernel."""
    check_neighborhood_inputs(query, key, value, kernel_size, dilation, rpb)
    batch, heads, height, width, _ = query.shape
    layout = _layout(height, width, kernel_size, dilation, query.device)
    scale = query.shape[-1] ** -0.5 if scale is None else scale

    def to_sequence(tensor):
        return tensor.flatten(2, 3)[:, :, layout.gather_index]

    with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_VARIANTS):
        out = compiled_attend()(
            to_sequence(query), to_sequence(key), to_sequence(value), layout.tables, kernel_size,
            layout.kv_num_blocks, layout.kv_indices, rpb, scale,
        )  # fmt: skip
    out = out[:, :, : layout.length][:, :, layout.inverse_order]
    return out.reshape(batch, heads, height, width, value.shape[-1])
