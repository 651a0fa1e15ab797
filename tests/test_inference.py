"""Post-processing on hand-built logits whose answers are known, plus the vectorised panoptic path against a
loop that follows the official OneFormer code line by line."""

import pytest
import torch
import torch.nn.functional as F

from model.inference import (
    COCO_TTA_FACTORS,
    INFERENCE_SIZES,
    InferenceSize,
    InferenceThresholds,
    InstanceResult,
    PanopticResult,
    SemanticResult,
    inference_size_for,
    instance_inference,
    panoptic_inference,
    postprocess,
    predict,
    resize_image,
    resize_mask_logits,
    resized_shape,
    resolve_inference_size,
    semantic_inference,
    semantic_multiscale_flip,
    thresholds_for,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # the TTA tests run a model; see conftest

BIG = 12.0  # a logit whose sigmoid / softmax share is ~1


def class_logits_for(labels, num_classes, strength=BIG):
    """One row per query, all mass on its label (num_classes means no-object)."""
    logits = torch.zeros(len(labels), num_classes + 1)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = strength
    return logits


def column_masks(columns_per_query, height, width, inside=BIG, outside=-BIG):
    masks = torch.full((len(columns_per_query), height, width), outside)
    for query, columns in enumerate(columns_per_query):
        masks[query][:, columns] = inside
    return masks


def test_semantic_argmax_and_score_formula():
    class_logits = class_logits_for([0, 1, 2], num_classes=3)
    class_logits[2] = torch.tensor([0.0, 0.0, 0.0, BIG])  # mostly no-object: contributes almost nothing
    mask_logits = column_masks([[0, 1], [2, 3], [0, 1, 2, 3]], height=2, width=4)
    result = semantic_inference(class_logits, mask_logits)

    assert result.scores.shape == (3, 2, 4)
    assert result.labels.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    class_probs = class_logits.softmax(-1)[:, :3]
    expected = (class_probs[:, :, None, None] * mask_logits.sigmoid()[:, None]).sum(0)
    torch.testing.assert_close(result.scores, expected)


def panoptic_scene(stuff_score_logit):
    """Eight columns of four rows; class 0 is a thing, 1 and 2 are stuff.

    q0 thing on cols 0-1; q1 and q2 stuff class 1 on cols 2-3 and 4-5 (must merge); q3 class 2 on col 6 with
    a class probability of 0.6 (kept or dropped by the threshold); q4 no-object on col 7; q5 a confident
    thing whose mask (prob 0.7 on cols 0-2 and 7) wins only col 7: 1/4 of its area, so the overlap test
    drops it and col 7 turns void.
    """
    class_logits = class_logits_for([0, 1, 1, 2, 3, 0], num_classes=3)
    class_logits[3] = torch.tensor([0.0, 0.0, stuff_score_logit, 0.0])
    mask_logits = column_masks([[0, 1], [2, 3], [4, 5], [6], [7], [0, 1, 2, 7]], height=4, width=8)
    mask_logits[5][:, [0, 1, 2, 7]] = torch.logit(torch.tensor(0.7))
    return class_logits, mask_logits


def test_panoptic_threshold_overlap_merge_and_void():
    prob_06 = torch.log(torch.tensor(4.5)).item()  # e^x / (e^x + 3) = 0.6
    class_logits, mask_logits = panoptic_scene(prob_06)
    result = panoptic_inference(class_logits, mask_logits, [True, False, False], object_mask_threshold=0.8)

    assert result.segment_ids.dtype == torch.int32
    assert result.segment_ids[0].tolist() == [1, 1, 2, 2, 2, 2, 0, 0]
    assert (result.segment_ids == result.segment_ids[0]).all()
    assert [(s.id, s.category_id, s.isthing) for s in result.segments_info] == [(1, 0, True), (2, 1, False)]
    assert result.segments_info[0].score == pytest.approx(class_logits[0].softmax(-1).max().item())

    lower = panoptic_inference(class_logits, mask_logits, [True, False, False], object_mask_threshold=0.5)
    assert lower.segment_ids[0].tolist() == [1, 1, 2, 2, 2, 2, 3, 0]
    assert (lower.segments_info[2].id, lower.segments_info[2].category_id) == (3, 2)
    assert lower.segments_info[2].score == pytest.approx(0.6, abs=1e-6)


def test_panoptic_overlap_threshold_is_what_drops_the_weak_segment():
    class_logits, mask_logits = panoptic_scene(0.0)
    result = panoptic_inference(
        class_logits, mask_logits, [True, False, False], object_mask_threshold=0.8, overlap_threshold=0.25
    )
    assert result.segment_ids[0].tolist() == [1, 1, 2, 2, 2, 2, 0, 3]
    assert (result.segments_info[-1].category_id, result.segments_info[-1].isthing) == (0, True)


def test_panoptic_all_void_when_nothing_is_confident():
    class_logits = class_logits_for([3, 3], num_classes=3)
    result = panoptic_inference(class_logits, torch.randn(2, 3, 5), [True, False, False], 0.8)
    assert result.segments_info == []
    assert result.segment_ids.shape == (3, 5) and (result.segment_ids == 0).all()


def official_panoptic_loop(class_logits, mask_logits, is_thing, object_mask_threshold, overlap_threshold):
    """The official OneFormer panoptic_inference, written as its loop over kept queries."""
    num_classes = class_logits.shape[1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    masks = mask_logits.sigmoid()[keep]
    labels = labels[keep]
    segment_ids = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32)
    info, stuff_ids, current = [], {}, 0
    if labels.numel() == 0:
        return segment_ids, info
    winner = (scores[keep][:, None, None] * masks).argmax(0)
    for k in range(labels.numel()):
        label = int(labels[k])
        won = (winner == k).sum().item()
        own = (masks[k] >= 0.5).sum().item()
        region = (winner == k) & (masks[k] >= 0.5)
        if won == 0 or own == 0 or region.sum() == 0 or won / own < overlap_threshold:
            continue
        if not is_thing[label]:
            if label in stuff_ids:
                segment_ids[region] = stuff_ids[label]
                continue
            stuff_ids[label] = current + 1
        current += 1
        segment_ids[region] = current
        info.append((current, label, bool(is_thing[label])))
    return segment_ids, info


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_matches_official_loop_on_random_logits(seed):
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 12, 4
    class_logits = torch.randn(num_queries, num_classes + 1, generator=generator) * 4
    # Blocky masks so that queries genuinely overlap and compete.
    coarse = torch.randn(num_queries, 1, 4, 5, generator=generator) * 3
    mask_logits = torch.nn.functional.interpolate(coarse, size=(16, 20), mode="nearest")[:, 0]
    is_thing = [True, False, True, False]
    expected_ids, expected_info = official_panoptic_loop(class_logits, mask_logits, is_thing, 0.5, 0.8)
    result = panoptic_inference(class_logits, mask_logits, is_thing, 0.5, 0.8)
    assert torch.equal(result.segment_ids, expected_ids)
    assert [(s.id, s.category_id, s.isthing) for s in result.segments_info] == expected_info


def test_instance_top_k_thing_filter_and_score():
    # Class probabilities: (q2, stuff class 2) is the best pair but stuff is never an instance.
    class_logits = torch.tensor(
        [
            [4.0, 1.0, -9.0, 0.0],
            [-9.0, 3.0, -9.0, 0.0],
            [-9.0, -9.0, 6.0, 0.0],
        ]
    )
    mask_logits = torch.tensor(
        [
            [[2.0, 1.0], [-1.0, -3.0]],
            [[-2.0, 0.5], [0.5, 0.5]],
            [[5.0, 5.0], [5.0, 5.0]],
        ]
    )
    is_thing = [True, True, False]
    probs = class_logits.softmax(-1)[:, :3]
    result = instance_inference(class_logits, mask_logits, is_thing, top_k=3)

    # Top 3 pairs, best first: (q2,c2) stuff dropped, (q1,c1), (q0,c0); (q0,c1) is fourth and left out.
    assert result.labels.tolist() == [1, 0]
    assert result.masks.dtype == torch.bool
    assert result.masks.tolist() == [[[False, True], [True, True]], [[True, True], [False, False]]]
    mean_q0 = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(1.0))) / 2
    mean_q1 = torch.sigmoid(torch.tensor(0.5))
    expected = torch.stack([probs[1, 1] * mean_q1, probs[0, 0] * mean_q0])
    torch.testing.assert_close(result.scores, expected, rtol=1e-5, atol=1e-6)

    everything = instance_inference(class_logits, mask_logits, is_thing, top_k=1000)
    assert everything.masks.shape == (6, 2, 2)  # all Q x K pairs, thing classes only
    assert sorted(everything.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_resize_crops_padding_before_resizing_to_original_size():
    # Stride-4 logits 4 x 4 of a 16 x 16 padded batch; the image is the top 8 rows. Left half positive,
    # right half negative; the bottom (padding) rows are positive and must not leak into the right half.
    logits = torch.tensor([[5.0, 5.0, -5.0, -5.0]]).repeat(4, 1)
    logits[2:] = 5.0
    resized = resize_mask_logits(logits[None], padded_size=(16, 16), image_size=(8, 16), original_size=(12, 20))
    assert resized.shape == (1, 12, 20)
    assert (resized[0, :, :10] > 0).all()
    # Only the last image rows blend with the padding, and only next to the column boundary.
    assert (resized[0, :, 12:] < 0).all() and (resized[0, :10, 10:] < 0).all()


def test_postprocess_batch_returns_original_size_per_task():
    class_logits = class_logits_for([0, 1], num_classes=2)[None].repeat(3, 1, 1)
    masks = column_masks([[0], [1, 2, 3]], height=4, width=4)[None].repeat(3, 1, 1, 1)
    outputs = {"pred_logits": class_logits, "pred_masks": masks}
    results = postprocess(
        outputs,
        ["semantic", "panoptic", "instance"],
        image_sizes=[(16, 16)] * 3,
        original_sizes=[(8, 8), (32, 24), (5, 7)],
        is_thing=[True, False],
        thresholds=thresholds_for("coco"),
    )
    assert isinstance(results[0], SemanticResult) and results[0].labels.shape == (8, 8)
    assert (results[0].labels[:, :2] == 0).all() and (results[0].labels[:, 2:] == 1).all()
    assert isinstance(results[1], PanopticResult) and results[1].segment_ids.shape == (32, 24)
    assert [s.category_id for s in results[1].segments_info] == [0, 1]
    assert isinstance(results[2], InstanceResult) and results[2].masks.shape[1:] == (5, 7)
    assert results[2].labels.tolist() == [0, 0]  # both queries paired with the only thing class


def test_bad_inputs_name_themselves():
    with pytest.raises(ValueError, match="dataset"):
        thresholds_for("pascal")
    with pytest.raises(ValueError, match="instance_top_k"):
        InferenceThresholds(object_mask_threshold=0.5, instance_top_k=0)
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_inference(torch.zeros(2, 4), torch.zeros(2, 3, 3), [True], 0.5)
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 4, 4)}
    with pytest.raises(ValueError, match="task"):
        postprocess(outputs, ["depth"], [(16, 16)], [(16, 16)], [True, False], thresholds_for("ade20k"))
    with pytest.raises(ValueError, match="original_sizes"):
        postprocess(outputs, ["semantic"], [(16, 16)], [], [True, False], thresholds_for("ade20k"))


