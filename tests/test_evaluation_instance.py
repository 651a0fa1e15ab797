"""Instance AP against a direct pycocotools COCOeval run, in-memory accumulation, bad-input errors."""

import contextlib
import io
import json
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from random_panoptic import write_random_panoptic_dataset

from pipeline.evaluation import (
    EvaluationInputError,
    InstanceEvaluator,
    instance_ap_compute,
    read_panoptic_png,
)
from pipeline.evaluation.instance import STAT_NAMES, panoptic_to_coco_instances


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Panoptic ground truth plus COCO results made from the random predictions' thing segments."""
    out = tmp_path_factory.mktemp("instance")
    paths = write_random_panoptic_dataset(out, num_images=10, seed=5, height=48, width=64)
    gt = json.loads(paths["gt_json"].read_text())
    pred = {a["image_id"]: a for a in json.loads(paths["pred_json"].read_text())["annotations"]}
    things = {c["id"] for c in gt["categories"] if c["isthing"]}
    rng = np.random.default_rng(0)
    results = []
    for annotation in gt["annotations"]:
        pred_annotation = pred[annotation["image_id"]]
        ids = read_panoptic_png(paths["pred_folder"] / pred_annotation["file_name"])
        for segment in pred_annotation["segments_info"]:
            if segment["category_id"] in things:
                rle = mask_util.encode(np.asfortranarray((ids == segment["id"]).astype(np.uint8)))
                results.append(
                    {
                        "image_id": annotation["image_id"],
                        "category_id": segment["category_id"],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "score": float(rng.random()),
                    }
                )
    (out / "results.json").write_text(json.dumps(results))
    return {**paths, "gt": gt, "pred": pred, "results": results, "results_json": out / "results.json"}


def _direct_cocoeval(gt, gt_folder, results) -> np.ndarray:
    """The reference: an instances dataset built here straight from the PNGs, evaluated by COCOeval."""
    things = [c for c in gt["categories"] if c["isthing"]]
    thing_ids = {c["id"] for c in things}
    images, annotations = [], []
    for annotation in gt["annotations"]:
        ids = read_panoptic_png(gt_folder / annotation["file_name"])
        images.append({"id": annotation["image_id"], "height": ids.shape[0], "width": ids.shape[1]})
        for segment in annotation["segments_info"]:
            if segment["category_id"] in thing_ids:
                mask = np.asfortranarray((ids == segment["id"]).astype(np.uint8))
                rle = mask_util.encode(mask)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": annotation["image_id"],
                        "category_id": segment["category_id"],
                        "segmentation": rle,
                        "area": float(mask.sum()),
                        "iscrowd": segment["iscrowd"],
                    }
                )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": things}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_ap_matches_direct_cocoeval_from_panoptic_gt(data):
    reference = _direct_cocoeval(data["gt"], data["gt_folder"], data["results"])
    ours = instance_ap_compute(data["gt_json"], data["results_json"], data["gt_folder"])
    assert [ours[name] for name in STAT_NAMES] == pytest.approx(reference.tolist(), abs=1e-12)
    assert 0.05 < ours["AP"] < 0.95
    assert any(s["iscrowd"] for a in data["gt"]["annotations"] for s in a["segments_info"])


def test_instances_json_gt_gives_same_ap(data, tmp_path):
    instances = panoptic_to_coco_instances(data["gt"], data["gt_folder"])
    assert any(a["iscrowd"] for a in instances["annotations"])
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    from_instances = instance_ap_compute(tmp_path / "instances.json", data["results_json"])
    from_panoptic = instance_ap_compute(data["gt_json"], data["results_json"], data["gt_folder"])
    assert from_instances == from_panoptic


def _add_images(evaluator, data, annotations):
    for annotation in annotations:
        image_id = annotation["image_id"]
        mine = [r for r in data["results"] if r["image_id"] == image_id]
        masks = np.stack([mask_util.decode(r["segmentation"]) for r in mine]) if mine else np.zeros((0, 48, 64), bool)
        evaluator.update(image_id, read_panoptic_png(data["gt_folder"] / annotation["file_name"]),
                         annotation["segments_info"], masks.astype(bool), [r["score"] for r in mine],
                         [r["category_id"] for r in mine])
    return evaluator


def test_merge_is_exact_whatever_the_split_and_order(data):
    annotations = data["gt"]["annotations"]
    whole = _add_images(InstanceEvaluator(data["gt"]["categories"]), data, annotations).compute()
    for parts in ([annotations[::2], annotations[1::2]], [annotations[7:], annotations[:3], annotations[3:7]]):
        evaluators = [_add_images(InstanceEvaluator(data["gt"]["categories"]), data, part) for part in parts]
        for order in (evaluators, evaluators[::-1]):
            merged = InstanceEvaluator(data["gt"]["categories"])
            for evaluator in order:
                merged.merge(pickle.loads(pickle.dumps(evaluator)))
            assert json.dumps(merged.compute(), sort_keys=True) == json.dumps(whole, sort_keys=True)


def test_in_memory_evaluators_merge_to_file_result(data):
    workers = [InstanceEvaluator(data["gt"]["categories"]) for _ in range(2)]
    for index, annotation in enumerate(data["gt"]["annotations"]):
        image_id = annotation["image_id"]
        mine = [r for r in data["results"] if r["image_id"] == image_id]
        masks = (
            np.stack([mask_util.decode(r["segmentation"]) for r in mine])
            if mine
            else np.zeros((0, 48, 64), bool)
        )
        workers[index % 2].update(
            image_id,
            read_panoptic_png(data["gt_folder"] / annotation["file_name"]),
            annotation["segments_info"],
            masks.astype(bool),
            [r["score"] for r in mine],
            [r["category_id"] for r in mine],
        )
    merged = workers[0].merge(workers[1]).compute()
    reference = instance_ap_compute(data["gt_json"], data["results_json"], data["gt_folder"])
    assert [merged[n] for n in STAT_NAMES] == pytest.approx([reference[n] for n in STAT_NAMES], abs=1e-12)


def test_no_predictions_scores_zero(data):
    evaluator = InstanceEvaluator(data["gt"]["categories"])
    annotation = data["gt"]["annotations"][0]
    ids = read_panoptic_png(data["gt_folder"] / annotation["file_name"])
    evaluator.update(
        annotation["image_id"], ids, annotation["segments_info"], np.zeros((0,) + ids.shape, bool), [], []
    )
    assert evaluator.compute()["AP"] == 0.0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("image_id", 12345, r"result #0: unknown image id 12345"),
        (
            "category_id",
            90,
            r"result #0 \(image 1\): unknown category id 90",
        ),  # a stuff class is not an instance class
    ],
)
def test_bad_results_name_the_problem(data, tmp_path, key, value, message):
    results = [dict(data["results"][0], **{key: value})] + data["results"][1:]
    (tmp_path / "bad.json").write_text(json.dumps(results))
    with pytest.raises(EvaluationInputError, match=message):
        instance_ap_compute(data["gt_json"], tmp_path / "bad.json", data["gt_folder"])
