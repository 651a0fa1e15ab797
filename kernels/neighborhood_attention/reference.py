"""Plain-PyTorch 2D neighborhood attention with relative positional bias: the one reference shared by the
tests, the benchmark and the CPU path.

Semantics are NATTEN's as of v0.14 (the version DiNAT's released weights were trained with), from
`natten/src/cuda/natten_commons.cuh` (`get_window_start`, `get_pb_start`) of SHI-Labs/NATTEN:

    get_window_start(i, L, k, ns=k//2, d):
        d == 1: max(i - ns, 0) + (i + ns >= L) * (L - i - ns - 1)
        i - ns*d < 0:  i % d
        i + ns*d >= L: a = (L // d) * d; b = L - a
                       (L - b + i%d - 2*ns*d) if i%d < b else (a + i%d - k*d)
        else:          i - ns*d
    get_pb_start(i, L, k, ns, d):
        d == 1: ns + (i < ns) * (ns - i) + (i + ns >= L) * (L - i - 1 - ns)
        i - ns*d < 0:  k - 1 - i // d
        i + ns*d >= L: (L - i - 1) // d
        else:          ns
    key j of query i sits at window_start + j*d and gets bias rpb[pb_start + j].

Both rules reduce to one picture, which is what this file implements: the positions congruent to i modulo d
form i's dilation group; within the group (coordinates i' = i // d, group length L_g) the window is the k
consecutive members starting at clamp(i' - ns, 0, L_g - k) - shifted inward at the borders, never padded -
and the bias index is the true relative offset in group units, (key' - i') + k - 1, so a border query sees
bias entries beyond the usual centred ones. (The equivalence is checked line by line in the tests.)
"""

from __future__ import annotations

import torch


def check_neighborhood_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int, rpb
) -> None:
    """Raise ValueError, naming the argument, for inputs NATTEN's semantics do not cover."""
    if query.dim() != 5:
        raise ValueError(f"query must be [B, heads, H, W, d], got shape {tuple(query.shape)}")
    if key.shape != query.shape or value.shape[:-1] != query.shape[:-1]:
        raise ValueError(
            f"key {tuple(key.shape)} must equal query {tuple(query.shape)} and value {tuple(value.shape)} "
            "must match them except in the last dimension"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    height, width = query.shape[2:4]
    if height < kernel_size * dilation or width < kernel_size * dilation:
        raise ValueError(
            f"feature map {height}x{width} is smaller than kernel_size*dilation = {kernel_size * dilation}; "
            "pad the map first (DiNAT pads the normalised input before the qkv projection)"
        )
    heads = query.shape[1]
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(
            f"rpb must be [heads, 2k-1, 2k-1] = {(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)}, "
            f"got {tuple(rpb.shape)}"
        )


def neighborhood_indices_1d(length: int, kernel_size: int, dilation: int, device=None):
    """Per position along one axis: the k key positions [L, k] and their bias indices [L, k] (0..2k-2)."""
    positions = torch.arange(length, device=device)
    group = positions % dilation
    in_group = positions // dilation
    group_length = (length - group + dilation - 1) // dilation
    window_start = torch.minimum((in_group - kernel_size // 2).clamp(min=0), group_length - kernel_size)
    member = window_start[:, None] + torch.arange(kernel_size, device=device)[None, :]
    key_positions = group[:, None] + member * dilation
    bias_index = member - in_group[:, None] + kernel_size - 1
    return key_positions, bias_index


def neighborhood_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    query_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """softmax(scale * q.k + rpb) @ v over each query's k x k dilated neighbourhood.

    query, key: [B, heads, H, W, d]; value: [B, heads, H, W, dv]; rpb: [heads, 2k-1, 2k-1] or None;
    scale defaults to d ** -0.5. Returns [B, heads, H, W, dv], or only the query rows [start, stop) of
    `query_rows` ([B, heads, stop - start, W, dv]). Gathers the neighbourhood keys and values
    ([B, heads, rows, W, k*k, d] each), so memory is k*k times the inputs: fine as a reference and on the CPU.
    """
    check_neighborhood_inputs(query, key, value, kernel_size, dilation, rpb)
    batch, heads, height, width, head_dim = query.shape
    scale = head_dim**-0.5 if scale is None else scale
    start, stop = query_rows if query_rows is not None else (0, height)
    rows, row_bias = (t[start:stop] for t in neighborhood_indices_1d(height, kernel_size, dilation, query.device))
    query = query[:, :, start:stop]
    height = stop - start
    cols, col_bias = neighborhood_indices_1d(width, kernel_size, dilation, query.device)
    # flat key index of neighbour (a, b) of query (y, x): rows[y, a] * W + cols[x, b]
    flat_index = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(height * width, -1)

    keys = key.flatten(2, 3)[:, :, flat_index]  # [B, heads, HW, k*k, d]
    values = value.flatten(2, 3)[:, :, flat_index]
    logits = torch.einsum("bnqd,bnqkd->bnqk", query.flatten(2, 3) * scale, keys)
    if rpb is not None:
        two_k = 2 * kernel_size - 1
        bias_flat = (row_bias[:, None, :, None] * two_k + col_bias[None, :, None, :]).reshape(height * width, -1)
        logits = logits + rpb.flatten(1)[:, bias_flat].unsqueeze(0)
    weights = logits.softmax(dim=-1)
    out = torch.einsum("bnqk,bnqkd->bnqd", weights, values)
    return out.reshape(batch, heads, height, width, value.shape[-1])
