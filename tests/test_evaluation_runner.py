"""Model evaluation: exact merging of Validators (across splits and Ray workers), predictions written in the
standard formats re-scored by the CLI to the same numbers, pictures, the multi-scale semantic path, and
clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import pipeline.validate
from model import make_config
from model.convert import build_from_config, save_checkpoint
from model.inference import InferenceThresholds
from pipeline.data.preprocess import run_preprocess
from pipeline.data.settings import DatasetSettings, PreprocessSettings, StreamSettings
from pipeline.data.stream import build_eval_loader
from pipeline.evaluate import main as evaluate_main
from pipeline.evaluate_model import evaluate_model, read_classes
from pipeline.job import main as job_main
from pipeline.synthetic import GeneratorSettings, generate_dataset
from pipeline.validate import DEFAULT_MULTISCALE_SCALES, Validator

NUM_CLASSES = 10  # the synthetic dataset's categories
THRESHOLDS = InferenceThresholds(object_mask_threshold=0.5, instance_top_k=50)


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
    config = make_config("tiny", num_classes=NUM_CLASSES, object_mask_threshold=0.0)
    save_checkpoint(build_from_config(config).eval(), config, root / "model.pt")
    return {"root": root, "val": root / "shards" / "val", "checkpoint": root / "model.pt"}


@pytest.fixture(scope="module")
def batches(data):
    settings = StreamSettings(augmentation="none", crop_size=32, loader_workers=0)
    return list(build_eval_loader(settings, str(data["val"]), rank=0, world_size=1))


@pytest.fixture(scope="module")
def cli_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_out")
    code = evaluate_main(["model", "--checkpoint", str(data["checkpoint"]), "--shards", str(data["val"]),
                          "--out", str(out), "--pictures", "2", "--json-out", str(out / "result.json")])
    assert code == 0
    return out, json.loads((out / "result.json").read_text())


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.float().numpy().tobytes()).hexdigest()


class OracleModel(torch.nn.Module):
    """Predicts the ground truth of the images it was built from (looked up by their pixels) at stride 4,
    with every third segment given the next class: a model whose answers are known and imperfect."""

    def __init__(self, batches: list[dict], num_queries: int = 32):
        super().__init__()
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


def _validator(data, **options) -> Validator:
    return Validator(read_classes(str(data["val"])), THRESHOLDS, ["pq", "ap", "miou"], **options)


def _evaluate(validator: Validator, model, batches) -> Validator:
    for batch in batches:
        validator.add_batch(model, batch, torch.device("cpu"), torch.float32)
    return validator


def _same(a: dict, b: dict) -> bool:
    """Exact equality, NaN included (undefined per-class values)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------------------------------------- merging
def test_merged_parts_equal_one_pass_exactly_in_any_order(data, batches):
    oracle = OracleModel(batches)
    whole = _evaluate(_validator(data), oracle, batches)
    expected = whole.compute_details()
    summary = whole.compute()
    assert 0 < summary["PQ"] < 100 and 0 < summary["AP"] < 100 and 0 < summary["mIoU"] < 100
    for split in ([0], [1, 2], [3]), ([3, 1], [0, 2]):
        parts = [pickle.loads(pickle.dumps(_evaluate(_validator(data), oracle, [batches[i] for i in part])))
                 for part in split]
        for order in (parts, parts[::-1]):
            merged = _validator(data)
            for part in order:
                merged.merge(pickle.loads(pickle.dumps(part)))
            assert merged.num_images == len(batches)
            assert _same(merged.compute_details(), expected)


def test_merge_refuses_different_settings(data):
    with pytest.raises(ValueError, match="cannot merge"):
        _validator(data).merge(Validator(read_classes(str(data["val"])), THRESHOLDS, ["miou"]))


def test_two_ray_workers_give_the_single_process_numbers(data, cli_run):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        distributed = evaluate_model(data["checkpoint"], data["val"], num_workers=2, progress=False)
    finally:
        ray.shutdown()
    _, single = cli_run
    assert distributed["num_images"] == single["num_images"] == 4
    assert _same(distributed["details"], single["details"]) and _same(distributed["summary"], single["summary"])


