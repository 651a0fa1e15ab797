"""Neighborhood attention: the reference against brute-force attention whose [HW, HW] mask and bias come
straight from NATTEN v0.14's scalar rules (get_window_start / get_pb_start), forward and every gradient;
the FlexAttention path against the reference; gradcheck; errors."""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch._dynamo.utils import counters

from kernels._backend import BackendUnavailableError
from kernels.neighborhood_attention import neighborhood_attention, neighborhood_attention_reference
from kernels.neighborhood_attention.flex import bucketed_length


def natten_window_start(index, length, kernel_size, dilation):
    half = kernel_size // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * half * dilation
        return a + imodd - kernel_size * dilation
    return index - half * dilation


def natten_pb_start(index, length, kernel_size, dilation):
    half = kernel_size // 2
    if dilation <= 1:
        return half + (index < half) * (half - index) + (index + half >= length) * (length - index - 1 - half)
    if index - half * dilation < 0:
        return kernel_size - 1 - index // dilation
    if index + half * dilation >= length:
        return (length - index - 1) // dilation
    return half


def brute_force_bias_and_mask(height, width, kernel_size, dilation, rpb):
    """[heads, HW, HW] additive logits: the rpb entry for each neighbour, -inf elsewhere."""
    queries, keys, bias_rows, bias_cols = [], [], [], []
    for y in range(height):
        row_start = natten_window_start(y, height, kernel_size, dilation)
        row_pb = natten_pb_start(y, height, kernel_size, dilation)
        for x in range(width):
            col_start = natten_window_start(x, width, kernel_size, dilation)
            col_pb = natten_pb_start(x, width, kernel_size, dilation)
            for a in range(kernel_size):
                for b in range(kernel_size):
                    queries.append(y * width + x)
                    keys.append((row_start + a * dilation) * width + col_start + b * dilation)
                    bias_rows.append(row_pb + a)
                    bias_cols.append(col_pb + b)
    assert len(set(zip(queries, keys))) == len(queries), "a neighbourhood repeats a key"
    bias = torch.full((height * width, height * width, rpb.shape[0]), float("-inf"), dtype=rpb.dtype)
    values = rpb[:, torch.tensor(bias_rows), torch.tensor(bias_cols)].T
    return bias.index_put((torch.tensor(queries), torch.tensor(keys)), values).permute(2, 0, 1)


def brute_force_attention(query, key, value, kernel_size, dilation, rpb, scale):
    batch, heads, height, width, _ = query.shape
    bias = brute_force_bias_and_mask(height, width, kernel_size, dilation, rpb)
    logits = torch.einsum("bnqd,bnkd->bnqk", query.flatten(2, 3) * scale, key.flatten(2, 3)) + bias
    out = logits.softmax(-1) @ value.flatten(2, 3)
    return out.reshape(batch, heads, height, width, -1)


def random_inputs(height, width, kernel_size, heads=2, head_dim=4, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(2, heads, height, width, head_dim, generator=generator, dtype=dtype) for _ in range(3)]
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (*tensors, rpb)]


SHAPES = [  # (kernel, dilation, extra rows, extra cols): odd, non-square, and exactly kernel*dilation
    (3, 1, 4, 1), (3, 2, 0, 3), (3, 3, 2, 0), (5, 1, 0, 0), (5, 2, 3, 1), (5, 3, 1, 2), (7, 1, 2, 5), (7, 2, 1, 0),
    (7, 3, 0, 2),
]


