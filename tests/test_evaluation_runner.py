"""Model evaluation (pipeline/evaluation/runner.py, report.py): exact merging of partial results (across splits
and Ray workers), predictions written in the standard formats re-scored by the CLI to the same numbers,
pictures, the multi-scale semantic path, evaluation at the test size, and clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import pipeline.evaluation.runner
from model import make_config
from model.checkpoint import build_from_config, save_model
from model.inference import TTA_FACTORS, InferenceSize, InferenceThresholds
from pipeline.data.preprocess import run_preprocess
from pipeline.data.settings import DatasetSettings, PreprocessSettings
from pipeline.data.stream import ModelInputs, build_eval_loader
from pipeline.evaluate import main as evaluate_main
from pipeline.evaluation.report import save_pictures, write_predictions
from pipeline.evaluation.runner import (
    EvaluationOptions,
    PartialResults,
    evaluate,
    evaluate_model,
    read_classes,
)
from pipeline.job import main as job_main
from pipeline.synthetic import GeneratorSettings, generate_dataset

NUM_CLASSES = 10  # the synthetic dataset's categories
THRESHOLDS = InferenceThresholds(object_mask_threshold=0.5, instance_top_k=50)
TEST_SIZE = (48, 192)
"""A small test size for the 64-96 px images: the resize path runs, and the tiny model stays fast on a CPU
(the official ADE20K size, 640, costs about 3 s per forward here)."""
CONFIG = make_config("tiny", num_classes=NUM_CLASSES, object_mask_threshold=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_model")
    generate_dataset(root / "raw", num_images=8, seed=3, val_fraction=0.5,
                     settings=GeneratorSettings(min_size=64, max_size=96))
    run_preprocess(DatasetSettings(format="custom_coco_panoptic", root=str(root / "raw")),
                   PreprocessSettings(output=str(root / "shards"), target_shard_mb=0.01, executor="local",
                                      show_progress=False))
    torch.manual_seed(0)
    # A threshold of 0 keeps every query, so the untrained model still predicts panoptic segments.
    save_model(build_from_config(CONFIG).eval(), CONFIG, root / "model.pt")
    return {"root": root, "val": root / "shards" / "val", "checkpoint": root / "model.pt"}


@pytest.fixture(scope="module")
def batches(data):
    return list(build_eval_loader(str(data["val"]), ModelInputs.from_config(CONFIG), rank=0, world_size=1))


@pytest.fixture(scope="module")
def cli_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_out")
    code = evaluate_main(["model", "--checkpoint", str(data["checkpoint"]), "--shards", str(data["val"]),
                          "--test-size", *map(str, TEST_SIZE), "--out", str(out), "--pictures", "2",
                          "--json-out", str(out / "result.json")])
    assert code == 0
    return out, json.loads((out / "result.json").read_text())


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.float().numpy().tobytes()).hexdigest()


class OracleModel(torch.nn.Module):
    """Predicts the ground truth of the images it was built from (looked up by their pixels) at stride 4,
    with every third segment given the next class: a model whose answers are known and imperfect. Evaluated
    at the image size, it gets the loader's padded batches back (same pixel mean, same multiple of 32)."""

    def __init__(self, batches: list[dict], num_queries: int = 32):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(CONFIG.pixel_mean))
        self.answers = {}
        for batch in batches:
            for image, index_map, table in zip(batch["images"], batch["index_maps"], batch["segments"]):
                self.answers[_key(image)] = self._answer(image.shape[1:], index_map, table, num_queries)

    @staticmethod
    def _answer(padded_size, index_map, table, num_queries):
        assert len(table) <= num_queries
        logits = torch.full((num_queries, NUM_CLASSES + 1), -10.0)
        logits[:, NUM_CLASSES] = 10.0
        masks = torch.full((num_queries, padded_size[0] // 4, padded_size[1] // 4), -10.0)
        padded = torch.zeros(padded_size, dtype=torch.long)
        padded[: index_map.shape[0], : index_map.shape[1]] = index_map
        for row, label in enumerate(table.classes.tolist()):
            label = (label + 1) % NUM_CLASSES if row % 3 == 2 else label
            logits[row, NUM_CLASSES], logits[row, label] = -10.0, 10.0
            masks[row] = torch.where(padded[::4, ::4] == row + 1, 10.0, -10.0)
        return logits, masks

    def forward(self, images, tasks):
        logits, masks = zip(*(self.answers[_key(image)] for image in images))
        return {"pred_logits": torch.stack(logits), "pred_masks": torch.stack(masks)}


def _options(data, metrics=("pq", "ap", "miou"), **options) -> EvaluationOptions:
    return EvaluationOptions(read_classes(str(data["val"])), THRESHOLDS, tuple(metrics), **options)


def _same(a: dict, b: dict) -> bool:
    """Exact equality, NaN included (undefined per-class values)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------------------------------------- merging
def test_merged_parts_equal_one_pass_exactly_in_any_order(data, batches):
    oracle = OracleModel(batches)
    whole = evaluate(oracle, batches, _options(data))
    expected = whole.compute_details()
    summary = whole.compute()
    assert 0 < summary["PQ"] < 100 and 0 < summary["AP"] < 100 and 0 < summary["mIoU"] < 100
    for split in ([0], [1, 2], [3]), ([3, 1], [0, 2]):
        parts = [pickle.loads(pickle.dumps(evaluate(oracle, [batches[i] for i in part], _options(data))))
                 for part in split]
        for order in (parts, parts[::-1]):
            merged = PartialResults(_options(data))
            for part in order:
                merged.merge(pickle.loads(pickle.dumps(part)))
            assert merged.num_images == len(batches)
            assert _same(merged.compute_details(), expected)


def test_merge_refuses_different_settings(data):
    with pytest.raises(ValueError, match="cannot merge"):
        PartialResults(_options(data)).merge(PartialResults(_options(data, ["miou"])))
    with pytest.raises(ValueError, match="cannot merge"):
        PartialResults(_options(data)).merge(PartialResults(_options(data, size=InferenceSize(*TEST_SIZE))))
    # In training only rank 0 keeps pictures: parts that differ only in that merge.
    assert PartialResults(_options(data, pictures=4)).merge(PartialResults(_options(data))).options.pictures == 4


@pytest.mark.slow  # Ray workers
def test_two_ray_workers_give_the_single_process_numbers(data, cli_run):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        distributed = evaluate_model(data["checkpoint"], data["val"], num_workers=2, test_size=TEST_SIZE,
                                     progress=False)
    finally:
        ray.shutdown()
    _, single = cli_run
    assert distributed["num_images"] == single["num_images"] == 4
    assert _same(distributed["details"], single["details"]) and _same(distributed["summary"], single["summary"])


# ---------------------------------------------------------------------------------------------- formats
def test_written_predictions_rescore_to_the_same_numbers(data, batches, tmp_path):
    folder = tmp_path / "predictions"
    results = evaluate(OracleModel(batches), batches, _options(data, predictions_folder=str(folder)))
    files = write_predictions(results)
    assert set(files) == {"panoptic_gt", "panoptic", "instances"}
    details = results.compute_details()

    def rescore(*args):
        out = tmp_path / f"{args[0]}.json"
        assert evaluate_main([*map(str, args), "--json-out", str(out)]) == 0
        return json.loads(out.read_text())

    panoptic = rescore("panoptic", "--gt-json", files["panoptic_gt"], "--pred-json", files["panoptic"])
    for group in ("All", "Things", "Stuff"):
        assert panoptic[group]["n"] == details["panoptic"][group]["n"]
        for key in ("pq", "sq", "rq"):
            assert panoptic[group][key] == pytest.approx(details["panoptic"][group][key], abs=1e-12)
    instance = rescore("instance", "--gt-json", files["panoptic_gt"], "--results-json", files["instances"])
    assert instance["AP"] == pytest.approx(details["instance"]["AP"], abs=1e-12) and instance["AP"] > 0
    semantic = rescore("semantic", "--gt-folder", folder / "semantic_gt", "--pred-folder", folder / "semantic",
                       "--num-classes", NUM_CLASSES)
    for key in ("mIoU", "pACC", "mACC", "fwIoU"):
        assert semantic[key] == details["semantic"][key]


def test_cli_run_writes_predictions_metrics_and_pictures(data, cli_run):
    out, result = cli_run
    names = {path.name for path in (out / "pictures").iterdir()}
    assert names == {"panoptic_examples.png", "instance_examples.png", "semantic_examples.png",
                     "pq_per_class.png", "ap_per_class.png", "iou_per_class.png"}
    for task in ("panoptic", "instance", "semantic"):
        with Image.open(out / "pictures" / f"{task}_examples.png") as picture:
            assert picture.format == "PNG" and picture.size == (1200, 2 * 360)  # 2 rows of image|gt|prediction
    with Image.open(out / "pictures" / "iou_per_class.png") as all_classes, \
            Image.open(out / "pictures" / "ap_per_class.png") as things_only:
        assert all_classes.width == things_only.width == 700 and all_classes.height > things_only.height
    assert json.loads((out / "metrics.json").read_text())["summary"] == result["summary"]
    semantic_pngs = sorted(p.name for p in (out / "predictions" / "semantic").glob("*.png"))
    assert semantic_pngs == sorted(p.name for p in (out / "predictions" / "semantic_gt").glob("*.png"))
    assert len(semantic_pngs) == 4
    panoptic = json.loads((out / "predictions" / "panoptic.json").read_text())
    assert {a["image_id"] for a in panoptic["annotations"]} <= {i for i in range(1, 9)}  # COCO int ids


def test_pictures_keep_the_first_images_per_task_after_merging(data, batches, tmp_path):
    oracle = OracleModel(batches)
    first = evaluate(oracle, batches[:2], _options(data, pictures=3))
    second = evaluate(oracle, batches[2:], _options(data, pictures=3))
    merged = first.merge(second)
    assert [e["name"] for e in merged.examples["panoptic"]] == [b["image_ids"][0] for b in batches[:3]]
    example = merged.examples["semantic"][0]
    assert example["image"].dtype == np.uint8 and example["image"].shape[:2] == example["gt"].shape
    paths = save_pictures(merged, tmp_path)
    with Image.open(tmp_path / "panoptic_examples.png") as picture:
        assert picture.size == (1200, 3 * 360)
    assert all(path.is_file() for path in paths) and len(paths) == 6


# ---------------------------------------------------------------------------------------------- multi-scale
def test_multiscale_flag_routes_semantic_through_the_multiscale_function(data, batches, monkeypatch):
    calls = []

    def all_class_zero(model, images, image_sizes, scales, flip, size_divisibility, size):
        calls.append((tuple(scales), flip, size_divisibility, size, list(image_sizes)))
        return [torch.nn.functional.one_hot(torch.zeros(size, dtype=torch.long), NUM_CLASSES).permute(2, 0, 1).float()
                for size in image_sizes]

    monkeypatch.setattr(pipeline.evaluation.runner, "semantic_multiscale_flip", all_class_zero)
    options = _options(data, ["miou"], semantic_multiscale=True, multiscale_scales=(0.5, 1.5), size_divisibility=32,
                       size=InferenceSize(*TEST_SIZE))
    results = evaluate(OracleModel(batches), batches, options)
    assert calls == [((0.5, 1.5), True, 32, InferenceSize(*TEST_SIZE), [tuple(b["image_sizes"][0])]) for b in batches]
    confusion = results.evaluators["miou"].confusion
    assert confusion.sum() > 0 and confusion[:, 1:].sum() == 0  # every scored pixel predicted as class 0

    calls.clear()  # the model file's dataset (ade20k) gives the official test size and multi-scale cap
    result = evaluate_model(data["checkpoint"], data["val"], metrics=["miou"], multiscale=True, progress=False)
    assert len(calls) == 4 and calls[0][:4] == (TTA_FACTORS, True, 32, InferenceSize(640, 2560, tta_max_size=4480))
    accuracy = result["details"]["semantic"]["per_class_acc"]
    assert all(value == 0 or np.isnan(value) for value in accuracy[1:])


def test_multiscale_at_scale_one_without_flip_equals_the_plain_path(data, batches):
    from model.checkpoint import load_model

    tiny = load_model(data["checkpoint"])
    for size in (None, InferenceSize(*TEST_SIZE)):
        plain = evaluate(tiny, batches, _options(data, ["miou"], size=size))
        single_scale = evaluate(tiny, batches, _options(data, ["miou"], size=size, semantic_multiscale=True,
                                                        multiscale_scales=(1.0,), multiscale_flip=False))
        assert np.array_equal(single_scale.evaluators["miou"].confusion, plain.evaluators["miou"].confusion)


def test_evaluate_job_file_scores_the_checkpoint_like_the_command(data, cli_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(data["root"]))
    job_file = tmp_path / "evaluate.yaml"
    job_file.write_text(yaml.safe_dump({
        "kind": "evaluate", "name": "evaluate_test",
        "data": {"format": "custom_coco_panoptic", "root": "raw"},
        "evaluation": {"checkpoint": "model.pt", "shards": "shards", "output": str(tmp_path / "out"),
                       "test_size": list(TEST_SIZE)},
        "tracking": {"log_pictures": 2},
    }))
    assert job_main([str(job_file)]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"] == cli_run[1]["summary"]


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_checkpoint_fails_naming_it(data, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        evaluate_model(missing, data["val"], progress=False)
    assert evaluate_main(["model", "--checkpoint", str(missing), "--shards", str(data["val"])]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_shards_folder_without_manifest_fails_with_a_hint(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest.json.*\['train', 'val'\]"):
        evaluate_model(data["checkpoint"], data["root"] / "shards", progress=False)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        evaluate_model(data["checkpoint"], tmp_path, progress=False)


def test_class_count_must_match_the_model(data, tmp_path):
    classes = json.loads((data["val"] / "manifest.json").read_text())["classes"][:4]
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    with pytest.raises(ValueError, match="predicts 10 classes but the class list .* has 4"):
        evaluate_model(data["checkpoint"], data["val"], classes=tmp_path / "classes.json", progress=False)


# ---------------------------------------------------------------------------------------------- test size
def test_the_model_sees_the_test_size_and_scores_stay_at_the_original_size(data, batches, tmp_path):
    from model.checkpoint import load_model
    from model.inference import resized_shape

    tiny = load_model(data["checkpoint"])
    inputs = []
    tiny.register_forward_hook(lambda module, args, output: inputs.append(tuple(args[0].shape)))
    folder = tmp_path / "predictions"
    results = evaluate(tiny, batches, _options(data, size=InferenceSize(*TEST_SIZE), predictions_folder=str(folder)))
    originals = [tuple(int(side) for side in batch["image_sizes"][0]) for batch in batches]
    seen = [resized_shape(*size, *TEST_SIZE) for size in originals]
    assert all(min(size) == TEST_SIZE[0] for size in seen) and seen != originals
    padded = [(1, 3, -(-height // 32) * 32, -(-width // 32) * 32) for height, width in seen]
    assert inputs == [shape for shape in padded for _ in range(3)]  # one forward per task, each at the test size
    for name, shape in (("semantic", originals), ("panoptic", originals)):
        sizes = sorted(Image.open(path).size[::-1] for path in (folder / name).glob("*.png"))
        assert sizes == sorted(shape)
    ground_truth = sum(int((batch["index_maps"][0] > 0).sum()) for batch in batches)
    assert results.evaluators["miou"].confusion.sum() == ground_truth  # every labelled pixel, at the original size


class ColourModel(torch.nn.Module):
    """A model without training whose answers depend on the image: query k predicts class k, with a mask logit
    at each stride-4 cell that is positive where the cell's mean colour lies within 40 of class k's colour
    (the synthetic dataset's classes are recognisable by colour)."""

    def __init__(self, colours: torch.Tensor):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(CONFIG.pixel_mean))
        self.register_buffer("colours", colours)

    def forward(self, images, tasks):
        cells = torch.nn.functional.avg_pool2d(images, 4)
        distance = (cells[:, None] - self.colours[None, :, :, None, None]).norm(dim=2)
        count = len(self.colours)
        logits = torch.cat([torch.eye(count) * 10, torch.full((count, 1), -10.0)], 1)
        return {"pred_logits": logits.expand(len(images), -1, -1), "pred_masks": (40 - distance) / 4}


def test_one_model_scores_differently_at_the_official_test_size_and_at_the_image_size(data, batches):
    """The stride-4 masks are coarse on the 64-96 px images as given and fine at ADE20K's test size (short side
    640): measured PQ 84.3 / AP 66.4 / mIoU 99.8 at the test size against 37.4 / 3.3 / 79.2 at the image size."""
    from model.inference import resolve_inference_size

    categories = json.loads((data["root"] / "raw" / "annotations" / "panoptic_val.json").read_text())["categories"]
    colours = torch.tensor([c["color"] for c in sorted(categories, key=lambda c: c["id"])], dtype=torch.float32)
    model = ColourModel(colours)
    official = evaluate(model, batches, _options(data, size=resolve_inference_size(CONFIG, None))).compute()
    as_given = evaluate(model, batches, _options(data, size=resolve_inference_size(CONFIG, "none"))).compute()
    for metric in ("PQ", "AP", "mIoU"):
        assert official[metric] > as_given[metric] + 15, (metric, official[metric], as_given[metric])
    assert as_given["PQ"] > 20 and as_given["mIoU"] > 50  # a model that works at both sizes, not a degenerate one


def test_model_evaluation_defaults_to_the_official_test_size_of_the_model_dataset(data):
    """The model file's dataset is ade20k, so (640, 2560) unless told otherwise; one image and mIoU only, as the
    tiny model takes about 3 s per forward at 640 on one CPU thread."""
    sizes = [evaluate_model(data["checkpoint"], data["val"], metrics=["miou"], max_images=1, test_size=test_size,
                            progress=False)["test_size"] for test_size in (None, "none", TEST_SIZE)]
    assert sizes == [[640, 2560], None, list(TEST_SIZE)]
    with pytest.raises(ValueError, match=r"0 < short side <= max size, got \(50, 40\)"):
        evaluate_model(data["checkpoint"], data["val"], test_size=(50, 40), progress=False)
    assert evaluate_main(["model", "--checkpoint", str(data["checkpoint"]), "--shards", str(data["val"]),
                          "--test-size", "640"]) == 2


@pytest.mark.parametrize(
    ("test_size", "message"),
    [([500, 400], r"evaluation: test_size must be \[short side, max size\] with 0 < short <= max, got \[500, 400\]"),
     ("official", "evaluation.test_size")],
)
def test_job_file_test_size_is_checked_when_the_job_loads(test_size, message):
    from pipeline.config import JobConfigError, parse_job

    document = {"kind": "evaluate", "name": "evaluate_test", "data": {"format": "custom_coco_panoptic", "root": "raw"},
                "evaluation": {"checkpoint": "model.pt", "shards": "shards", "test_size": test_size}}
    with pytest.raises(JobConfigError, match=message):
        parse_job(document, "evaluate.yaml")
    document["evaluation"]["test_size"] = "none"
    assert parse_job(document, "evaluate.yaml").evaluation.test_size == "none"