@pytest.mark.parametrize(
    ("dataset", "object_threshold", "top_k"),
    [("ade20k", 0.5, 250), ("ade20k_1280", 0.5, 250), ("coco", 0.8, 150), ("cityscapes", 0.8, 250)],
)
def test_official_thresholds_per_dataset(dataset, object_threshold, top_k):
    thresholds = thresholds_for(dataset)
    assert (thresholds.object_mask_threshold, thresholds.instance_top_k) == (object_threshold, top_k)
    assert thresholds.overlap_threshold == 0.8


# --- semantic multi-scale + flip test-time augmentation, checked against runs done by hand ---

TTA_SIZES = [(24, 30), (17, 21)]  # two valid sizes inside one 32 x 32 padded batch


@pytest.fixture(scope="module")
def tta_model_and_images():
    from model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3, num_queries=20).eval()
    images = model.pixel_mean.expand(2, 3, 32, 32).clone()
    for index, (height, width) in enumerate(TTA_SIZES):
        images[index, :, :height, :width] = torch.rand(3, height, width) * 255
    return model, images


def semantic_scores_by_hand(model, crops, original_sizes):
    """Pad [3, h, w] crops with the pixel mean to a multiple of 32, run the semantic task, postprocess."""
    height = -(-max(c.shape[1] for c in crops) // 32) * 32
    width = -(-max(c.shape[2] for c in crops) // 32) * 32
    batch = model.pixel_mean.expand(len(crops), 3, height, width).clone()
    for index, crop in enumerate(crops):
        batch[index, :, : crop.shape[1], : crop.shape[2]] = crop
    with torch.no_grad():
        outputs = model(batch, ["semantic"] * len(crops))
    results = postprocess(
        outputs,
        ["semantic"] * len(crops),
        [tuple(c.shape[1:]) for c in crops],
        original_sizes,
        [True, False, False],
        thresholds_for("ade20k"),
        padded_size=(height, width),
    )
    return [result.scores for result in results]


def valid_crops(images):
    return [images[index, :, :height, :width] for index, (height, width) in enumerate(TTA_SIZES)]


def test_tta_single_scale_without_flip_is_plain_semantic_inference(tta_model_and_images):
    model, images = tta_model_and_images
    expected = semantic_scores_by_hand(model, valid_crops(images), TTA_SIZES)
    got = semantic_multiscale_flip(model, images, TTA_SIZES, scales=(1.0,), flip=False)
    for scores, reference, size in zip(got, expected, TTA_SIZES):
        assert scores.shape == (3, *size)
        assert torch.equal(scores, reference)


def test_tta_flip_averages_with_the_flipped_run_flipped_back(tta_model_and_images):
    model, images = tta_model_and_images
    crops = valid_crops(images)
    plain = semantic_scores_by_hand(model, crops, TTA_SIZES)
    mirrored = semantic_scores_by_hand(model, [crop.flip(-1) for crop in crops], TTA_SIZES)
    got = semantic_multiscale_flip(model, images, TTA_SIZES, scales=(1.0,), flip=True)
    for scores, unflipped, flipped in zip(got, plain, mirrored):
        torch.testing.assert_close(scores, (unflipped + flipped.flip(-1)) / 2, rtol=0, atol=1e-6)
        assert not torch.allclose(unflipped, flipped.flip(-1), atol=1e-3)  # the flip really changes the run


def test_tta_multiscale_averages_resized_runs_at_the_original_size(tta_model_and_images):
    model, images = tta_model_and_images
    scales, original_sizes = (0.5, 1.5), [(50, 70), (20, 30)]
    per_scale = []
    for scale in scales:
        resized = [
            F.interpolate(
                crop[None],
                size=(int(crop.shape[1] * scale + 0.5), int(crop.shape[2] * scale + 0.5)),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0]
            for crop in valid_crops(images)
        ]
        per_scale.append(semantic_scores_by_hand(model, resized, original_sizes))
    got = semantic_multiscale_flip(
        model, images, TTA_SIZES, scales=scales, flip=False, original_sizes=original_sizes
    )
    for index, scores in enumerate(got):
        assert scores.shape == (3, *original_sizes[index])
        torch.testing.assert_close(scores, (per_scale[0][index] + per_scale[1][index]) / 2, rtol=0, atol=1e-6)
        assert not torch.allclose(per_scale[0][index], per_scale[1][index], atol=1e-3)  # scales differ


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scales": ()}, "scales must hold at least one scale"),
        ({"scales": (1.0, 0.0)}, r"scales must all be positive, got \(1.0, 0.0\)"),
        ({"scales": (-0.5,)}, "scales must all be positive"),
        ({"size_divisibility": 0}, "size_divisibility must be >= 1, got 0"),
        ({"image_sizes": [(24, 30)]}, r"image_sizes must have one \(h, w\) per image \(2\), got 1"),
        ({"image_sizes": [(24, 30), (40, 10)]}, r"image_sizes entry \(40, 10\) must be positive and within"),
        ({"original_sizes": [(5, 5)]}, "original_sizes must have one"),
    ],
)
def test_tta_bad_arguments_name_themselves(tta_model_and_images, kwargs, message):
    model, images = tta_model_and_images
    arguments = {"image_sizes": TTA_SIZES, **kwargs}
    with pytest.raises(ValueError, match=message):
        semantic_multiscale_flip(model, images, **arguments)
    with pytest.raises(ValueError, match="model must carry a 3-value pixel_mean"):
        semantic_multiscale_flip(torch.nn.Identity(), images, TTA_SIZES)


