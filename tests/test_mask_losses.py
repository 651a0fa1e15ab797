"""Point-sampled mask losses and matcher costs: Triton against the one reference, float64 gradcheck, the
importance-sampling choice, and the fused op against explicitly sampled float targets.

Without a GPU the Triton kernels run through the interpreter (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._backend import BackendUnavailableError
from kernels.mask_losses import (
    importance_sample_coords,
    matching_costs,
    pairwise_mask_costs,
    point_mask_losses,
    sample_points,
)
from kernels.mask_losses.triton_kernels import point_mask_losses_per_mask_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def random_case(
    seed,
    num_masks,
    height,
    width,
    target_height,
    target_width,
    num_points,
    num_targets=None,
    dtype=torch.float64,
):
    """Logits with a spread of magnitudes, blobby bool targets, a shuffled pairing, points incl. the edges."""
    gen = torch.Generator().manual_seed(seed)
    num_targets = num_targets or num_masks + 2
    logits = (torch.randn(num_masks, height, width, generator=gen, dtype=torch.float64) * 4).to(DEVICE, dtype)
    coarse = torch.randn(num_targets, 1, 4, 5, generator=gen)
    targets = F.interpolate(coarse, size=(target_height, target_width), mode="bilinear")[:, 0] > 0
    target_index = torch.randperm(num_targets, generator=gen)[:num_masks]
    coords = torch.rand(num_masks, num_points, 2, generator=gen, dtype=torch.float64)
    # The corners, and two points just outside the map (zero padding there, as grid_sample).
    edges = [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-0.05, 0.5], [0.3, 1.04]]
    coords[:, : len(edges)] = torch.tensor(edges, dtype=torch.float64)[: coords.shape[1]]
    return logits, targets.to(DEVICE), target_index.to(DEVICE), coords.to(DEVICE)


def losses_and_grad(logits, targets, target_index, coords, num_masks, backend):
    logits = logits.detach().requires_grad_(True)
    loss_bce, loss_dice = point_mask_losses(
        logits, targets, num_masks, point_coords=coords, target_index=target_index, backend=backend
    )
    # Different weights on the two terms so a swapped gradient cannot cancel out.
    (grad,) = torch.autograd.grad(0.7 * loss_bce + 1.9 * loss_dice, logits)
    return loss_bce, loss_dice, grad


# (num_masks, h, w, H, W, num_points): odd sizes, point counts off the 1024 block, a single mask.
AWKWARD_SHAPES = [(1, 5, 7, 19, 29, 37), (3, 9, 6, 33, 21, 1100), (4, 1, 1, 3, 2, 64)]


@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
def test_triton_matches_reference_in_float64(shape):
    logits, targets, target_index, coords = random_case(sum(shape), *shape)
    expected = losses_and_grad(logits, targets, target_index, coords, 2.5, "reference")
    actual = losses_and_grad(logits, targets, target_index, coords, 2.5, "triton")
    for name, got, want in zip(("bce", "dice", "grad"), actual, expected):
        assert relative_error(got, want) < 1e-12, name


@pytest.mark.parametrize(
    ("dtype", "loss_tol", "grad_tol"), [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 1e-2)]
)
def test_triton_low_precision_against_float64_reference(dtype, loss_tol, grad_tol):
    logits, targets, target_index, coords = random_case(7, 5, 11, 13, 45, 51, 1500, dtype=dtype)
    # The reference sees the same (already rounded) logits in float64: what is measured is the kernel's error.
    expected = losses_and_grad(logits.double(), targets, target_index, coords, 3.0, "reference")
    actual = losses_and_grad(logits, targets, target_index, coords.float(), 3.0, "triton")
    assert actual[0].dtype == torch.float32, "losses are upcast to float32"
    assert actual[2].dtype == dtype, "the gradient comes back in the logits' dtype"
    assert relative_error(actual[0], expected[0]) < loss_tol
    assert relative_error(actual[1], expected[1]) < loss_tol
    assert relative_error(actual[2], expected[2]) < grad_tol


def test_triton_gradcheck_float64():
    logits, targets, target_index, coords = random_case(3, 2, 2, 3, 7, 9, 20)
    logits.requires_grad_(True)

    def per_mask_losses(mask_logits):
        return point_mask_losses_per_mask_triton(mask_logits, targets, target_index, coords)

    # Perturbing a logit by eps never moves a point, so the finite differences are exact up to rounding.
    assert torch.autograd.gradcheck(per_mask_losses, (logits,), eps=1e-6, atol=1e-8)


def test_fused_target_sampling_equals_sampling_float_targets():
    _, targets, _, coords = random_case(11, 3, 4, 4, 37, 23, 300)
    map_index = torch.tensor([4, -1, 0], device=DEVICE)
    sampled = sample_points(
        targets, coords[:1].float(), map_index=map_index, rows_per_group=3, backend="triton"
    )
    explicit = targets[map_index.clamp(min=0)].float() * (map_index >= 0).float()[:, None, None]
    grid = (2 * coords[:1].float() - 1)[:, None]  # grid_sample's [-1, 1] frame, align_corners=False
    expected = F.grid_sample(explicit[None], grid, align_corners=False)[0, :, 0]
    assert torch.allclose(sampled, expected, atol=1e-6)
    assert sampled[1].abs().max() == 0, "index -1 samples an empty map"


def test_fused_loss_equals_hand_computed_loss_on_float_targets():
    logits, targets, target_index, coords = random_case(5, 3, 6, 8, 24, 32, 400)
    loss_bce, loss_dice = point_mask_losses(
        logits, targets, 2.0, point_coords=coords, target_index=target_index, backend="triton"
    )
    grid = (2 * coords - 1)[:, :, None]  # [M, P, 1, 2]
    x = F.grid_sample(logits[:, None], grid, align_corners=False)[:, 0, :, 0]
    t = F.grid_sample(targets[target_index][:, None].double(), grid, align_corners=False)[:, 0, :, 0]
    bce = (torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0) - x * t).mean(1)
    s = torch.sigmoid(x)
    dice = 1 - (2 * (s * t).sum(1) + 1) / (s.sum(1) + t.sum(1) + 1)
    assert torch.allclose(loss_bce, bce.sum() / 2.0, rtol=1e-10)
    assert torch.allclose(loss_dice, dice.sum() / 2.0, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_importance_sampling_keeps_the_most_uncertain_candidates(backend):
    logits = torch.randn(2, 9, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    num_points, oversample, ratio = 40, 3.0, 0.75
    coords = importance_sample_coords(
        logits,
        num_points,
        oversample,
        ratio,
        generator=torch.Generator(DEVICE).manual_seed(5),
        backend=backend,
    )
    # Replay the documented draws: candidates [M, 120, 2], then the 10 random points.
    replay = torch.Generator(DEVICE).manual_seed(5)
    candidates = torch.rand(2, 120, 2, generator=replay, device=DEVICE).double()
    rest = torch.rand(2, 10, 2, generator=replay, device=DEVICE).double()
    candidate_logits = F.grid_sample(logits[:, None], (2 * candidates - 1)[:, :, None], align_corners=False)
    order = candidate_logits[:, 0, :, 0].abs().argsort(dim=1)
    for mask in range(2):
        expected = candidates[mask, order[mask, :30]]
        chosen = coords[mask, :30]
        # Same set of points (topk does not promise an order).
        assert torch.equal(chosen[chosen[:, 0].argsort()], expected[expected[:, 0].argsort()])
    assert torch.equal(coords[:, 30:], rest)


def test_losses_with_generator_agree_across_backends():
    logits, targets, target_index, _ = random_case(9, 3, 7, 5, 21, 15, 10)
    results = []
    for backend in ("reference", "triton"):
        gen = torch.Generator(DEVICE).manual_seed(123)
        results.append(
            point_mask_losses(
                logits, targets, 3, num_points=200, oversample_ratio=3.0, importance_sample_ratio=0.75,
                generator=gen, target_index=target_index, backend=backend,
            )
        )
    for got, want in zip(*results):
        assert relative_error(got, want) < 1e-12


def test_pairwise_costs_equal_per_pair_losses():
    gen = torch.Generator().manual_seed(2)
    point_logits = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 3
    point_targets = torch.rand(3, 50, generator=gen, dtype=torch.float64).round()
    cost_bce, cost_dice = pairwise_mask_costs(point_logits, point_targets)
    for q in range(4):
        for j in range(3):
            x, t = point_logits[q], point_targets[j]
            bce = F.binary_cross_entropy_with_logits(x, t)
            s = x.sigmoid()
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            assert torch.allclose(cost_bce[q, j], bce) and torch.allclose(cost_dice[q, j], dice)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matching_costs_triton_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    layers, batch, queries, classes = 2, 2, 5, 4
    pred_logits = [torch.randn(batch, queries, classes + 1, generator=gen).to(DEVICE) for _ in range(layers)]
    pred_masks = [torch.randn(batch, queries, 7, 9, generator=gen).to(DEVICE, dtype) for _ in range(layers)]
    labels = [torch.tensor([1, 3, 0]), torch.tensor([2])]
    masks = [torch.rand(3, 28, 36, generator=gen) > 0.5, torch.rand(1, 28, 36, generator=gen) > 0.5]
    masks = [m.to(DEVICE) for m in masks]
    costs = {}
    for backend in ("reference", "triton"):
        costs[backend] = matching_costs(
            pred_logits,
            pred_masks,
            labels,
            masks,
            num_points=300,
            class_weight=2.0,
            bce_weight=5.0,
            dice_weight=5.0,
            generator=torch.Generator(DEVICE).manual_seed(8),
            backend=backend,
        )
    assert costs["triton"].shape == (layers, batch, queries, 3)
    assert relative_error(costs["triton"][:, 0], costs["reference"][:, 0]) < 1e-5
    assert relative_error(costs["triton"][:, 1, :, :1], costs["reference"][:, 1, :, :1]) < 1e-5


def test_no_masks_gives_zero_losses_connected_to_the_graph():
    logits = torch.randn(0, 4, 4, requires_grad=True)
    loss_bce, loss_dice = point_mask_losses(logits, torch.zeros(0, 8, 8, dtype=torch.bool), 1.0)
    (loss_bce + loss_dice).backward()
    assert loss_bce.item() == 0 and loss_dice.item() == 0 and logits.grad is not None


def test_bad_inputs_raise_clear_errors(monkeypatch):
    logits = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="target_masks"):
        point_mask_losses(logits, torch.zeros(3, 8, 8, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="bool or uint8"):
        point_mask_losses(logits, torch.zeros(2, 8, 8), 1.0)
    with pytest.raises(ValueError, match="mask_logits"):
        point_mask_losses(logits[0], torch.zeros(2, 8, 8, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="point_coords"):
        point_mask_losses(logits, torch.zeros(2, 8, 8, dtype=torch.bool), 1.0, point_coords=torch.rand(2, 5))
    with pytest.raises(ValueError, match="num_points, oversample_ratio and importance_sample_ratio are required"):
        point_mask_losses(logits, torch.zeros(2, 8, 8, dtype=torch.bool), 1.0, num_points=10)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailableError):
            point_mask_losses(logits, torch.zeros(2, 8, 8, dtype=torch.bool), 1.0, backend="triton")
