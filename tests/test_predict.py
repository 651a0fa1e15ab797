"""Prediction on image files (model/predict.py): the standard formats and overlays for every image and task,
the same PQ and AP as `pipeline.evaluate model` on the same split and model, unreadable images skipped by
name, bad input in one line with exit status 2, and the overlay legend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from model import make_config
from model.checkpoint import ModelFileError, build_from_config, load_model, save_model
from model.checkpoint import read_classes as read_model_file_classes
from model.classes import ClassesFileError, ModelClasses, read_classes_file
from model.formats import ids_to_rgb
from model.inference import semantic_multiscale_flip
from model.predict import Predictor, image_files, main, predict_images, read_image
from model.texts import TASKS
from model.visualize import LegendEntry, class_color, overlay_picture
from pipeline.data.preprocess import run_preprocess
from pipeline.data.settings import DatasetSettings, PreprocessSettings
from pipeline.evaluation.instance import instance_ap_compute
from pipeline.evaluation.panoptic import pq_compute
from pipeline.evaluation.panoptic_format import read_panoptic_png
from pipeline.evaluation.runner import evaluate_model, read_classes
from pipeline.synthetic import GeneratorSettings, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "runs" / "demo_cpu" / "model" / "model.pt"
DEMO_IMAGES, DEMO_SHARDS = ROOT / "data" / "synthetic" / "val", ROOT / "data" / "synthetic_shards" / "val"
DEMO_TEST_SIZE = ("96", "384")  # jobs/demo_cpu.yaml's evaluation.test_size
NUM_CLASSES = 10  # the synthetic dataset's categories
TEST_SIZE = ("64", "192")
CONFIG = make_config("tiny", num_classes=NUM_CLASSES, object_mask_threshold=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic split (raw files and shards) and an untrained tiny model whose panoptic threshold of 0
    keeps every query, so it predicts segments; classes.json beside it, as training writes it."""
    root = tmp_path_factory.mktemp("predict")
    generate_dataset(root / "raw", num_images=8, seed=3, val_fraction=0.5, settings=GeneratorSettings(64, 96))
    run_preprocess(
        DatasetSettings(format="custom_coco_panoptic", root=str(root / "raw")),
        PreprocessSettings(
            output=str(root / "shards"), target_shard_mb=0.01, executor="local", show_progress=False
        ),
    )
    torch.manual_seed(0)
    (root / "model").mkdir()
    save_model(build_from_config(CONFIG).eval(), CONFIG, root / "model" / "model.pt")
    classes = read_classes(str(root / "shards" / "val"))
    (root / "model" / "classes.json").write_text(json.dumps(classes.to_json()))
    return {"root": root, "images": root / "raw" / "val", "checkpoint": root / "model" / "model.pt"}