# ---------------------------------------------------------------------------------------------- formats
def test_written_predictions_rescore_to_the_same_numbers(data, batches, tmp_path):
    folder = tmp_path / "predictions"
    validator = _evaluate(_validator(data, predictions_folder=folder), OracleModel(batches), batches)
    files = validator.write_predictions()
    assert set(files) == {"panoptic_gt", "panoptic", "instances"}
    details = validator.compute_details()

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
    first = _evaluate(_validator(data, pictures=3), oracle, batches[:2])
    second = _evaluate(_validator(data, pictures=3), oracle, batches[2:])
    merged = first.merge(second)
    assert [e["name"] for e in merged.examples["panoptic"]] == [b["image_ids"][0] for b in batches[:3]]
    example = merged.examples["semantic"][0]
    assert example["image"].dtype == np.uint8 and example["image"].shape[:2] == example["gt"].shape
    paths = merged.save_pictures(tmp_path)
    with Image.open(tmp_path / "panoptic_examples.png") as picture:
        assert picture.size == (1200, 3 * 360)
    assert all(path.is_file() for path in paths) and len(paths) == 6


# ---------------------------------------------------------------------------------------------- multi-scale
def test_multiscale_flag_routes_semantic_through_the_multiscale_function(data, batches, monkeypatch):
    calls = []

    def all_class_zero(model, images, image_sizes, scales, flip, size_divisibility):
        calls.append((tuple(scales), flip, size_divisibility, list(image_sizes)))
        return [torch.nn.functional.one_hot(torch.zeros(size, dtype=torch.long), NUM_CLASSES).permute(2, 0, 1).float()
                for size in image_sizes]

    monkeypatch.setattr(pipeline.validate, "semantic_multiscale_flip", all_class_zero)
    validator = Validator(read_classes(str(data["val"])), THRESHOLDS, ["miou"], semantic_multiscale=True,
                          multiscale_scales=(0.5, 1.5), size_divisibility=32)
    _evaluate(validator, OracleModel(batches), batches)
    assert calls == [((0.5, 1.5), True, 32, [tuple(b["image_sizes"][0])]) for b in batches]
    confusion = validator.evaluators["miou"].confusion
    assert confusion.sum() > 0 and confusion[:, 1:].sum() == 0  # every scored pixel predicted as class 0

    calls.clear()
    result = evaluate_model(data["checkpoint"], data["val"], metrics=["miou"], multiscale=True, progress=False)
    assert len(calls) == 4 and calls[0][:3] == (DEFAULT_MULTISCALE_SCALES, True, 32)
    accuracy = result["details"]["semantic"]["per_class_acc"]
    assert all(value == 0 or np.isnan(value) for value in accuracy[1:])


def test_multiscale_at_scale_one_without_flip_equals_the_plain_path(data, batches):
    from model.convert import load_checkpoint

    tiny = load_checkpoint(data["checkpoint"])
    classes = read_classes(str(data["val"]))
    plain = _evaluate(Validator(classes, THRESHOLDS, ["miou"]), tiny, batches)
    single_scale = _evaluate(Validator(classes, THRESHOLDS, ["miou"], semantic_multiscale=True,
                                       multiscale_scales=(1.0,), multiscale_flip=False), tiny, batches)
    assert np.array_equal(single_scale.evaluators["miou"].confusion, plain.evaluators["miou"].confusion)


def test_evaluate_job_file_scores_the_checkpoint_like_the_command(data, cli_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(data["root"]))
    job_file = tmp_path / "evaluate.yaml"
    job_file.write_text(yaml.safe_dump({
        "kind": "evaluate", "name": "evaluate_test",
        "data": {"format": "custom_coco_panoptic", "root": "raw"},
        "evaluation": {"checkpoint": "model.pt", "shards": "shards", "output": str(tmp_path / "out")},
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