# --- the official test path: resize to the test size, pad, predict, post-process at the original size ---


class ShapeOnlyModel(torch.nn.Module):
    """A stand-in OneFormer for any input size: the pixel mean buffer and all-zero outputs of the right shapes
    (4 queries, 3 classes), so the test-time sizes can be checked at the official sizes in milliseconds."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]))

    def forward(self, images, tasks):
        batch, _, height, width = images.shape
        return {"pred_logits": torch.zeros(batch, 4, 4), "pred_masks": torch.zeros(batch, 4, height // 4, width // 4)}


def record_inputs(model) -> list[torch.Tensor]:
    inputs = []
    model.register_forward_hook(lambda module, args, output: inputs.append(args[0].clone()))
    return inputs


@pytest.mark.parametrize(
    ("dataset", "image_size", "model_sees", "padded"),
    [
        ("ade20k", (60, 90), (640, 960), (640, 960)),
        ("ade20k", (50, 400), (320, 2560), (320, 2560)),  # long side capped at 2560
        ("ade20k_1280", (60, 90), (1280, 1920), (1280, 1920)),
        ("coco", (60, 90), (800, 1200), (800, 1216)),
        ("coco", (100, 300), (444, 1333), (448, 1344)),  # 800 x 2400 capped at 1333
        ("cityscapes", (90, 60), (1536, 1024), (1536, 1024)),
    ],
)
def test_predict_resizes_to_the_dataset_test_size_and_answers_at_the_original_size(
    dataset, image_size, model_sees, padded
):
    model = ShapeOnlyModel()
    inputs = record_inputs(model)
    image = torch.rand(3, *image_size) * 255
    results = predict(model, [image] * 3, ["semantic", "panoptic", "instance"], [True, False, False],
                      thresholds_for(dataset), inference_size_for(dataset))
    assert [tuple(batch.shape) for batch in inputs] == [(3, 3, *padded)]
    height, width = model_sees
    torch.testing.assert_close(inputs[0][0, :, :height, :width], resize_image(image, model_sees))
    padding = inputs[0][0].clone()
    padding[:, :height, :width] = model.pixel_mean[:, None, None]
    assert torch.equal(padding, model.pixel_mean[:, None, None].expand_as(padding))  # pixel mean: 0 once normalised
    semantic, panoptic, instance = results
    assert semantic.labels.shape == semantic.scores.shape[1:] == image_size
    assert panoptic.segment_ids.shape == image_size and instance.masks.shape[1:] == image_size


def test_official_test_sizes_and_multiscale_short_sides():
    assert {name: (size.short_side, size.max_size) for name, size in INFERENCE_SIZES.items()} == {
        "ade20k": (640, 2560), "ade20k_1280": (1280, 5120), "coco": (800, 1333), "cityscapes": (1024, 2048)}
    assert inference_size_for("ade20k").tta_short_sides() == (320, 480, 640, 800, 960, 1120)
    assert inference_size_for("ade20k_1280").tta_short_sides() == (640, 960, 1280, 1600, 1920, 2240)
    assert inference_size_for("cityscapes").tta_short_sides() == (512, 768, 1024, 1280, 1536, 1792)
    assert inference_size_for("coco").tta_short_sides() == tuple(range(400, 1201, 100))  # detectron2's defaults
    assert [size.tta_max_size for size in INFERENCE_SIZES.values()] == [4480, 8960, 4000, 4096]
    assert InferenceSize(96, 384).tta_max_size == 672  # the ADE20K rule: max size x 1.75
    with pytest.raises(ValueError, match="dataset must be one of"):
        inference_size_for("pascal")
    with pytest.raises(ValueError, match=r"0 < short side <= max size, got \(500, 400\)"):
        InferenceSize(500, 400)


@pytest.mark.parametrize(
    ("test_size", "expected"),
    [(None, InferenceSize(800, 1333, 4000, COCO_TTA_FACTORS)), ("none", None), ((96, 384), InferenceSize(96, 384))],
)
def test_resolve_inference_size_defaults_to_the_config_dataset(test_size, expected):
    from model import make_config

    assert resolve_inference_size(make_config("tiny", dataset="coco"), test_size) == expected


def test_resolve_inference_size_rejects_other_values():
    from model import make_config

    with pytest.raises(ValueError, match="test size must be"):
        resolve_inference_size(make_config("tiny"), "official")


def test_resized_shape_follows_resize_shortest_edge():
    assert resized_shape(480, 640, 640, 2560) == (640, 853)  # 853.33 rounds down
    assert resized_shape(640, 480, 640, 2560) == (853, 640)
    assert resized_shape(375, 500, 800, 1333) == (800, 1067)  # 1066.67 rounds up
    assert resized_shape(100, 1000, 640, 2560) == (256, 2560)


def test_predict_at_test_size_equals_resizing_by_hand_then_the_plain_path(tta_model_and_images):
    model, images = tta_model_and_images
    crops, size = valid_crops(images), InferenceSize(40, 60)
    resized = [resize_image(crop, resized_shape(*crop.shape[1:], 40, 60)) for crop in crops]
    assert [tuple(r.shape[1:]) for r in resized] == [(40, 50), (40, 49)]
    expected = semantic_scores_by_hand(model, resized, TTA_SIZES)
    got = predict(model, crops, ["semantic"] * 2, [True, False, False], thresholds_for("ade20k"), size)
    plain = predict(model, crops, ["semantic"] * 2, [True, False, False], thresholds_for("ade20k"), None)
    for result, reference, at_image_size, original in zip(got, expected, plain, semantic_scores_by_hand(
            model, crops, TTA_SIZES)):
        assert result.scores.shape == (3, *reference.shape[1:]) and torch.equal(result.scores, reference)
        assert torch.equal(at_image_size.scores, original)
        assert not torch.allclose(result.scores, at_image_size.scores, atol=1e-3)  # the test size changes the answer


def test_multiscale_views_are_the_official_tta_mapper_sizes_of_the_test_size_image():
    """ADE20K-640 on a 50 x 400 image: the test image is 320 x 2560 (capped); the views are ResizeShortestEdge(s,
    4480) of it for s = 320 .. 1120, not factors of it (factor 0.75 would give 240 x 1920)."""
    model = ShapeOnlyModel()
    inputs = record_inputs(model)
    image = torch.rand(1, 3, 50, 400) * 255
    scores = semantic_multiscale_flip(model, image, [(50, 400)], flip=True, size=inference_size_for("ade20k"))
    views = [(320, 2560), (480, 3840), (560, 4480), (560, 4480), (560, 4480), (560, 4480)]
    padded = [(-(-h // 32) * 32, -(-w // 32) * 32) for h, w in views]
    assert [tuple(batch.shape[-2:]) for batch in inputs] == [size for size in padded for _ in range(2)]
    assert scores[0].shape == (3, 50, 400)


def test_resize_image_is_within_one_grey_level_of_pillow():
    """The official mapper resizes uint8 images with Pillow's bilinear filter; resize_image stays within 1 grey
    level of it whether shrinking or enlarging, where bilinear without antialiasing does not."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    rows, columns = np.mgrid[0:120, 0:160]
    picture = np.stack([(columns * 1.5) % 256, (rows * 2.0) % 256, ((rows + columns) * 0.8) % 256], -1)
    picture[30:70, 40:100] = (200, 30, 60)
    picture = np.clip(picture + generator.normal(0, 20, picture.shape), 0, 255).astype(np.uint8)
    image = torch.from_numpy(picture).permute(2, 0, 1).float()
    for size in ((33, 44), (60, 80), (96, 128), (240, 320), (640, 853)):
        pillow = torch.from_numpy(np.array(Image.fromarray(picture).resize(size[::-1], Image.BILINEAR)))
        difference = (resize_image(image, size) - pillow.permute(2, 0, 1).float()).abs()
        assert difference.max() <= 1.0 + 1e-4 and difference.mean() < 0.4, size
    pillow = torch.from_numpy(np.array(Image.fromarray(picture).resize((44, 33), Image.BILINEAR)))
    aliased = F.interpolate(image[None], size=(33, 44), mode="bilinear", align_corners=False)[0]
    assert (aliased - pillow.permute(2, 0, 1).float()).abs().max() > 20
