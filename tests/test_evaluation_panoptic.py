"""Panoptic quality against panopticapi, hand-checked cases, bad-input errors, prediction writing, pictures."""

import contextlib
import io
import json
import math
import pickle

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute as panopticapi_pq_compute
from PIL import Image
from random_panoptic import CATEGORIES, write_random_panoptic_dataset

from pipeline.evaluation import (
    EvaluationInputError,
    PanopticEvaluator,
    pq_compute,
    read_panoptic_png,
    write_panoptic_predictions,
)
from pipeline.evaluation.panoptic_format import write_panoptic_png
from pipeline.evaluation.visualize import save_comparison, save_per_class_bars


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_random_panoptic_dataset(
        tmp_path_factory.mktemp("panoptic"), num_images=16, seed=3, height=48, width=64
    )


def _files(paths):
    return [str(paths[k]) for k in ("gt_json", "pred_json", "gt_folder", "pred_folder")]


def _assert_same_results(ours, reference, tolerance=1e-9):
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == reference[group]["n"]
        for metric in ("pq", "sq", "rq"):
            assert abs(ours[group][metric] - reference[group][metric]) <= tolerance, (group, metric)
    assert set(ours["per_class"]) == set(reference["per_class"])
    for category_id, metrics in reference["per_class"].items():
        for metric, value in metrics.items():
            assert abs(ours["per_class"][category_id][metric] - value) <= tolerance, (category_id, metric)


def test_dataset_exercises_crowd_void_and_one_sided_classes(dataset):
    gt = json.loads(dataset["gt_json"].read_text())
    pred = json.loads(dataset["pred_json"].read_text())
    gt_segments = [s for a in gt["annotations"] for s in a["segments_info"]]
    assert any(s["iscrowd"] for s in gt_segments)
    gt_categories = {s["category_id"] for s in gt_segments}
    pred_categories = {s["category_id"] for a in pred["annotations"] for s in a["segments_info"]}
    assert gt_categories - pred_categories and pred_categories - gt_categories
    first = gt["annotations"][0]["file_name"]
    assert (read_panoptic_png(dataset["gt_folder"] / first) == 0).any()
    assert (read_panoptic_png(dataset["pred_folder"] / first) == 0).any()


def test_pq_matches_panopticapi(dataset):
    with contextlib.redirect_stdout(io.StringIO()):
        reference = panopticapi_pq_compute(*_files(dataset))
    ours = pq_compute(*_files(dataset))
    _assert_same_results(ours, reference)
    # the data must give a mix of matches and misses, not a degenerate 0 or 1
    assert 0.05 < ours["All"]["pq"] < 0.95
    _assert_same_results(pq_compute(*_files(dataset), num_threads=3), reference)


def test_in_memory_evaluators_merge_to_file_result(dataset):
    gt = json.loads(dataset["gt_json"].read_text())
    pred = {a["image_id"]: a for a in json.loads(dataset["pred_json"].read_text())["annotations"]}
    workers = [PanopticEvaluator(gt["categories"]) for _ in range(3)]
    for index, gt_annotation in enumerate(gt["annotations"]):
        pred_annotation = pred[gt_annotation["image_id"]]
        workers[index % 3].update(
            read_panoptic_png(dataset["gt_folder"] / gt_annotation["file_name"]).astype(np.int64),
            gt_annotation["segments_info"],
            read_panoptic_png(dataset["pred_folder"] / pred_annotation["file_name"]),
            pred_annotation["segments_info"],
            image_id=gt_annotation["image_id"],
        )
    merged = workers[0].merge(workers[1]).merge(workers[2])
    assert merged.num_images == len(gt["annotations"])
    _assert_same_results(merged.compute(), pq_compute(*_files(dataset)), tolerance=1e-12)


