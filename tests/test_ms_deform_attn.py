"""Multi-scale deformable attention: the Triton kernels (through the interpreter on CPU) against the float64
reference, gradchecks of both backends, backend selection and input validation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from kernels import BackendUnavailableError, choose_backend, ms_deform_attn
from kernels.ms_deform_attn.reference import ms_deform_attn_reference

REPO_ROOT = Path(__file__).resolve().parents[1]
# Inputs are made on the host (seeded) and moved here: the GPU on a CUDA machine, else the interpreter on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (levels as (h, w), batch, queries, heads, head_dim, points)
CASES = {
    "four_odd_levels_d20": ([(3, 5), (2, 3), (1, 2), (1, 1)], 2, 5, 2, 20, 3),
    "one_level_d8": ([(4, 3)], 1, 6, 3, 8, 1),
    "three_levels_d32": ([(5, 4), (3, 2), (2, 1)], 2, 4, 2, 32, 4),
}
# Relative L2 error allowed against float64 evaluated on the same (already rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def level_layout(levels: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = spatial_shapes.prod(dim=1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def random_inputs(levels, batch, queries, heads, head_dim, points, dtype, generator):
    """Fresh inputs; a fifth of the locations fall outside [0, 1] so zero padding is exercised."""
    num_values = sum(h * w for h, w in levels)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator, dtype=torch.float64)
    locations = torch.rand(
        batch, queries, heads, len(levels), points, 2, generator=generator, dtype=torch.float64
    )
    locations = locations * 1.5 - 0.25
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=generator, dtype=torch.float64)
    return [t.to(dtype) for t in (value, locations, weights)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual.double() - expected).norm() / expected.norm()).item()


def output_and_grads(backend, inputs, spatial_shapes, level_start_index, grad_output):
    leaves = [t.detach().to(DEVICE).clone().requires_grad_() for t in inputs]
    value, locations, weights = leaves
    output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=backend)
    output.backward(grad_output.to(DEVICE, output.dtype))
    return output, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_float64_reference(case, dtype):
    levels, *dims = CASES[case]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case}-{dtype}".encode()))
    spatial_shapes, level_start_index = level_layout(levels)
    inputs = random_inputs(levels, *dims, dtype=dtype, generator=generator)
    inputs64 = [t.double() for t in inputs]
    grad_output = torch.randn(dims[0], dims[1], dims[2] * dims[3], generator=generator, dtype=torch.float64)

    expected, expected_grads = output_and_grads(
        "reference", inputs64, spatial_shapes, level_start_index, grad_output
    )
    actual, actual_grads = output_and_grads("triton", inputs, spatial_shapes, level_start_index, grad_output)

    assert actual.dtype == dtype and actual.shape == expected.shape
    assert relative_error(actual, expected) < TOLERANCE[dtype]
    for name, grad, expected_grad, source in zip(
        ("value", "sampling_locations", "attention_weights"), actual_grads, expected_grads, inputs
    ):
        assert grad.dtype == source.dtype, name
        assert relative_error(grad, expected_grad) < TOLERANCE[dtype], name


def test_mixed_input_dtypes_keep_each_gradient_dtype():
    levels = [(3, 5), (2, 2)]
    generator = torch.Generator().manual_seed(7)
    spatial_shapes, level_start_index = level_layout(levels)
    value, locations, weights = random_inputs(
        levels, 1, 3, 2, 12, 2, dtype=torch.float64, generator=generator
    )
    inputs = [value.bfloat16(), locations.float(), weights.float()]
    grad_output = torch.randn(1, 3, 24, generator=generator, dtype=torch.float64)

    expected, expected_grads = output_and_grads(
        "reference", [t.double() for t in inputs], spatial_shapes, level_start_index, grad_output
    )
    actual, actual_grads = output_and_grads("triton", inputs, spatial_shapes, level_start_index, grad_output)

    assert actual.dtype == torch.bfloat16
    assert [g.dtype for g in actual_grads] == [torch.bfloat16, torch.float32, torch.float32]
    assert relative_error(actual, expected) < 1e-2
    for grad, expected_grad in zip(actual_grads, expected_grads):
        assert relative_error(grad, expected_grad) < 1e-2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_points_far_outside_the_map_contribute_nothing(backend):
    levels = [(3, 5), (2, 2)]
    generator = torch.Generator().manual_seed(3)
    spatial_shapes, level_start_index = level_layout(levels)
    value, locations, weights = random_inputs(levels, 1, 4, 2, 8, 2, dtype=torch.float32, generator=generator)
    far = torch.tensor([[-3.0, 0.5], [0.5, 40.0], [1e6, -1e6], [-1.01, 2.01]])
    locations = far.view(1, 4, 1, 1, 1, 2).expand_as(locations).contiguous()
    output, (grad_value, grad_locations, grad_weights) = output_and_grads(
        backend, [value, locations, weights], spatial_shapes, level_start_index, torch.ones(1, 4, 16)
    )
    assert torch.equal(output, torch.zeros_like(output))
    for grad in (grad_value, grad_locations, grad_weights):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_reference_in_bf16_with_one_image_stays_finite():
    # With B = 1 the per-level reshape is a strided view, on which CPU grid_sample in bf16 went non-finite.
    levels = [(20, 20), (10, 10)]
    generator = torch.Generator().manual_seed(5)
    spatial_shapes, level_start_index = level_layout(levels)
    inputs = random_inputs(levels, 1, 64, 8, 32, 4, dtype=torch.bfloat16, generator=generator)
    output = ms_deform_attn_reference(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    expected = ms_deform_attn_reference(inputs[0].double(), spatial_shapes, level_start_index,
                                        inputs[1].double(), inputs[2].double())  # fmt: skip
    # The reference computes in bf16 end to end, so its error is several times the Triton kernel's.
    assert relative_error(output, expected) < 5e-2


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradcheck_float64(backend):
    levels = [(2, 3), (1, 2)]
    generator = torch.Generator().manual_seed(11)
    spatial_shapes, level_start_index = level_layout(levels)
    value, locations, weights = random_inputs(levels, 1, 2, 1, 3, 2, dtype=torch.float64, generator=generator)
    leaves = [t.to(DEVICE).requires_grad_() for t in (value, locations, weights)]

    def op(value, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=backend)

    assert torch.autograd.gradcheck(op, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_default_backend_on_cpu_is_the_reference():
    assert choose_backend("ms_deform_attn", torch.device("cpu"), None) == "reference"
    levels = [(3, 5)]
    spatial_shapes, level_start_index = level_layout(levels)
    value, locations, weights = random_inputs(
        levels, 1, 3, 2, 4, 2, torch.float32, torch.Generator().manual_seed(0)
    )
    default = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    reference = ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)
    assert torch.equal(default, reference)


def test_explicit_triton_on_cpu_without_interpreter_raises():
    # Triton reads TRITON_INTERPRET when kernels are defined, so the check needs a fresh interpreter.
    script = textwrap.dedent(
        """
        import torch
        from kernels import BackendUnavailableError, ms_deform_attn
        value = torch.randn(1, 2, 1, 4)
        shapes, starts = torch.tensor([[1, 2]]), torch.tensor([0])
        loc, attn = torch.rand(1, 3, 1, 1, 2, 2), torch.rand(1, 3, 1, 1, 2)
        try:
            ms_deform_attn(value, shapes, starts, loc, attn, backend="triton")
        except BackendUnavailableError as err:
            print("raised:", err)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "raised:" in result.stdout and "TRITON_INTERPRET" in result.stdout