@pytest.fixture(scope="module")
def all_tasks(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted")
    args = ["--checkpoint", str(data["checkpoint"]), "--all-tasks", str(data["images"]), "--out", str(out)]
    assert main([*args, "--test-size", *TEST_SIZE, "--batch-size", "2", "--quiet"]) == 0
    return out


def test_every_image_gets_every_format_and_overlay(data, all_tasks):
    stems = sorted(path.stem for path in data["images"].glob("*.jpg"))
    assert len(stems) == 4
    panoptic = json.loads((all_tasks / "panoptic.json").read_text())
    category_ids = {c["id"] for c in panoptic["categories"]}
    assert [a["file_name"] for a in panoptic["annotations"]] == [f"{s}.png" for s in stems]
    for annotation, stem in zip(panoptic["annotations"], stems):
        size = Image.open(data["images"] / f"{stem}.jpg").size[::-1]
        ids = read_panoptic_png(all_tasks / "panoptic" / annotation["file_name"])
        assert ids.shape == size and annotation["image_id"] == int(stem)
        assert set(np.unique(ids)) - {0} == {s["id"] for s in annotation["segments_info"]}
        assert {s["category_id"] for s in annotation["segments_info"]} <= category_ids
        semantic = np.asarray(Image.open(all_tasks / "semantic" / f"{stem}.png"))
        assert semantic.shape == size and semantic.max() < NUM_CLASSES
        for task in TASKS:
            assert (all_tasks / "overlays" / f"{stem}_{task}.png").is_file()
    instances = json.loads((all_tasks / "instances.json").read_text())
    assert {r["image_id"] for r in instances} == {int(s) for s in stems}
    assert all(r["category_id"] in category_ids and 0 <= r["score"] <= 1 for r in instances)
    first = instances[0]
    assert tuple(mask_util.decode(first["segmentation"]).shape) == tuple(first["segmentation"]["size"])


def test_panoptic_pq_and_instance_ap_equal_pipeline_evaluate(data, all_tasks):
    """The files model.predict writes, scored by the evaluation's own functions against the raw ground truth,
    give exactly the numbers `pipeline.evaluate model` gets on the shards of the same split."""
    evaluated = evaluate_model(
        data["checkpoint"], data["root"] / "shards" / "val", metrics=("pq", "ap"), progress=False,
        test_size=tuple(map(int, TEST_SIZE)), classes=data["checkpoint"].parent / "classes.json",
    )["summary"]  # fmt: skip
    gt_json = data["root"] / "raw" / "annotations" / "panoptic_val.json"
    pq = pq_compute(gt_json, all_tasks / "panoptic.json", gt_json.with_suffix(""), all_tasks / "panoptic")
    assert 100 * pq["All"]["pq"] == pytest.approx(evaluated["PQ"], abs=1e-9)
    assert 100 * pq["Things"]["pq"] == pytest.approx(evaluated["PQ_th"], abs=1e-9)
    # An untrained model scores ~0: the equality that matters is the trained demo model's, below; this one
    # checks the files (ids, names, category ids) line up with the ground truth on any checkout.
    assert len(pq["per_class"]) == NUM_CLASSES
    ap = instance_ap_compute(gt_json, all_tasks / "instances.json", gt_json.with_suffix(""))
    assert 100 * max(ap["AP"], 0.0) == pytest.approx(evaluated["AP"], abs=1e-9)


@pytest.mark.slow  # about 30 s: 32 images through predict and through pipeline.evaluate
@pytest.mark.skipif(
    not (DEMO_MODEL.is_file() and DEMO_SHARDS.is_dir()), reason="needs `make demo`'s model and data"
)
def test_demo_model_predict_cli_scores_the_pq_of_pipeline_evaluate(tmp_path):
    """The trained demo model (PQ ~46 on its validation split): the panoptic files the predict CLI writes for
    data/synthetic/val score the PQ `pipeline.evaluate model` reports for the same model, split and test size."""
    args = ["--checkpoint", str(DEMO_MODEL), "--task", "panoptic", str(DEMO_IMAGES), "--out", str(tmp_path)]
    assert main([*args, "--test-size", *DEMO_TEST_SIZE, "--no-overlays", "--quiet"]) == 0
    evaluated = evaluate_model(
        DEMO_MODEL,
        DEMO_SHARDS,
        metrics=("pq",),
        progress=False,
        test_size=tuple(map(int, DEMO_TEST_SIZE)),
        classes=DEMO_MODEL.parent / "classes.json",
    )
    gt_json = DEMO_IMAGES.parent / "annotations" / "panoptic_val.json"
    pq = pq_compute(gt_json, tmp_path / "panoptic.json", gt_json.with_suffix(""), tmp_path / "panoptic")
    assert evaluated["summary"]["PQ"] > 20
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        assert 100 * pq[group]["pq"] == pytest.approx(evaluated["summary"][f"PQ{suffix}"], abs=1e-9)


def test_unreadable_images_are_named_and_skipped(data, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted(data["images"].glob("*.jpg"))[:2]
    for path in good:
        shutil.copy(path, folder)
    (folder / "garbage.jpg").write_bytes(b"not an image at all")
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    out = tmp_path / "out"
    code = main(["--checkpoint", str(data["checkpoint"]), "--task", "semantic", str(folder), "--out", str(out),
                 "--test-size", *TEST_SIZE, "--quiet"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "garbage.jpg" in err and "truncated.jpg" in err
    assert sorted(p.name for p in (out / "semantic").iterdir()) == sorted(f"{p.stem}.png" for p in good)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_checkpoint", "missing.pt"),
        ("missing_image", "nowhere.jpg"),
        ("empty_folder", "no images"),
        ("no_classes", "classes.json"),
        ("wrong_classes", "3 classes"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, case, expected):
    checkpoint, images, extra = str(data["checkpoint"]), [str(data["images"])], []
    if case == "missing_checkpoint":
        checkpoint = str(tmp_path / "missing.pt")
    elif case == "missing_image":
        images = [str(tmp_path / "nowhere.jpg")]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        images = [str(tmp_path / "empty")]
    elif case == "no_classes":
        checkpoint = str(tmp_path / "model.pt")
        shutil.copy(data["checkpoint"], checkpoint)
    elif case == "wrong_classes":
        (tmp_path / "three.json").write_text(json.dumps(
            [{"contiguous_id": k, "category_id": k, "name": str(k), "isthing": True} for k in range(3)]))  # fmt: skip
        extra = ["--classes", str(tmp_path / "three.json")]
    code = main(
        ["--checkpoint", checkpoint, "--task", "panoptic", *images, "--out", str(tmp_path / "o"), *extra]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and expected in error


def test_python_function_and_multiscale_semantic(data, tmp_path):
    predictor = Predictor.from_checkpoint(data["checkpoint"], test_size=tuple(map(int, TEST_SIZE)))
    single = predict_images(predictor, [data["images"]], ["semantic"], tmp_path / "single", progress=False)
    multi = predict_images(predictor, [data["images"]], ["semantic"], tmp_path / "multi", multiscale=True,
                           overlays=False, progress=False)  # fmt: skip
    assert single.images == multi.images == 4 and not single.skipped
    assert "overlays/" in single.files and "overlays/" not in multi.files
    for path in sorted(data["images"].glob("*.jpg")):  # --multiscale is the official TTA at the test size
        image = read_image(path)
        scores = semantic_multiscale_flip(
            predictor.network, image[None], [tuple(image.shape[-2:])], size=predictor.size
        )
        written = np.asarray(Image.open(tmp_path / "multi" / "semantic" / f"{path.stem}.png"))
        assert np.array_equal(written, scores[0].argmax(0).numpy())


def test_image_files_reads_folders_and_exif_orientation(tmp_path):
    picture = np.zeros((10, 20, 3), np.uint8)
    picture[:, :5] = 255  # the left quarter white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(picture).save(tmp_path / "b.jpg", exif=exif, quality=100)
    Image.fromarray(picture).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files([tmp_path])] == ["a.png", "b.jpg"]
    rotated = read_image(tmp_path / "b.jpg")
    assert rotated.shape == (3, 20, 10)
    assert rotated[:, :5].mean() > 200 and rotated[:, -5:].mean() < 50  # the white quarter is now on top


def test_overlay_legend_names_and_colours_each_class():
    image = np.full((40, 60, 3), 128, np.uint8)
    labels = np.zeros((40, 60), np.int64)
    labels[:, 30:] = 2
    legend = [LegendEntry(1, class_color(0), "sky"), LegendEntry(2, class_color(1), "grass")]
    picture = np.asarray(overlay_picture(image, labels, legend, "x"))
    assert picture.shape[1] > picture.shape[0]  # a legend panel beside the (enlarged) image
    swatch_colors = {tuple(pixel) for pixel in picture[:, picture.shape[0] * 3 // 2 :].reshape(-1, 3)}
    assert class_color(0) in swatch_colors and class_color(1) in swatch_colors


def test_classes_file_round_trips_the_training_export(tmp_path):
    from pipeline.data.readers import ClassInfo

    info = ClassInfo(category_ids=(3, 7), names=("cat", "sky"), isthing=(True, False))
    (tmp_path / "classes.json").write_text(json.dumps(info.to_json()))
    classes = read_classes_file(tmp_path / "classes.json")
    assert (classes.category_ids, classes.names, classes.is_thing) == (
        info.category_ids,
        info.names,
        info.isthing,
    )
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ClassesFileError, match="bad.json"):
        read_classes_file(tmp_path / "bad.json")


def test_panoptic_png_encoding_is_the_coco_one():
    ids = np.array([[0, 1, 256, 65536 + 2]])
    assert ids_to_rgb(ids).tolist() == [[[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 1]]]


# ---------------------------------------------------------------------------------------------- model classes
def _renamed(classes: ModelClasses, prefix: str) -> ModelClasses:
    names = tuple(f"{prefix}{name}" for name in classes.names)
    return ModelClasses(names, classes.is_thing, classes.category_ids)


@pytest.fixture(scope="module")
def named_model(data, tmp_path_factory):
    """The same tiny model with its classes inside model.pt, renamed ("own ...") so that the source shows in
    every output, and a classes.json beside it that names them otherwise ("beside ...")."""
    folder = tmp_path_factory.mktemp("named")
    data_classes = read_classes_file(data["checkpoint"].parent / "classes.json")
    model = load_model(data["checkpoint"])
    save_model(model, CONFIG, folder / "model.pt", classes=_renamed(data_classes, "own "))
    (folder / "classes.json").write_text(json.dumps(_renamed(data_classes, "beside ").to_json()))
    return {"checkpoint": folder / "model.pt", "classes": data_classes}


def test_model_file_round_trips_its_classes_and_old_files_still_load(data, named_model, tmp_path):
    own = read_model_file_classes(named_model["checkpoint"])
    assert own == _renamed(named_model["classes"], "own ")
    assert read_model_file_classes(data["checkpoint"]) is None  # written without classes, as older files are
    old = torch.load(data["checkpoint"], weights_only=True)
    assert set(old) == {"config", "model"}
    torch.testing.assert_close(
        load_model(named_model["checkpoint"]).state_dict(), load_model(data["checkpoint"]).state_dict()
    )
    with pytest.raises(ValueError, match="3 classes given for a model of 10"):
        save_model(load_model(data["checkpoint"]), CONFIG, tmp_path / "m.pt", classes=own.to_json()[:3])
    torch.save({**old, "extra": 1}, tmp_path / "extra.pt")
    with pytest.raises(ModelFileError, match=r"extra.pt: not a model file .*'extra'"):
        load_model(tmp_path / "extra.pt")
    torch.save({**old, "classes": [{"name": "no ids"}]}, tmp_path / "broken.pt")
    with pytest.raises(ClassesFileError, match="broken.pt"):
        read_model_file_classes(tmp_path / "broken.pt")


def test_predict_names_the_classes_of_the_model_file_first(data, named_model, tmp_path):
    """Order: --classes, the model file's own, the classes.json beside it."""
    image = sorted(data["images"].glob("*.jpg"))[:1]
    args = ["--task", "semantic", str(image[0]), "--test-size", *TEST_SIZE, "--quiet", "--no-overlays"]
    own = Predictor.from_checkpoint(named_model["checkpoint"]).classes
    assert own.names[0].startswith("own ")
    alone = tmp_path / "alone" / "model.pt"  # no classes.json beside: the file's own are enough
    alone.parent.mkdir()
    shutil.copy(named_model["checkpoint"], alone)
    assert main(["--checkpoint", str(alone), "--out", str(tmp_path / "o"), *args]) == 0
    assert Predictor.from_checkpoint(alone).classes == own
    given = Predictor.from_checkpoint(alone, classes_file=data["checkpoint"].parent / "classes.json").classes
    assert given == named_model["classes"]
    assert Predictor.from_checkpoint(data["checkpoint"]).classes == named_model["classes"]  # an old file


def test_evaluate_uses_the_classes_of_the_model_file(data, named_model):
    """`pipeline.evaluate model` without --classes: the model file's own classes, not the manifest's."""
    common = dict(metrics=("miou",), progress=False, max_images=1, test_size=tuple(map(int, TEST_SIZE)))
    own = evaluate_model(named_model["checkpoint"], data["root"] / "shards" / "val", **common)
    assert own["classes"] == list(_renamed(named_model["classes"], "own ").names)
    beside = evaluate_model(data["checkpoint"], data["root"] / "shards" / "val", **common)  # an older file
    assert beside["classes"] == list(named_model["classes"].names)