def test_merge_is_exact_whatever_the_split_and_order(dataset):
    """Integers for TP/FP/FN and math.fsum over the images' IoU sums: every split and merge order gives the
    same bits, equal to the correctly rounded sum of the per-image sums."""
    gt = json.loads(dataset["gt_json"].read_text())
    pred = {a["image_id"]: a for a in json.loads(dataset["pred_json"].read_text())["annotations"]}

    def evaluated(annotations):
        evaluator = PanopticEvaluator(gt["categories"])
        for annotation in annotations:
            evaluator.update(read_panoptic_png(dataset["gt_folder"] / annotation["file_name"]),
                             annotation["segments_info"],
                             read_panoptic_png(dataset["pred_folder"] / pred[annotation["image_id"]]["file_name"]),
                             pred[annotation["image_id"]]["segments_info"], image_id=annotation["image_id"])
        return evaluator

    annotations = gt["annotations"]
    whole = evaluated(annotations)
    per_image = [evaluated([annotation]) for annotation in annotations]
    expected_iou = [math.fsum(float(one.iou_sum[k]) for one in per_image) for k in range(len(gt["categories"]))]
    assert whole.iou_sum.tolist() == expected_iou and whole.tp.dtype == np.int64
    for parts in ([annotations[::3], annotations[1::3], annotations[2::3]], [annotations[9:], annotations[:9]],
                  [[annotation] for annotation in annotations]):
        evaluators = [evaluated(part) for part in parts]
        for order in (evaluators, evaluators[::-1]):
            merged = PanopticEvaluator(gt["categories"])
            for evaluator in order:
                merged.merge(pickle.loads(pickle.dumps(evaluator)))
            assert merged.num_images == len(annotations)
            assert json.dumps(merged.compute(), sort_keys=True) == json.dumps(whole.compute(), sort_keys=True)


THING, STUFF = {"id": 1, "isthing": 1, "name": "thing"}, {"id": 2, "isthing": 0, "name": "stuff"}


def test_hand_checked_void_and_crowd_rules():
    gt = np.zeros((4, 10), dtype=np.int64)
    gt[:, 0:4] = 10  # thing, 16 px
    gt[:, 4:6] = 20  # crowd thing region, 8 px
    gt[:, 6:9] = 30  # stuff, 12 px; column 9 is void
    pred = np.zeros_like(gt)
    pred[:, 0:3] = 1  # thing: IoU 12/16 with segment 10
    pred[:, 3:6] = 2  # thing: 4 px on segment 10, 8 px on the crowd region -> ignored, not a false positive
    pred[:, 6:8] = 3  # stuff: 8 px on segment 30 -> IoU 8/12
    pred[:, 8:10] = (
        4  # stuff: 4 px on 30, 4 px on void: union = 8 + 12 - 4 - 4 = 12, IoU 1/3 -> fp (half void, not more)
    )
    gt_segments = [
        {"id": 10, "category_id": 1, "iscrowd": 0, "area": 16},
        {"id": 20, "category_id": 1, "iscrowd": 1, "area": 8},
        {"id": 30, "category_id": 2, "iscrowd": 0, "area": 12},
    ]
    pred_segments = [{"id": i, "category_id": c} for i, c in ((1, 1), (2, 1), (3, 2), (4, 2))]
    evaluator = PanopticEvaluator([THING, STUFF])
    evaluator.update(gt, gt_segments, pred, pred_segments)
    assert (
        evaluator.tp.tolist() == [1, 1]
        and evaluator.fp.tolist() == [0, 1]
        and evaluator.fn.tolist() == [0, 0]
    )
    results = evaluator.compute()
    assert results["per_class"][1] == pytest.approx({"pq": 0.75, "sq": 0.75, "rq": 1.0})
    assert results["per_class"][2] == pytest.approx({"pq": (8 / 12) / 1.5, "sq": 8 / 12, "rq": 1 / 1.5})
    assert results["All"]["n"] == 2 and results["Stuff"]["pq"] == pytest.approx((8 / 12) / 1.5)


def _single_image(tmp_path, gt_segments, pred_segments, pred_ids, pred_image_id=1, write_pred_png=True):
    gt_ids = np.array([[0, 5, 5], [6, 6, 6]])
    write_panoptic_png(tmp_path / "gt" / "a.png", gt_ids)
    if write_pred_png:
        write_panoptic_png(tmp_path / "pred" / "a.png", np.asarray(pred_ids))
    (tmp_path / "pred").mkdir(exist_ok=True)
    gt_doc = {
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": gt_segments}],
        "categories": [THING, STUFF],
    }
    pred_doc = {
        "annotations": [{"image_id": pred_image_id, "file_name": "a.png", "segments_info": pred_segments}]
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt_doc))
    (tmp_path / "pred.json").write_text(json.dumps(pred_doc))
    return str(tmp_path / "gt.json"), str(tmp_path / "pred.json")


