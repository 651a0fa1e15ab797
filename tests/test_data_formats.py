"""COCO instance JSON and semantic label PNGs preprocess to the panoptic shard schema: decoded shard segments
equal the source annotations pixel by pixel (overlaps resolved smaller-over-larger, crowd kept as crowd, void
where no annotation is), bad annotations follow on_error and are counted, and the tasks and metrics follow
what the data has (things only, stuff only)."""

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from model.inference import InferenceThresholds
from pipeline.data.preprocess import PreprocessError, run_preprocess
from pipeline.data.readers import ClassInfo
from pipeline.data.settings import DatasetSettings, PreprocessSettings, StreamSettings
from pipeline.data.shards import decode_sample
from pipeline.data.stream import ModelInputs, build_train_loader
from pipeline.data.targets import data_tasks
from pipeline.evaluation.runner import EvaluationOptions, PartialResults, ground_truth_segments
from pipeline.synthetic import GeneratorSettings, generate_dataset

SIZES = GeneratorSettings(min_size=64, max_size=96)


def _preprocess(root, dataset_format, output, **settings):
    dataset = DatasetSettings(format=dataset_format, root=str(root), **settings.pop("data", {}))
    return run_preprocess(
        dataset,
        PreprocessSettings(
            output=str(output), executor="local", show_progress=False, target_shard_mb=0.05, **settings
        ),
    )


def _decoded(split_folder: Path) -> dict:
    """image id -> DecodedSample of every sample in the split's shards."""
    samples = {}
    for tar_path in sorted(split_folder.glob("*.tar")):
        grouped: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                grouped.setdefault(key, {"__key__": key})[extension] = tar.extractfile(member).read()
        for raw in grouped.values():
            sample = decode_sample(raw)
            samples[sample.image_id] = sample
    return samples


def _shard_ids(sample) -> np.ndarray:
    """The raw segment id of every pixel (0 = void)."""
    return np.concatenate([[0], sample.table.segment_ids])[sample.index_map]


