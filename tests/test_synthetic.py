"""The synthetic dataset is real COCO panoptic: readers from panopticapi and pycocotools accept it, the PNG ids
match the JSON, the geometry is right, and the same seed gives the same bytes."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.synthetic import GeneratorSettings, generate_dataset

NUM_IMAGES = 14


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    paths = generate_dataset(out, NUM_IMAGES, seed=7, val_fraction=0.25)
    return out, {split: json.loads(path.read_text()) for split, path in paths.items()}


def _segment_ids(out: Path, split: str, annotation: dict) -> np.ndarray:
    # panopticapi's own decoder, so the test does not share the generator's encoding code.
    return rgb2id(np.array(Image.open(out / "annotations" / f"panoptic_{split}" / annotation["file_name"])))


def test_splits_partition_the_images(dataset):
    _, documents = dataset
    ids = {split: {image["id"] for image in doc["images"]} for split, doc in documents.items()}
    assert set(documents) == {"train", "val"}
    assert len(ids["val"]) == round(NUM_IMAGES * 0.25)
    assert ids["train"].isdisjoint(ids["val"])
    assert ids["train"] | ids["val"] == set(range(1, NUM_IMAGES + 1))


def test_png_ids_match_segments_with_exact_area_and_bbox(dataset):
    out, documents = dataset
    for split, doc in documents.items():
        images = {image["id"]: image for image in doc["images"]}
        for annotation in doc["annotations"]:
            ids = _segment_ids(out, split, annotation)
            image = images[annotation["image_id"]]
            assert ids.shape == (image["height"], image["width"])
            rgb = Image.open(out / split / image["file_name"])
            assert rgb.mode == "RGB" and rgb.size == (image["width"], image["height"])
            present = set(np.unique(ids).tolist()) - {0}
            listed = [segment["id"] for segment in annotation["segments_info"]]
            assert len(listed) == len(set(listed))
            assert present == set(listed)
            for segment in annotation["segments_info"]:
                rows, cols = np.nonzero(ids == segment["id"])
                assert segment["area"] == rows.size
                assert segment["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_content_has_what_training_needs(dataset):
    out, documents = dataset
    categories = {c["id"]: c for c in documents["train"]["categories"]}
    assert sorted(categories) != list(range(1, len(categories) + 1)), "ids should be non-contiguous like COCO"
    segments = [s for doc in documents.values() for a in doc["annotations"] for s in a["segments_info"]]
    assert {s["category_id"] for s in segments} == set(categories)
    assert any(s["iscrowd"] for s in segments)
    per_image_things = [
        sum(categories[s["category_id"]]["isthing"] and not s["iscrowd"] for s in a["segments_info"])
        for doc in documents.values() for a in doc["annotations"]
    ]
    assert max(per_image_things) >= 3
    sizes = {(i["height"], i["width"]) for doc in documents.values() for i in doc["images"]}
    assert len(sizes) > NUM_IMAGES // 2
    assert any(i["height"] != i["width"] for doc in documents.values() for i in doc["images"])
    void_images = 0
    touching_pairs = 0
    for split, doc in documents.items():
        for annotation in doc["annotations"]:
            ids = _segment_ids(out, split, annotation)
            void_images += bool((ids == 0).any())
            things = {s["id"] for s in annotation["segments_info"] if categories[s["category_id"]]["isthing"]}
            right = np.stack([ids[:, :-1], ids[:, 1:]], -1).reshape(-1, 2)
            down = np.stack([ids[:-1], ids[1:]], -1).reshape(-1, 2)
            pairs = {tuple(p) for p in np.concatenate([right, down]) if p[0] != p[1]}
            touching_pairs += sum(a in things and b in things for a, b in pairs)
    assert void_images > 0
    assert touching_pairs > 0, "some thing instances should touch or overlap"


def test_pycocotools_reads_the_segments_as_instances(dataset):
    out, documents = dataset
    doc = documents["train"]
    annotations = []
    masks = {}
    for annotation in doc["annotations"]:
        ids = _segment_ids(out, "train", annotation)
        for segment in annotation["segments_info"]:
            mask = ids == segment["id"]
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": segment["id"], "image_id": annotation["image_id"], "segmentation": rle,
                                "category_id": segment["category_id"], "area": segment["area"],
                                "bbox": segment["bbox"], "iscrowd": segment["iscrowd"]})
            masks[segment["id"]] = mask
    coco = COCO()
    coco.dataset = {"images": doc["images"], "annotations": annotations, "categories": doc["categories"]}
    coco.createIndex()
    assert len(coco.getImgIds()) == len(doc["images"])
    for ann in coco.loadAnns(coco.getAnnIds()):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), masks[ann["id"]])
        assert mask_utils.area(ann["segmentation"]) == ann["area"]
        assert list(mask_utils.toBbox(ann["segmentation"])) == ann["bbox"]


def test_panopticapi_scores_ground_truth_against_itself_perfectly(dataset):
    out, _ = dataset
    json_file = out / "annotations" / "panoptic_train.json"
    folder = out / "annotations" / "panoptic_train"
    results = pq_compute(str(json_file), str(json_file), gt_folder=str(folder), pred_folder=str(folder))
    for group in ("All", "Things", "Stuff"):
        assert results[group]["pq"] == pytest.approx(1.0)
        assert results[group]["n"] > 0


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    settings = GeneratorSettings(min_size=64, max_size=96)
    generate_dataset(tmp_path / "a", 5, seed=11, settings=settings)
    generate_dataset(tmp_path / "b", 5, seed=11, settings=settings)
    generate_dataset(tmp_path / "c", 5, seed=12, settings=settings)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 5 * 2 + 2
    for relative in files_a:
        assert filecmp.cmp(tmp_path / "a" / relative, tmp_path / "b" / relative, shallow=False), relative
    json_a = (tmp_path / "a" / "annotations" / "panoptic_train.json").read_bytes()
    assert json_a != (tmp_path / "c" / "annotations" / "panoptic_train.json").read_bytes()


def test_command_line_writes_the_dataset_and_rejects_bad_arguments(tmp_path):
    command = [sys.executable, "-m", "pipeline.synthetic", "--out", str(tmp_path / "cli"), "--num-images", "3",
               "--seed", "5", "--min-size", "48", "--max-size", "64"]
    subprocess.run(command, check=True, capture_output=True)
    assert len(list((tmp_path / "cli" / "annotations").glob("panoptic_*/*.png"))) == 3
    bad = subprocess.run(command[:6] + ["0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "num_images must be >= 1" in bad.stderr