GOOD_GT = [
    {"id": 5, "category_id": 1, "iscrowd": 0, "area": 2},
    {"id": 6, "category_id": 2, "iscrowd": 0, "area": 3},
]
GOOD_PRED = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2}]
GOOD_PRED_IDS = [[0, 7, 7], [8, 8, 8]]


@pytest.mark.parametrize(
    "gt_segments, pred_segments, pred_ids, pred_image_id, write_png, message",
    [
        (GOOD_GT, GOOD_PRED, GOOD_PRED_IDS, 1, False, r"image 1: prediction PNG .*a\.png is missing"),
        (
            GOOD_GT,
            GOOD_PRED[:1],
            GOOD_PRED_IDS,
            1,
            True,
            r"image 1 \(prediction\): segment ids \[8\] are in the prediction PNG but not in segments_info",
        ),
        (
            GOOD_GT,
            GOOD_PRED + [{"id": 9, "category_id": 2}],
            GOOD_PRED_IDS,
            1,
            True,
            r"image 1 \(prediction\): segment ids \[9\] are in segments_info but not in the prediction PNG",
        ),
        (
            GOOD_GT,
            GOOD_PRED + [{"id": 8, "category_id": 1}],
            GOOD_PRED_IDS,
            1,
            True,
            r"image 1 \(prediction\): duplicate segment ids \[8\]",
        ),
        (
            GOOD_GT + [{"id": 5, "category_id": 2}],
            GOOD_PRED,
            GOOD_PRED_IDS,
            1,
            True,
            r"image 1 \(ground truth\): duplicate segment ids \[5\]",
        ),
        (GOOD_GT, GOOD_PRED, GOOD_PRED_IDS, 99, True, r"predictions for unknown image ids \[99\]"),
        (
            GOOD_GT,
            [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 42}],
            GOOD_PRED_IDS,
            1,
            True,
            r"image 1 \(prediction\): unknown category ids \[42\]",
        ),
    ],
)
def test_bad_input_names_image_and_problem(
    tmp_path, gt_segments, pred_segments, pred_ids, pred_image_id, write_png, message
):
    gt_json, pred_json = _single_image(
        tmp_path, gt_segments, pred_segments, pred_ids, pred_image_id, write_png
    )
    with pytest.raises(EvaluationInputError, match=message):
        pq_compute(gt_json, pred_json)


def test_good_single_image_and_missing_prediction(tmp_path):
    gt_json, pred_json = _single_image(tmp_path, GOOD_GT, GOOD_PRED, GOOD_PRED_IDS)
    assert pq_compute(gt_json, pred_json)["All"]["pq"] == pytest.approx(1.0)
    gt = json.loads((tmp_path / "gt.json").read_text())
    gt["annotations"].append({"image_id": 2, "file_name": "b.png", "segments_info": []})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(EvaluationInputError, match=r"no prediction for images \[2\]"):
        pq_compute(gt_json, pred_json)


