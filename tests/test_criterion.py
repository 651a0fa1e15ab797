"""Hungarian matcher and OneFormer criterion: brute-force and per-image scipy matching, the loss terms against
hand computations, a perfect prediction, and the contrastive loss across a real 2-process gloo group."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from kernels.mask_losses import importance_sample_coords
from model.criterion import LossConfig, OneFormerCriterion, contrastive_loss, weighted_total
from model.matcher import HungarianMatcher

NUM_CLASSES = 3


def make_batch(
    seed,
    queries=4,
    pred_size=(6, 5),
    target_size=(24, 20),
    targets_per_image=(3, 2, 0),
    layers=2,
    dtype=torch.float32,
):
    """Model-like outputs (final + aux) and targets; the last image has no targets by default."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(targets_per_image)

    def prediction():
        return {
            "pred_logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=gen).to(dtype),
            "pred_masks": (torch.randn(batch, queries, *pred_size, generator=gen) * 3).to(dtype),
        }

    outputs = prediction()
    outputs["aux_outputs"] = [prediction() for _ in range(layers - 1)]
    targets = []
    for count in targets_per_image:
        coarse = torch.randn(count, 1, 3, 3, generator=gen)
        masks = (
            F.interpolate(coarse, size=target_size, mode="bilinear")[:, 0] > 0
            if count
            else torch.zeros(0, *target_size, dtype=torch.bool)
        )
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (count,), generator=gen), "masks": masks})
    return outputs, targets


def sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """maps [N, H, W] sampled at coords [N, P, 2] -> [N, P], detectron2's point_sample written out."""
    grid = (2 * coords - 1)[:, :, None]
    return F.grid_sample(maps[:, None].float(), grid, align_corners=False)[:, 0, :, 0]


def hand_costs(pred_logits, pred_masks, labels, masks, coords):
    """One image's Q x T cost matrix from the definitions, pair by pair."""
    point_logits = sample(pred_masks, coords[None].expand(pred_masks.shape[0], -1, -1))
    point_targets = sample(masks, coords[None].expand(masks.shape[0], -1, -1))
    probs = pred_logits.softmax(-1)
    costs = torch.zeros(pred_masks.shape[0], masks.shape[0])
    for q in range(costs.shape[0]):
        for j in range(costs.shape[1]):
            x, t = point_logits[q], point_targets[j]
            bce = F.binary_cross_entropy_with_logits(x, t)
            s = x.sigmoid()
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            costs[q, j] = -2 * probs[q, labels[j]] + 5 * bce + 5 * dice
    return costs


def test_matcher_equals_brute_force_and_per_image_scipy():
    outputs, targets = make_batch(0)
    layers = [*outputs["aux_outputs"], outputs]
    assignments = HungarianMatcher(2.0, 5.0, 5.0, num_points=64)(layers, targets, generator=torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    for layer, layer_assignments in zip(layers, assignments):
        coords = torch.rand(len(targets), 64, 2, generator=replay)  # the documented draw: [B, P, 2] per layer
        for image, (pred_index, target_index) in enumerate(layer_assignments):
            labels, masks = targets[image]["labels"], targets[image]["masks"]
            assert pred_index.dtype == torch.int64 and target_index.dtype == torch.int64
            if len(labels) == 0:
                assert len(pred_index) == 0 and len(target_index) == 0
                continue
            costs = hand_costs(
                layer["pred_logits"][image], layer["pred_masks"][image], labels, masks, coords[image]
            )
            brute = min(
                sum(costs[q, j] for j, q in enumerate(perm))
                for perm in itertools.permutations(range(costs.shape[0]), costs.shape[1])
            )
            assert torch.allclose(costs[pred_index, target_index].sum(), brute, atol=1e-5)
            scipy_pred, scipy_target = linear_sum_assignment(costs.numpy())
            assert (
                pred_index.tolist() == scipy_pred.tolist() and target_index.tolist() == scipy_target.tolist()
            )


def hand_class_loss(pred_logits, assignment, targets):
    target_classes = torch.full(pred_logits.shape[:2], NUM_CLASSES)
    for image, (pred_index, target_index) in enumerate(assignment):
        target_classes[image, pred_index] = targets[image]["labels"][target_index]
    log_probs = pred_logits.float().log_softmax(-1)
    nll = -log_probs.gather(-1, target_classes[..., None])[..., 0]
    weights = torch.where(target_classes == NUM_CLASSES, 0.1, 1.0)
    return (weights * nll).sum() / weights.sum()


def hand_mask_losses(pred_masks, assignment, targets, num_masks, generator):
    logits = torch.cat(
        [pred_masks[image, pred_index] for image, (pred_index, _) in enumerate(assignment)]
    ).float()
    masks = torch.cat(
        [targets[image]["masks"][target_index] for image, (_, target_index) in enumerate(assignment)]
    )
    coords = importance_sample_coords(logits, 30, 2.0, 0.5, generator=generator)
    x, t = sample(logits, coords), sample(masks, coords)
    bce = (x.clamp(min=0) - x * t + torch.log1p(torch.exp(-x.abs()))).mean(1)
    s = x.sigmoid()
    dice = 1 - (2 * (s * t).sum(1) + 1) / (s.sum(1) + t.sum(1) + 1)
    return bce.sum() / num_masks, dice.sum() / num_masks


def make_criterion(**kwargs):
    settings = dict(no_object_weight=0.1, num_points=30, oversample_ratio=2.0, importance_sample_ratio=0.5) | kwargs
    backend = settings.get("backend")
    return OneFormerCriterion(NUM_CLASSES, HungarianMatcher(2.0, 5.0, 5.0, num_points=40, backend=backend), **settings)


def test_criterion_terms_equal_hand_computation():
    outputs, targets = make_batch(1)
    terms = make_criterion()(outputs, targets, generator=torch.Generator().manual_seed(9))
    assert set(terms) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}

    replay = torch.Generator().manual_seed(9)  # matcher draws first, then each layer's points, aux first
    layers = [*outputs["aux_outputs"], outputs]
    assignments = HungarianMatcher(2.0, 5.0, 5.0, num_points=40)(layers, targets, generator=replay)
    num_masks = sum(len(t["labels"]) for t in targets)
    for layer, suffix, assignment in zip(layers, ["_0", ""], assignments):
        expected_bce, expected_dice = hand_mask_losses(
            layer["pred_masks"], assignment, targets, num_masks, replay
        )
        assert torch.allclose(
            terms[f"loss_ce{suffix}"], hand_class_loss(layer["pred_logits"], assignment, targets)
        )
        assert torch.allclose(terms[f"loss_mask{suffix}"], expected_bce)
        assert torch.allclose(terms[f"loss_dice{suffix}"], expected_dice)