def test_unknown_backend_name_is_rejected():
    value = torch.randn(1, 2, 1, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(value, torch.tensor([[1, 2]]), torch.tensor([0]), torch.rand(1, 1, 1, 1, 1, 2),
                       torch.rand(1, 1, 1, 1, 1), backend="cuda")  # fmt: skip
    assert issubclass(BackendUnavailableError, RuntimeError)


def _valid_small_inputs() -> dict[str, torch.Tensor]:
    spatial_shapes, level_start_index = level_layout([(2, 3), (1, 2)])
    return {
        "value": torch.randn(1, 8, 2, 4),
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": torch.rand(1, 3, 2, 2, 2, 2),
        "attention_weights": torch.rand(1, 3, 2, 2, 2),
    }


BAD_INPUTS = {
    "value_3d": ("value", lambda t: t[0], "value must be"),
    "value_int": ("value", lambda t: t.long(), "value dtype"),
    "value_not_contiguous": ("value", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), "contiguous"),
    "locations_wrong_heads": (
        "sampling_locations",
        lambda t: t[:, :, :1].contiguous(),
        "sampling_locations must",
    ),
    "locations_missing_xy": (
        "sampling_locations",
        lambda t: t[..., 0].contiguous(),
        "sampling_locations must",
    ),
    "weights_wrong_points": (
        "attention_weights",
        lambda t: t[..., :1].contiguous(),
        "attention_weights must",
    ),
    "shapes_float": ("spatial_shapes", lambda t: t.float(), "spatial_shapes must be int"),
    "shapes_wrong_total": ("spatial_shapes", lambda t: t + 1, "cover"),
    "starts_wrong": ("level_start_index", lambda t: t + 1, "level_start_index must be"),
    "starts_wrong_length": ("level_start_index", lambda t: t[:1], r"level_start_index must be \[L=2\]"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_triton_backend_rejects_bad_inputs(bad):
    name, corrupt, message = BAD_INPUTS[bad]
    inputs = _valid_small_inputs()
    inputs[name] = corrupt(inputs[name])
    # spatial_shapes and level_start_index stay on the host: the value-dependent checks run only there
    inputs = {key: t if key in ("spatial_shapes", "level_start_index") else t.to(DEVICE) for key, t in inputs.items()}
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(**inputs, backend="triton")


def test_benchmark_compulsory_bytes_follow_kernels_md():
    from kernels.benchmarks.bench_ms_deform_attn import compulsory_bytes

    # docs/kernels.md, all fp32 at L=3: B * (1024 * Lv + 2176 * Lq).
    assert compulsory_bytes(2, 8400, 8400, 3, torch.float32, backward=False) == 2 * (
        1024 * 8400 + 2176 * 8400
    )
    # bf16 halves every term; the backward adds one more read of each input and grad_out plus three grads.
    assert compulsory_bytes(2, 8400, 8400, 3, torch.bfloat16, backward=False) == 2 * 8400 * 1600
    assert compulsory_bytes(1, 10, 20, 3, torch.float32, backward=True) == (
        20 * 256 * 4 * 3 + 10 * 3 * (64 * 4 * 3) + 10 * 3 * (32 * 4 * 3) + 10 * 256 * 4 * 2
    )


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal to benchmark on a machine without CUDA"
)
def test_benchmark_cli_refuses_to_time_the_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "kernels.benchmarks", "--ops", "ms_deform_attn", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