def _manifest(split_folder: Path) -> dict:
    return json.loads((split_folder / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------- COCO instances
@pytest.fixture(scope="module")
def instance_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("instances")
    generate_dataset(
        root, num_images=8, seed=11, val_fraction=0.25, settings=SIZES, dataset_format="coco_instances"
    )
    return root


def _expected_instance_ids(coco: COCO, image_id: int, left_out=()) -> tuple[np.ndarray, int]:
    """Per pixel, of the annotations covering it, the one with the fewest pixels (equal ones: the larger
    annotation id), void where none does - stated per pixel, independently of how preprocessing paints.
    Also the number of pixels two or more annotations cover."""
    annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if a["id"] not in left_out]
    masks = np.stack([coco.annToMask(a).astype(bool) for a in annotations])
    ids = np.array([a["id"] for a in annotations])
    priority = np.empty(len(ids), np.int64)
    priority[np.lexsort((-ids, masks.sum((1, 2))))] = np.arange(len(ids))  # 0 = on top
    owner = np.where(masks, priority[:, None, None], len(ids)).argmin(0)
    return np.where(masks.any(0), ids[owner], 0), int((masks.sum(0) > 1).sum())


def _check_instance_shards(coco: COCO, split_folder: Path, left_out=()) -> dict:
    """Every shard sample equals its source annotations; returns totals of what was compared."""
    manifest = _manifest(split_folder)
    classes = ClassInfo.from_json(manifest["classes"])
    annotations = {a["id"]: a for a in coco.dataset["annotations"]}
    totals = {"images": 0, "overlap_pixels": 0, "crowd": 0}
    for image_id, sample in _decoded(split_folder).items():
        expected, overlap = _expected_instance_ids(coco, int(image_id), left_out)
        np.testing.assert_array_equal(_shard_ids(sample), expected, err_msg=f"image {image_id}")
        for row, segment_id in enumerate(sample.table.segment_ids):
            source = annotations[int(segment_id)]
            assert sample.table.classes[row] == classes.contiguous_id(source["category_id"])
            assert sample.table.iscrowd[row] == bool(source["iscrowd"]) and sample.table.isthing[row]
            totals["crowd"] += int(source["iscrowd"])
        totals["images"] += 1
        totals["overlap_pixels"] += overlap
    assert totals["images"] == manifest["num_samples"]
    return totals


def test_instances_preprocess_to_segments_equal_to_the_annotations(instance_root, tmp_path):
    summary = _preprocess(instance_root, "coco_instances", tmp_path / "shards")
    assert [s["num_skipped_annotations"] for s in summary] == [0, 0]
    coco = COCO(str(instance_root / "annotations" / "instances_train.json"))
    kinds = {
        ("crowd" if a["iscrowd"] else "rle") if isinstance(a["segmentation"], dict) else "polygon"
        for a in coco.dataset["annotations"]
    }
    assert kinds == {"polygon", "rle", "crowd"}, "the generator writes every encoding"
    assert any(
        isinstance(a["segmentation"]["counts"], list) for a in coco.dataset["annotations"] if a["iscrowd"]
    )
    totals = _check_instance_shards(coco, tmp_path / "shards" / "train")
    assert totals["images"] == 6 and totals["overlap_pixels"] > 0 and totals["crowd"] > 0
    manifest = _manifest(tmp_path / "shards" / "train")
    assert manifest["dataset_format"] == "coco_instances"
    assert [c["name"] for c in manifest["classes"]] == [
        "disc",
        "square",
        "triangle",
        "ring",
        "cross",
        "diamond",
    ]
    assert all(c["isthing"] for c in manifest["classes"])


def _add_bad_annotations(json_path: Path) -> dict[int, str]:
    """Bad annotations on the first image; returns their ids and a word of each reason."""
    document = json.loads(json_path.read_text())
    image = document["images"][0]
    height, width = image["height"], image["width"]
    square = [2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]
    bad = [
        ({"segmentation": [[2.0, 2.0, 9.0, 9.0]], "bbox": [2, 2, 7, 7], "category_id": 1}, "fewer than 3"),
        ({"segmentation": [square], "bbox": [width - 5, 2, 18, 18], "category_id": 1}, "outside"),
        ({"segmentation": [square], "bbox": [2, 2, 18, 18], "category_id": 999}, "unknown category"),
        (
            {"segmentation": {"size": [height + 1, width], "counts": [5, 5]}, "category_id": 2, "iscrowd": 1},
            "RLE size",
        ),
    ]
    for number, (fields, _) in enumerate(bad):
        document["annotations"].append(
            {"id": 9001 + number, "image_id": image["id"], "iscrowd": 0, "area": 1.0, **fields}
        )
    json_path.write_text(json.dumps(document))
    return {9001 + number: reason for number, (_, reason) in enumerate(bad)}


def test_bad_annotations_follow_on_error_and_are_counted(instance_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(instance_root, root)
    json_path = root / "annotations" / "instances_train.json"
    bad = _add_bad_annotations(json_path)
    with pytest.raises(
        PreprocessError,
        match=r"annotation 9001 of image 1 in .*instances_train\.json: polygon 0 "
        r"has 2 points \(fewer than 3.*4 bad annotations",
    ):
        _preprocess(root, "coco_instances", tmp_path / "failed", splits=["train"])
    summary = _preprocess(root, "coco_instances", tmp_path / "shards", splits=["train"], on_error="skip")[0]
    manifest = _manifest(tmp_path / "shards" / "train")
    assert summary["num_skipped_annotations"] == manifest["num_skipped_annotations"] == 4
    for entry in manifest["skipped_annotations"]:
        assert bad[entry["annotation_id"]] in entry["reason"] and entry["image_id"] == "1"
    # The good annotations of the same image are all there, the bad ones nowhere.
    totals = _check_instance_shards(COCO(str(json_path)), tmp_path / "shards" / "train", left_out=set(bad))
    assert totals["images"] == 6 and summary["num_skipped"] == 0


def test_an_image_without_usable_annotations_is_skipped_and_counted(instance_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(instance_root, root)
    json_path = root / "annotations" / "instances_train.json"
    document = json.loads(json_path.read_text())
    first = document["images"][0]["id"]
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] != first]
    json_path.write_text(json.dumps(document))
    summary = _preprocess(root, "coco_instances", tmp_path / "shards", splits=["train"])[0]
    manifest = _manifest(tmp_path / "shards" / "train")
    assert (summary["num_samples"], summary["num_skipped"]) == (5, 1)
    assert manifest["skipped"][0]["reason"] == "no usable annotation"


# ---------------------------------------------------------------------------------------------- semantic PNGs
@pytest.fixture(scope="module")
def semantic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("semantic")
    generate_dataset(
        root, num_images=8, seed=11, val_fraction=0.25, settings=SIZES, dataset_format="semantic_png"
    )
    return root


def _check_semantic_shards(root: Path, split_folder: Path, ignore_label: int) -> int:
    lines = (root / "classes.txt").read_text().splitlines()
    manifest = _manifest(split_folder)
    names = [c["name"] for c in manifest["classes"]]
    samples = _decoded(split_folder)
    for image_id, sample in samples.items():
        labels = np.asarray(Image.open(root / "labels" / "train" / f"{image_id}.png")).astype(np.int64)
        np.testing.assert_array_equal(sample.index_map == 0, labels == ignore_label)
        present = sorted(set(np.unique(labels).tolist()) - {ignore_label})
        assert len(sample.table) == len(present)
        for row in range(len(sample.table)):
            value = lines.index(names[sample.table.classes[row]])
            np.testing.assert_array_equal(
                sample.index_map == row + 1, labels == value, err_msg=f"{image_id} {value}"
            )
            assert not sample.table.isthing[row] and not sample.table.iscrowd[row]
    return len(samples)


def test_semantic_pngs_preprocess_to_one_segment_per_class(semantic_root, tmp_path):
    summary = _preprocess(semantic_root, "semantic_png", tmp_path / "shards")
    assert [s["num_samples"] for s in summary] == [6, 2]
    manifest = _manifest(tmp_path / "shards" / "train")
    assert [c["name"] for c in manifest["classes"]] == (semantic_root / "classes.txt").read_text().split()
    assert not any(c["isthing"] for c in manifest["classes"])
    assert _check_semantic_shards(semantic_root, tmp_path / "shards" / "train", 255) == 6


def test_semantic_ignore_label_is_configurable(semantic_root, tmp_path):
    """The ADE20K convention: label 0 is unlabelled (its line names no class), classes are 1..K."""
    root = tmp_path / "raw"
    shutil.copytree(semantic_root, root)
    lines = (root / "classes.txt").read_text().splitlines()
    (root / "classes.txt").write_text("\n".join(["unlabelled", *lines]) + "\n")
    for path in (root / "labels" / "train").glob("*.png"):
        labels = np.asarray(Image.open(path)).astype(np.int64)
        Image.fromarray(np.where(labels == 255, 0, labels + 1).astype(np.uint8)).save(path)
    _preprocess(root, "semantic_png", tmp_path / "shards", splits=["train"], data={"ignore_label": 0})
    manifest = _manifest(tmp_path / "shards" / "train")
    assert [c["category_id"] for c in manifest["classes"]] == list(range(1, 11))
    assert [c["name"] for c in manifest["classes"]] == lines
    assert _check_semantic_shards(root, tmp_path / "shards" / "train", 0) == 6


def test_bad_label_pngs_follow_on_error_and_are_counted(semantic_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(semantic_root, root)
    labels = sorted((root / "labels" / "train").glob("*.png"))
    unknown = np.asarray(Image.open(labels[0])).copy()
    unknown[:4, :4] = 77
    Image.fromarray(unknown).save(labels[0])
    Image.open(labels[1]).convert("RGB").save(labels[1])
    labels[2].unlink()
    with pytest.raises(PreprocessError, match=rf"{labels[0].name}.*label values \[77\]"):
        _preprocess(root, "semantic_png", tmp_path / "failed", splits=["train"])
    summary = _preprocess(root, "semantic_png", tmp_path / "shards", splits=["train"], on_error="skip")[0]
    reasons = [s["reason"] for s in _manifest(tmp_path / "shards" / "train")["skipped"]]
    assert (summary["num_samples"], summary["num_skipped"]) == (3, 3)
    assert any("label values [77]" in r for r in reasons) and any("mode RGB" in r for r in reasons)
    assert any("cannot read" in r and labels[2].name in r for r in reasons)


def test_class_list_problems_name_the_file(semantic_root, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(semantic_root, root)
    (root / "classes.txt").write_text("disc\n\nsquare\n")
    with pytest.raises(ValueError, match=r"classes\.txt: line 2 is blank"):
        _preprocess(root, "semantic_png", tmp_path / "shards")
    with pytest.raises(FileNotFoundError, match="class list .*absent.txt"):
        _preprocess(root, "semantic_png", tmp_path / "shards", data={"class_list": "absent.txt"})


# --------------------------------------------------------------------------------------------- tasks, metrics
def _drawn_tasks(split_folder: Path, batches: int = 10) -> set[str]:
    settings = StreamSettings(
        augmentation="none", crop_size=64, batch_size=2, loader_workers=0, shuffle_buffer=1
    )
    loader = build_train_loader(
        settings, ModelInputs(16, 32, (123.675, 116.28, 103.53)), str(split_folder), 0, 1
    )
    tasks = set()
    for number, batch in enumerate(loader):
        tasks.update(batch["tasks"])
        if number + 1 == batches:
            return tasks
    return tasks


def test_tasks_follow_the_data(instance_root, semantic_root, tmp_path, caplog):
    _preprocess(instance_root, "coco_instances", tmp_path / "instances", splits=["train"])
    _preprocess(semantic_root, "semantic_png", tmp_path / "semantic", splits=["train"])
    with caplog.at_level(logging.INFO, logger="pipeline.data.stream"):
        assert _drawn_tasks(tmp_path / "instances" / "train") == {"semantic", "instance", "panoptic"}
        assert _drawn_tasks(tmp_path / "semantic" / "train") == {"semantic", "panoptic"}
    logged = " | ".join(record.getMessage() for record in caplog.records)
    assert "no stuff class: panoptic = things + void" in logged
    assert "semantic 0.49, panoptic 0.51 (10 classes, no thing class: no instance task" in logged
    classes = ClassInfo.from_json(_manifest(tmp_path / "semantic" / "train")["classes"])
    assert data_tasks(classes) == ("semantic", "panoptic")


def _perfect_panoptic_summary(split_folder: Path) -> tuple[tuple[str, ...], dict]:
    """Metrics kept for the data, and the summary of predictions equal to the ground truth."""
    classes = ClassInfo.from_json(_manifest(split_folder)["classes"])
    options = EvaluationOptions(
        classes=classes, thresholds=InferenceThresholds(0.8, 100, 0.8), metrics=("pq", "ap", "miou")
    )
    results = PartialResults(options)
    for image_id, sample in _decoded(split_folder).items():
        segments = ground_truth_segments(sample.index_map, sample.table)
        predicted = [
            {key: s[key] for key in ("id", "category_id", "isthing")} for s in segments if not s["iscrowd"]
        ]
        crowd = [s["id"] for s in segments if s["iscrowd"]]
        prediction = np.where(np.isin(sample.index_map, crowd), 0, sample.index_map)
        results.evaluators["pq"].update(sample.index_map, segments, prediction, predicted, image_id=image_id)
    return options.metrics, results.compute()


def test_evaluation_reports_what_the_data_supports(instance_root, semantic_root, tmp_path):
    _preprocess(instance_root, "coco_instances", tmp_path / "instances", splits=["val"])
    _preprocess(semantic_root, "semantic_png", tmp_path / "semantic", splits=["val"])
    metrics, summary = _perfect_panoptic_summary(tmp_path / "instances" / "val")
    assert metrics == ("pq", "ap", "miou") and {"PQ", "PQ_th", "AP", "mIoU"} <= set(summary)
    assert (summary["PQ"], summary["PQ_th"]) == (100.0, 100.0) and not any(k.endswith("_st") for k in summary)
    metrics, summary = _perfect_panoptic_summary(tmp_path / "semantic" / "val")
    assert metrics == ("pq", "miou") and {"PQ", "PQ_st", "mIoU"} <= set(summary) and "AP" not in summary
    assert (summary["PQ"], summary["PQ_st"]) == (100.0, 100.0) and not any(k.endswith("_th") for k in summary)