def perfect_prediction(targets, queries, pred_size, sharpness):
    """Matched queries carry the target's class and a mask that reproduces it; the rest say no-object."""
    batch = len(targets)
    logits = torch.full((batch, queries, NUM_CLASSES + 1), -sharpness)
    logits[..., NUM_CLASSES] = sharpness
    masks = torch.full((batch, queries, *pred_size), -sharpness)
    for image, target in enumerate(targets):
        count = len(target["labels"])
        logits[image, :count] = -sharpness
        logits[image, torch.arange(count), target["labels"]] = sharpness
        coverage = F.adaptive_avg_pool2d(target["masks"][:, None].float(), pred_size)[:, 0]
        masks[image, :count] = sharpness * (2 * coverage - 1)
    return {"pred_logits": logits, "pred_masks": masks}


def test_perfect_prediction_gives_near_zero_losses():
    targets = []
    for offset in (0, 8):
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        masks[0, 8 + offset : 40, 12:48] = True
        masks[1, 44:60, 4 + offset : 28] = True
        targets.append({"labels": torch.tensor([2, 0]), "masks": masks})
    criterion = make_criterion(num_points=2000, oversample_ratio=3.0, importance_sample_ratio=0.75)
    perfect = criterion(
        perfect_prediction(targets, 5, (16, 16), 10.0), targets, torch.Generator().manual_seed(0)
    )
    wrong = perfect_prediction(targets, 5, (16, 16), 10.0)
    wrong["pred_masks"] = -wrong["pred_masks"]
    inverted = criterion(wrong, targets, torch.Generator().manual_seed(0))
    assert perfect["loss_ce"] < 1e-3
    # Bilinear sampling blurs the logits and the 0/1 targets differently at mask borders, where importance
    # sampling concentrates, so "perfect" is small rather than 0; a reversed mask costs ~100x more.
    assert perfect["loss_mask"] < 0.1 and perfect["loss_dice"] < 0.1
    assert inverted["loss_mask"] > 50 * perfect["loss_mask"]
    assert inverted["loss_dice"] > 5 * perfect["loss_dice"]


def test_bf16_outputs_give_float32_terms_close_to_float32_outputs():
    outputs, targets = make_batch(2)
    outputs_bf16, _ = make_batch(2, dtype=torch.bfloat16)
    # Compare on the same (rounded) values so only the loss arithmetic differs.
    outputs = {
        "pred_logits": outputs_bf16["pred_logits"].float(),
        "pred_masks": outputs_bf16["pred_masks"].float(),
        "aux_outputs": [{k: v.float() for k, v in aux.items()} for aux in outputs_bf16["aux_outputs"]],
    }
    terms_fp32 = make_criterion()(outputs, targets, torch.Generator().manual_seed(4))
    terms_bf16 = make_criterion()(outputs_bf16, targets, torch.Generator().manual_seed(4))
    for name, value in terms_bf16.items():
        assert value.dtype == torch.float32, name
        assert torch.allclose(value, terms_fp32[name], rtol=1e-5), name