def test_written_predictions_round_trip(dataset, tmp_path):
    """Ground truth written back as a prediction (crowd regions left void) scores PQ 1 on every class seen."""
    gt = json.loads(dataset["gt_json"].read_text())
    predictions = []
    for annotation in gt["annotations"]:
        ids = read_panoptic_png(dataset["gt_folder"] / annotation["file_name"]).astype(np.int64)
        crowd = [s["id"] for s in annotation["segments_info"] if s["iscrowd"]]
        ids[np.isin(ids, crowd)] = 0
        segments = [
            {"id": np.int64(s["id"]), "category_id": s["category_id"]}
            for s in annotation["segments_info"]
            if not s["iscrowd"]
        ]
        predictions.append({"image_id": annotation["image_id"], "ids": ids, "segments_info": segments})
    folder = write_panoptic_predictions(predictions, tmp_path / "out.json", categories=gt["categories"])
    first = predictions[0]
    assert np.array_equal(read_panoptic_png(folder / f"{first['image_id']:012d}.png"), first["ids"])
    results = pq_compute(dataset["gt_json"], tmp_path / "out.json", dataset["gt_folder"])
    assert results["All"]["pq"] == pytest.approx(1.0) and results["All"]["n"] == len(
        {s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"]}
    )


def test_pictures_are_written(dataset, tmp_path):
    gt = json.loads(dataset["gt_json"].read_text())
    examples = []
    for annotation in gt["annotations"][:2]:
        gt_ids = read_panoptic_png(dataset["gt_folder"] / annotation["file_name"])
        pred_ids = read_panoptic_png(dataset["pred_folder"] / annotation["file_name"])
        image = np.full(gt_ids.shape + (3,), 120, dtype=np.uint8)
        examples.append({"image": image, "gt": gt_ids, "pred": pred_ids, "name": str(annotation["image_id"])})
    comparison = save_comparison(tmp_path / "panoptic.png", examples, title="panoptic")
    results = pq_compute(*_files(dataset))
    names = {c["id"]: c["name"] for c in CATEGORIES}
    bars = save_per_class_bars(
        tmp_path / "pq.png",
        [names[k] for k in results["per_class"]],
        [v["pq"] for v in results["per_class"].values()],
        metric="PQ",
    )
    for path in (comparison, bars):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn content, not a blank canvas


def test_ground_truth_area_rule():
    """pq_compute (like panopticapi) trusts the JSON area; the in-memory default counts pixels."""
    gt = np.zeros((2, 8), dtype=np.int64)
    gt[:, :4] = 10
    pred = np.zeros_like(gt)
    pred[:, :3] = 1
    gt_segments = [{"id": 10, "category_id": 1, "iscrowd": 0, "area": 10}]  # 8 pixels in the map
    pred_segments = [{"id": 1, "category_id": 1}]
    by_pixels, by_json = (
        PanopticEvaluator([THING, STUFF]),
        PanopticEvaluator([THING, STUFF], gt_area_from_json=True),
    )
    by_pixels.update(gt, gt_segments, pred, pred_segments)
    by_json.update(gt, gt_segments, pred, pred_segments)
    assert by_pixels.iou_sum[0] == pytest.approx(6 / 8) and by_json.iou_sum[0] == pytest.approx(6 / 10)
    with pytest.raises(ValueError, match="area rules"):
        by_pixels.merge(by_json)


def test_read_panoptic_png_refills_a_buffer_and_matches_the_copying_path(dataset, monkeypatch):
    from pipeline.evaluation import panoptic_format

    gt = json.loads(dataset["gt_json"].read_text())
    first, second = (dataset["gt_folder"] / a["file_name"] for a in gt["annotations"][:2])
    rgb = np.asarray(Image.open(second).convert("RGB")).astype(np.int64)
    expected = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
    buffer = read_panoptic_png(first)
    refilled = read_panoptic_png(second, out=buffer)
    assert refilled is buffer and np.array_equal(refilled, expected)
    assert read_panoptic_png(second, out=np.zeros((2, 2), np.uint32)).shape == expected.shape

    def no_arrow_export(capsule, name):
        raise ValueError("no arrow export")

    monkeypatch.setattr(panoptic_format, "_capsule_pointer", no_arrow_export)
    assert np.array_equal(read_panoptic_png(second), expected)


def test_ground_truth_ids_without_entry_are_neither_segments_nor_void():
    """panopticapi skips pairs whose ground-truth id has no segments_info entry, but their pixels still count
    in the predicted area (only id 0 leaves the union)."""
    gt = np.zeros((2, 6), dtype=np.int64)
    gt[:, :4] = 10
    gt[:, 4:] = 77  # painted but not listed
    pred = np.ones_like(gt)  # one segment over everything: IoU 8 / (12 + 8 - 8) = 2/3
    evaluator = PanopticEvaluator([THING, STUFF])
    evaluator.update(
        gt, [{"id": 10, "category_id": 1, "iscrowd": 0}], pred, [{"id": 1, "category_id": 1}], image_id=5
    )
    assert evaluator.tp.tolist() == [1, 0] and evaluator.fp.tolist() == [0, 0]
    assert evaluator.iou_sum[0] == pytest.approx(8 / 12)
    with pytest.raises(EvaluationInputError, match=r"image 5 \(prediction\): segment ids \[1\] are in the"):
        evaluator.update(gt, [], pred, [], image_id=5)