@pytest.mark.parametrize("kernel_size,dilation,extra_h,extra_w", SHAPES)
def test_reference_matches_brute_force_forward_and_backward(kernel_size, dilation, extra_h, extra_w):
    height, width = kernel_size * dilation + extra_h, kernel_size * dilation + extra_w
    query, key, value, rpb = random_inputs(height, width, kernel_size)
    scale = 0.37
    expected = brute_force_attention(query, key, value, kernel_size, dilation, rpb, scale)
    actual = neighborhood_attention_reference(query, key, value, kernel_size, dilation, rpb, scale)
    torch.testing.assert_close(actual, expected)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (query, key, value, rpb), upstream)
    actual_grads = torch.autograd.grad(actual, (query, key, value, rpb), upstream)
    for name, got, want in zip(("query", "key", "value", "rpb"), actual_grads, expected_grads):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_training_on_the_cpu_keeps_only_the_inputs_and_gives_the_reference_gradients(monkeypatch):
    """The CPU training path works in bands of query rows recomputed in the backward instead of keeping the
    k*k gathers: same values, same gradients, nothing of size k*k per query saved for the backward."""
    import kernels.neighborhood_attention as na

    query, key, value, rpb = random_inputs(14, 13, 5)
    per_row = query.shape[0] * query.shape[1] * 13 * 25 * 2 * query.shape[-1]
    monkeypatch.setattr(na, "TRAINING_BAND_ELEMENTS", 4 * per_row)  # bands of 4 rows: 4 bands
    upstream = torch.randn(query.shape)
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = neighborhood_attention(query, key, value, 5, 1, rpb, backend="reference")
    expected = neighborhood_attention_reference(query, key, value, 5, 1, rpb)
    torch.testing.assert_close(output, expected)
    assert max(saved_sizes) <= query.numel()  # the gathered neighbourhoods would be 25x that
    got = torch.autograd.grad(output, (query, key, value, rpb), upstream)
    want = torch.autograd.grad(expected, (query, key, value, rpb), upstream)
    for name, g, w in zip(("query", "key", "value", "rpb"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_default_scale_and_no_bias():
    query, key, value, rpb = random_inputs(9, 8, 3)
    expected = brute_force_attention(query, key, value, 3, 2, torch.zeros_like(rpb), query.shape[-1] ** -0.5)
    torch.testing.assert_close(neighborhood_attention(query, key, value, 3, 2), expected)


def test_gradcheck_float64():
    query, key, value, rpb = random_inputs(6, 7, 3, heads=1, head_dim=2)
    torch.autograd.gradcheck(
        lambda q, k, v, b: neighborhood_attention_reference(q, k, v, 3, 2, b), (query, key, value, rpb)
    )


FLEX_SHAPES = [(3, 2, 1, 4), (5, 1, 0, 3), (5, 3, 2, 1)]


@pytest.mark.parametrize("kernel_size,dilation,extra_h,extra_w", FLEX_SHAPES)
def test_flex_forward_matches_reference(kernel_size, dilation, extra_h, extra_w):
    """The FlexAttention path, compiled (inductor's C++ template on the CPU, Triton on CUDA)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    height, width = kernel_size * dilation + extra_h, kernel_size * dilation + extra_w
    query, key, value, rpb = (t.detach().to(device) for t in
                              random_inputs(height, width, kernel_size, head_dim=16, dtype=torch.float32))
    expected = neighborhood_attention(query, key, value, kernel_size, dilation, rpb, backend="reference")
    actual = neighborhood_attention(query, key, value, kernel_size, dilation, rpb, backend="flex")
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# (height, width, dilation) of 20 images: odd, non-square, every dilation 1-3, sequence lengths 81..256, so
# two buckets (one and two tiles of 128 tokens).
VARIABLE_SIZES = [
    (9, 9, 1), (9, 10, 3), (10, 9, 2), (9, 13, 1), (11, 11, 3), (12, 10, 2), (10, 14, 1), (13, 12, 1),
    (9, 17, 3), (14, 11, 2), (12, 15, 1), (16, 11, 3), (13, 14, 2), (15, 13, 1), (11, 19, 2), (14, 16, 3),
    (17, 13, 1), (15, 16, 2), (16, 15, 3), (16, 16, 1),
]


@pytest.mark.slow  # compiles two FlexAttention kernels (inductor's C++ backend on CPU: ~30-40 s on two cores)
def test_compiled_flex_serves_every_image_size_with_one_kernel_per_bucket(monkeypatch):
    """Evaluation sees a new image size almost every image: the compiled kernel must be reused, never
    recompiled per size until Dynamo gives up and torch falls back to the unfused path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fallback_warnings = []
    monkeypatch.setattr(flex_module, "_warn_once", lambda warning_id, message: fallback_warnings.append(message))
    torch._dynamo.reset()
    compiled_before = counters["stats"]["unique_graphs"]
    buckets = {bucketed_length(height * width) for height, width, _ in VARIABLE_SIZES}
    assert len(buckets) == 2 and len({(h, w) for h, w, _ in VARIABLE_SIZES}) == len(VARIABLE_SIZES) >= 20
    for index, (height, width, dilation) in enumerate(VARIABLE_SIZES):
        query, key, value, rpb = (t.detach().float().to(device)
                                  for t in random_inputs(height, width, 3, head_dim=16, seed=index))
        expected = neighborhood_attention(query, key, value, 3, dilation, rpb, backend="reference")
        actual = neighborhood_attention(query, key, value, 3, dilation, rpb, backend="flex")
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m, size=(height, width): f"{size}: {m}")
    assert counters["stats"]["unique_graphs"] - compiled_before == len(buckets)
    assert fallback_warnings == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU tensors")
@pytest.mark.parametrize("kernel_size,dilation,extra_h,extra_w", FLEX_SHAPES)
def test_flex_gradients_match_reference(kernel_size, dilation, extra_h, extra_w):
    height, width = kernel_size * dilation + extra_h, kernel_size * dilation + extra_w
    inputs = [t.detach().cuda().requires_grad_() for t in
              random_inputs(height, width, kernel_size, head_dim=16, dtype=torch.float32)]
    expected = neighborhood_attention(*inputs[:3], kernel_size, dilation, inputs[3], backend="reference")
    actual = neighborhood_attention(*inputs[:3], kernel_size, dilation, inputs[3], backend="flex")
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    actual_grads = torch.autograd.grad(actual, inputs, upstream)
    for name, got, want in zip(("query", "key", "value", "rpb"), actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_flex_on_cpu_with_gradients_raises_instead_of_falling_back():
    query, key, value, rpb = (t.float() for t in random_inputs(9, 9, 3))
    with pytest.raises(BackendUnavailableError, match="no backward on CPU"):
        neighborhood_attention(query, key, value, 3, 1, rpb, backend="flex")


def test_bad_inputs_raise():
    query, key, value, rpb = random_inputs(8, 9, 3)
    with pytest.raises(ValueError, match="smaller than kernel_size\\*dilation = 9"):
        neighborhood_attention(query, key, value, 3, 3, rpb)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd"):
        neighborhood_attention(query, key, value, 4, 1)
    with pytest.raises(ValueError, match="rpb must be"):
        neighborhood_attention(query, key, value, 5, 1, rpb)
    with pytest.raises(ValueError, match="backend must be one of"):
        neighborhood_attention(query, key, value, 3, 1, rpb, backend="triton")
    meta = torch.empty(1, 1, 9, 9, 4, device="meta")
    with pytest.raises(BackendUnavailableError, match="'flex' requested"):
        neighborhood_attention(meta, meta, meta, 3, 1, backend="flex")