def test_gradients_reach_every_layer_and_the_queries():
    outputs, targets = make_batch(3)
    leaves = [
        outputs["pred_logits"],
        outputs["pred_masks"],
        *[t for aux in outputs["aux_outputs"] for t in aux.values()],
    ]
    for leaf in leaves:
        leaf.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    outputs["object_queries"] = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    outputs["text_queries"] = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    outputs["logit_scale"] = torch.tensor(2.0, requires_grad=True)
    terms = make_criterion()(outputs, targets)
    weighted_total(terms, LossConfig()).backward()
    for tensor in [*leaves, outputs["object_queries"], outputs["text_queries"], outputs["logit_scale"]]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_weighted_total_uses_the_one_weight_table():
    terms = {
        "loss_ce": torch.tensor(1.0),
        "loss_mask_3": torch.tensor(2.0),
        "loss_dice": torch.tensor(3.0),
        "loss_contrastive": torch.tensor(4.0),
    }
    weights = LossConfig()
    assert weighted_total(terms, weights).item() == pytest.approx(2.0 * 1 + 5.0 * 2 + 5.0 * 3 + 0.5 * 4)
    with pytest.raises(ValueError, match="loss_box"):
        weighted_total({"loss_box": torch.tensor(1.0)}, weights)


def test_contrastive_loss_equals_hand_computation():
    gen = torch.Generator().manual_seed(5)
    images, texts = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 4, 8, generator=gen)
    scale = torch.tensor(5.0)  # exp(5) > 100: the clamp applies
    a = images.flatten(1) / images.flatten(1).norm(dim=1, keepdim=True)
    b = texts.flatten(1) / texts.flatten(1).norm(dim=1, keepdim=True)
    logits = 100.0 * a @ b.T
    expected = -(logits.log_softmax(1).diag().mean() + logits.T.log_softmax(1).diag().mean())
    assert torch.allclose(contrastive_loss(images, texts, scale), expected)


def _contrastive_worker(rank, world_size, port, images, texts, log_scale, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        per_rank = images.shape[0] // world_size
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        local_images = images[local].clone().requires_grad_(True)
        local_texts = texts[local].clone().requires_grad_(True)
        scale = log_scale.clone().requires_grad_(True)
        loss = contrastive_loss(local_images, local_texts, scale)
        loss.backward()
        torch.save(
            {
                "loss": loss.detach(),
                "images": local_images.grad,
                "texts": local_texts.grad,
                "scale": scale.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort, seen under load)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two worker processes
def test_contrastive_across_two_processes_equals_single_process_on_the_whole_batch(tmp_path):
    gen = torch.Generator().manual_seed(6)
    images, texts = torch.randn(4, 5, 6, generator=gen), torch.randn(4, 5, 6, generator=gen)
    log_scale = torch.tensor(2.5)
    mp.spawn(_contrastive_worker, args=(2, _free_port(), images, texts, log_scale, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    whole_images, whole_texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    whole_scale = log_scale.clone().requires_grad_(True)
    whole_loss = contrastive_loss(whole_images, whole_texts, whole_scale)
    whole_loss.backward()

    # DDP averages over workers: the mean loss and the averaged gradients are the whole batch's.
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole_loss.detach())
    for rank, result in enumerate(ranks):
        # The gather's backward sums every worker's loss gradient into the owner's rows; DDP then divides by 2.
        assert torch.allclose(result["images"] / 2, whole_images.grad[2 * rank : 2 * rank + 2], atol=1e-6)
        assert torch.allclose(result["texts"] / 2, whole_texts.grad[2 * rank : 2 * rank + 2], atol=1e-6)
    assert torch.allclose((ranks[0]["scale"] + ranks[1]["scale"]) / 2, whole_scale.grad)


def test_criterion_rejects_mismatched_targets():
    outputs, targets = make_batch(7)
    with pytest.raises(ValueError, match="targets has 2 entries"):
        make_criterion()(outputs, targets[:2])
    targets[0]["masks"] = targets[0]["masks"][:1]
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        make_criterion()(outputs, targets)


def test_criterion_triton_backend_matches_reference():
    outputs, targets = make_batch(8)
    terms = {
        backend: make_criterion(backend=backend)(outputs, targets, torch.Generator().manual_seed(2))
        for backend in ("reference", "triton")
    }
    for name, value in terms["reference"].items():
        assert torch.allclose(terms["triton"][name], value, rtol=1e-5), name
