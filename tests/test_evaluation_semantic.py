"""Semantic metrics on a hand-checked case, merging, folders, bad input, bar chart."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluation import EvaluationInputError, SemanticEvaluator, semantic_compute
from pipeline.evaluation.visualize import save_comparison, save_per_class_bars

GT = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])
# confusion (rows gt, cols pred), the 255 pixel left out:
#   gt 0: pred 0 x2, pred 1 x1     gt 1: pred 1 x2     gt 2: pred 2 x1, pred 0 x1     class 3: absent
# IoU: 0 -> 2 / (3 + 3 - 2) = 1/2, 1 -> 2 / (2 + 3 - 2) = 2/3, 2 -> 1 / (2 + 1 - 1) = 1/2, 3 -> undefined
# accuracy: 0 -> 2/3, 1 -> 1, 2 -> 1/2; pixel accuracy 5/7


def test_hand_checked_case():
    evaluator = SemanticEvaluator(num_classes=4)
    evaluator.update(PRED, GT)
    results = evaluator.compute()
    assert results["per_class_iou"][:3] == pytest.approx([1 / 2, 2 / 3, 1 / 2]) and math.isnan(
        results["per_class_iou"][3]
    )
    assert results["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert results["mACC"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert results["pACC"] == pytest.approx(5 / 7)
    assert results["fwIoU"] == pytest.approx((3 * 1 / 2 + 2 * 2 / 3 + 2 * 1 / 2) / 7)


def test_merge_and_torch_inputs_equal_one_pass():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, size=(6, 7)) for _ in range(4)]
    preds = [rng.integers(0, 5, size=(6, 7)) for _ in range(4)]
    for gt in gts:
        gt[0, :3] = 255
    whole = SemanticEvaluator(5)
    for pred, gt in zip(preds, gts):
        whole.update(pred, gt)
    halves = [SemanticEvaluator(5), SemanticEvaluator(5)]
    for index, (pred, gt) in enumerate(zip(preds, gts)):
        halves[index % 2].update(torch.from_numpy(pred), torch.from_numpy(gt))
    merged = halves[0].merge(halves[1])
    assert np.array_equal(merged.confusion, whole.confusion)
    assert merged.confusion.sum() == sum((gt != 255).sum() for gt in gts)


def test_folders_and_errors(tmp_path):
    for folder, array in (("gt", GT), ("pred", PRED)):
        (tmp_path / folder).mkdir()
        Image.fromarray(array.astype(np.uint8)).save(tmp_path / folder / "img1.png")
    results = semantic_compute(tmp_path / "gt", tmp_path / "pred", num_classes=4)
    assert results["pACC"] == pytest.approx(5 / 7)
    Image.fromarray(GT.astype(np.uint8)).save(tmp_path / "gt" / "img2.png")
    with pytest.raises(EvaluationInputError, match=r"image img2: prediction PNG .*img2.png is missing"):
        semantic_compute(tmp_path / "gt", tmp_path / "pred", num_classes=4)
    with pytest.raises(EvaluationInputError, match=r"image x: prediction has labels \[7\] outside \[0, 4\)"):
        SemanticEvaluator(4).update(np.full((2, 4), 7), GT, image_id="x")
    with pytest.raises(EvaluationInputError, match=r"ground truth has labels \[9\]"):
        SemanticEvaluator(4).update(PRED, np.full((2, 4), 9))
    with pytest.raises(ValueError, match="ignore_label 2 collides"):
        SemanticEvaluator(4, ignore_label=2)


def test_semantic_pictures(tmp_path):
    rng = np.random.default_rng(1)
    gt = np.repeat(np.repeat(rng.integers(0, 4, size=(6, 8)), 12, axis=0), 12, axis=1)
    pred = np.where(rng.random(gt.shape) < 0.1, 255, gt)
    image = rng.integers(0, 255, size=gt.shape + (3,), dtype=np.uint8)
    comparison = save_comparison(
        tmp_path / "semantic.png", [{"image": image, "gt": gt, "pred": pred}], ignore=(255,)
    )
    bars = save_per_class_bars(
        tmp_path / "iou.png", ["a", "b", "c", "d", "e"], [0.5, 0.25, float("nan"), 1.0, 0.0], metric="IoU"
    )
    for path in (comparison, bars):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape[0] > 200 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
