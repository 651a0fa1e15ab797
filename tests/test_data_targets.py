"""Readers, compact targets, text lists and the shard schema, checked against an independent derivation
from the raw PNG + JSON of each real format (no Ray: the 'local' executor writes the shards)."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch
from dataset_layouts import relayout
from panopticapi.utils import rgb2id
from PIL import Image

from model.texts import TASKS, TextTokenTable, text_list
from model.tokenizer import tokenize
from pipeline.data.preprocess import PreprocessError, run_preprocess
from pipeline.data.readers import read_split
from pipeline.data.settings import DatasetSettings, PreprocessSettings
from pipeline.data.shards import SchemaVersionError, decode_sample, read_manifest
from pipeline.data.targets import task_targets
from pipeline.synthetic import generate_dataset

FORMATS = ("custom_coco_panoptic", "coco_panoptic", "ade20k_panoptic", "cityscapes_panoptic")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, num_images=8, seed=3, val_fraction=0.25)
    return str(root)


def _dataset(tmp_path_factory, synthetic_root, dataset_format):
    if dataset_format == "custom_coco_panoptic":
        return DatasetSettings(format=dataset_format, root=synthetic_root)
    root = tmp_path_factory.mktemp(dataset_format)
    relayout(synthetic_root, str(root), dataset_format)
    return DatasetSettings(format=dataset_format, root=str(root))


def _local(output, **overrides):
    return PreprocessSettings(output=str(output), executor="local", show_progress=False, **overrides)


def _tar_samples(path):
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key, "__url__": path})[extension] = tar.extractfile(member).read()
    return list(samples.values())


def _shard_samples(folder):
    return [s for name in sorted(os.listdir(folder)) if name.endswith(".tar") for s in _tar_samples(f"{folder}/{name}")]


def _independent_targets(ids, segments, categories, task):
    """From the raw id map + JSON only: (labels, masks) in the order the pipeline promises."""
    contiguous = {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
    thing = {c["id"]: bool(c["isthing"]) for c in categories}
    kept = [s for s in segments if not s["iscrowd"] and (ids == s["id"]).any()]
    if task == "instance":
        kept = [s for s in kept if thing[s["category_id"]]]
    if task != "semantic":
        order = sorted(kept, key=lambda s: s["id"])  # the segment table is sorted by raw id
        return [contiguous[s["category_id"]] for s in order], [ids == s["id"] for s in order]
    labels = sorted({contiguous[s["category_id"]] for s in kept})
    masks = [np.isin(ids, [s["id"] for s in kept if contiguous[s["category_id"]] == label]) for label in labels]
    return labels, masks


@pytest.mark.parametrize("dataset_format", FORMATS)
def test_targets_equal_independent_derivation_for_every_format(tmp_path_factory, synthetic_root, dataset_format):
    dataset = _dataset(tmp_path_factory, synthetic_root, dataset_format)
    output = tmp_path_factory.mktemp(f"shards_{dataset_format}")
    run_preprocess(dataset, _local(output, target_shard_mb=0.05))
    split = read_split(dataset, "train")
    with open(split.annotation_json) as handle:
        document = json.load(handle)
    raw = {str(a["image_id"]): a for a in document["annotations"]}
    samples = [decode_sample(s) for s in _shard_samples(f"{output}/train")]
    assert sorted(s.image_id for s in samples) == sorted(raw)
    assert read_manifest(__import__("fsspec").filesystem("file"), f"{output}/train")["num_samples"] == len(raw)
    crop = (slice(10, 120), slice(30, 150))  # any crop is a slice of the stored map
    saw_crowd = False
    for sample in samples:
        record = next(r for r in split.records if r.image_id == sample.image_id)
        ids = rgb2id(np.asarray(Image.open(record.panoptic_path).convert("RGB")))
        segments = raw[sample.image_id]["segments_info"]
        saw_crowd |= any(s["iscrowd"] for s in segments)
        for window in ((slice(None), slice(None)), crop):
            for task in TASKS:
                labels, masks = task_targets(sample.index_map[window], sample.table, task)
                want_labels, want_masks = _independent_targets(ids[window], segments, document["categories"], task)
                assert labels.tolist() == want_labels, (sample.image_id, task)
                assert torch.equal(masks, torch.from_numpy(np.array(want_masks, bool).reshape(masks.shape)))
    assert saw_crowd, "fixture should contain crowd segments"


def test_crowd_pixels_never_supervised(tmp_path, synthetic_root):
    run_preprocess(DatasetSettings(format="custom_coco_panoptic", root=synthetic_root), _local(tmp_path))
    crowd_images = 0
    for raw in _shard_samples(f"{tmp_path}/train") + _shard_samples(f"{tmp_path}/val"):
        sample = decode_sample(raw)
        crowd_values = np.nonzero(sample.table.iscrowd)[0] + 1
        if len(crowd_values) == 0:
            continue
        crowd_images += 1
        crowd_pixels = torch.from_numpy(np.isin(sample.index_map, crowd_values))
        for task in TASKS:
            _, masks = task_targets(sample.index_map, sample.table, task)
            assert not (masks & crowd_pixels).any(), task
    assert crowd_images > 0


def test_text_list_follows_spec():
    names = ("cat", "sky", "dog")
    # Classes walked in dataset order, one entry per GT mask, then the task's padding text.
    assert text_list(torch.tensor([2, 0, 2]), "instance", names, 5) == [
        "a photo with a cat", "a photo with a dog", "a photo with a dog", "an instance photo", "an instance photo"
    ]
    assert text_list(torch.tensor([1, 0, 2, 2]), "semantic", names, 2) == ["a photo with a cat", "a photo with a sky"]
    assert text_list(torch.tensor([], dtype=torch.int64), "panoptic", names, 2) == ["a panoptic photo"] * 2
    table = TextTokenTable(names, 6)
    for labels in (torch.tensor([2, 0, 2, 1]), torch.tensor([0, 0, 0, 0, 0, 0, 0, 1])):
        for task in TASKS:
            assert torch.equal(table.tokens(labels, task), tokenize(text_list(labels, task, names, 6)))


def test_category_metadata_comes_from_the_json(synthetic_root):
    split = read_split(DatasetSettings(format="custom_coco_panoptic", root=synthetic_root), "train")
    with open(split.annotation_json) as handle:
        categories = sorted(json.load(handle)["categories"], key=lambda c: c["id"])
    assert split.classes.category_ids == tuple(c["id"] for c in categories)
    assert split.classes.names == tuple(c["name"] for c in categories)
    assert split.classes.isthing == tuple(bool(c["isthing"]) for c in categories)
    with pytest.raises(ValueError, match="expected_num_classes"):
        read_split(DatasetSettings(format="custom_coco_panoptic", root=synthetic_root, expected_num_classes=3), "train")


def _break_inputs(root):
    """Copy of the dataset with three bad train samples: a corrupt JPEG, a PNG id absent from the JSON,
    and an unknown category."""
    split = read_split(DatasetSettings(format="custom_coco_panoptic", root=root), "train")
    first, second, third = split.records[:3]
    with open(first.image_path, "wb") as handle:
        handle.write(b"\xff\xd8not a jpeg")
    ids = rgb2id(np.asarray(Image.open(second.panoptic_path).convert("RGB")))
    ids[:4, :4] = 424242
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(second.panoptic_path)
    path = os.path.join(root, "annotations", "panoptic_train.json")
    with open(path) as handle:
        document = json.load(handle)
    annotation = next(a for a in document["annotations"] if str(a["image_id"]) == third.image_id)
    annotation["segments_info"][0]["category_id"] = 999
    with open(path, "w") as handle:
        json.dump(document, handle)
    return first, second, third


def test_bad_input_fails_with_file_and_reason_or_is_skipped_and_counted(tmp_path):
    root = tmp_path / "raw"
    generate_dataset(root, num_images=6, seed=5, val_fraction=0.2)
    first, second, third = _break_inputs(str(root))
    dataset = DatasetSettings(format="custom_coco_panoptic", root=str(root), train_split="train", val_split="val")
    with pytest.raises(PreprocessError, match=f"{first.image_path}.*corrupt image"):
        run_preprocess(dataset, _local(tmp_path / "fail", splits=["train"]))
    assert not [n for n in os.listdir(tmp_path / "fail" / "train") if n.endswith(".tar")]
    summary = run_preprocess(dataset, _local(tmp_path / "skip", splits=["train"], on_error="skip"))[0]
    assert summary["num_skipped"] == 3
    manifest = json.loads((tmp_path / "skip" / "train" / "manifest.json").read_text())
    reasons = {problem["image_id"]: problem["reason"] for problem in manifest["skipped"]}
    assert "corrupt image" in reasons[first.image_id]
    assert "424242" in reasons[second.image_id] and "not in the JSON" in reasons[second.image_id]
    assert "unknown category ids [999]" in reasons[third.image_id]
    written = {decode_sample(s).image_id for s in _shard_samples(str(tmp_path / "skip" / "train"))}
    assert written.isdisjoint(reasons) and len(written) == manifest["num_samples"] > 0


def test_other_schema_versions_are_refused(tmp_path, synthetic_root):
    import fsspec

    run_preprocess(DatasetSettings(format="custom_coco_panoptic", root=synthetic_root), _local(tmp_path, splits=["val"]))
    manifest_path = tmp_path / "val" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(SchemaVersionError, match="version 99.*reads version 1"):
        read_manifest(fsspec.filesystem("file"), str(tmp_path / "val"))
    raw = _shard_samples(str(tmp_path / "val"))[0]
    meta = json.loads(raw["meta.json"])
    raw["meta.json"] = json.dumps({**meta, "schema_version": 0}).encode()
    with pytest.raises(SchemaVersionError, match="version 0"):
        decode_sample(raw)


def test_wide_segment_tables_use_16_bit_maps():
    from pipeline.data.readers import ClassInfo
    from pipeline.data.shards import decode_index_map, encode_index_map
    from pipeline.data.targets import encode_panoptic

    ids = np.arange(1, 301, dtype=np.int64).reshape(15, 20)
    segments = [{"id": int(i), "category_id": 7, "iscrowd": 0} for i in range(1, 301)]
    index_map, table = encode_panoptic(ids, segments, ClassInfo((7,), ("thing",), (True,)))
    assert index_map.dtype == np.uint16 and len(table) == 300
    assert np.array_equal(decode_index_map(encode_index_map(index_map)), index_map)
    _, masks = task_targets(index_map, table, "panoptic")
    assert masks.shape == (300, 15, 20) and torch.equal(masks.sum(0), torch.ones(15, 20, dtype=torch.long))


def test_padded_targets_keep_padding_out_of_every_mask():
    from pipeline.data.targets import SegmentTable

    index_map = np.array([[1, 1, 2], [3, 0, 2]], np.uint8)
    table = SegmentTable(np.array([10, 20, 30]), np.array([4, 1, 4]), np.array([True, False, True]),
                         np.zeros(3, bool))
    for task in TASKS:
        labels, masks = task_targets(index_map, table, task)
        padded_labels, padded = task_targets(index_map, table, task, padded_shape=(4, 5))
        assert torch.equal(labels, padded_labels) and padded.shape == (len(labels), 4, 5)
        assert torch.equal(padded[:, :2, :3], masks) and not padded[:, 2:].any() and not padded[:, :, 3:].any()
    assert task_targets(index_map, table, "semantic")[0].tolist() == [1, 4]
    with pytest.raises(ValueError, match="padded_shape"):
        task_targets(index_map, table, "panoptic", padded_shape=(1, 5))
    with pytest.raises(ValueError, match="index_map values"):
        task_targets(np.array([[4]]), table, "panoptic")
