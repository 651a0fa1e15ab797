"""`python -m pipeline.evaluate` end to end in a subprocess: tables, --json-out, bad input."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute as panopticapi_pq_compute
from PIL import Image
from pycocotools import mask as mask_util
from random_panoptic import write_random_panoptic_dataset

from pipeline.evaluation import instance_ap_compute, read_panoptic_png

ROOT = Path(__file__).resolve().parents[1]


def _evaluate(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_random_panoptic_dataset(
        tmp_path_factory.mktemp("cli"), num_images=6, seed=11, height=40, width=56
    )


def test_panoptic_json_out_equals_panopticapi(dataset, tmp_path):
    out = tmp_path / "pq.json"
    done = _evaluate(
        "panoptic",
        "--gt-json",
        dataset["gt_json"],
        "--gt-folder",
        dataset["gt_folder"],
        "--pred-json",
        dataset["pred_json"],
        "--pred-folder",
        dataset["pred_folder"],
        "--json-out",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert "Panoptic quality" in done.stdout and "Things" in done.stdout and "sky" in done.stdout
    ours = json.loads(out.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        reference = panopticapi_pq_compute(
            *(str(dataset[k]) for k in ("gt_json", "pred_json", "gt_folder", "pred_folder"))
        )
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == reference[group]["n"]
        assert [ours[group][m] for m in ("pq", "sq", "rq")] == pytest.approx(
            [reference[group][m] for m in ("pq", "sq", "rq")], abs=1e-9
        )
    assert {int(k): v for k, v in ours["per_class"].items()} == pytest.approx(
        {k: pytest.approx(v, abs=1e-9) for k, v in reference["per_class"].items()}
    )


def test_panoptic_bad_input_exits_2_naming_image(dataset, tmp_path):
    pred = json.loads(dataset["pred_json"].read_text())
    pred["annotations"][0]["segments_info"].append({"id": 1, "category_id": 1})
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    done = _evaluate(
        "panoptic",
        "--gt-json",
        dataset["gt_json"],
        "--gt-folder",
        dataset["gt_folder"],
        "--pred-json",
        tmp_path / "pred.json",
        "--pred-folder",
        dataset["pred_folder"],
    )
    image_id = pred["annotations"][0]["image_id"]
    assert done.returncode == 2
    assert (
        f"image {image_id} (prediction): segment ids [1] are in segments_info but not in the prediction PNG"
        in done.stderr
    )


def test_instance_from_panoptic_gt(dataset, tmp_path):
    pred = json.loads(dataset["pred_json"].read_text())
    results = []
    for annotation in pred["annotations"]:
        ids = read_panoptic_png(dataset["pred_folder"] / annotation["file_name"])
        for rank, segment in enumerate(annotation["segments_info"]):
            if segment["category_id"] < 90:  # thing classes of the random dataset
                rle = mask_util.encode(np.asfortranarray((ids == segment["id"]).astype(np.uint8)))
                results.append(
                    {
                        "image_id": annotation["image_id"],
                        "category_id": segment["category_id"],
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                        "score": 1 / (1 + rank),
                    }
                )
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "ap.json"
    done = _evaluate(
        "instance",
        "--gt-json",
        dataset["gt_json"],
        "--gt-folder",
        dataset["gt_folder"],
        "--results-json",
        tmp_path / "results.json",
        "--json-out",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert "AP50" in done.stdout
    expected = instance_ap_compute(dataset["gt_json"], tmp_path / "results.json", dataset["gt_folder"])
    assert json.loads(out.read_text())["AP"] == pytest.approx(expected["AP"], abs=1e-12)


def test_semantic(tmp_path):
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1]], dtype=np.uint8)
    for folder, array in (("gt", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        Image.fromarray(array).save(tmp_path / folder / "a.png")
    out = tmp_path / "miou.json"
    done = _evaluate(
        "semantic",
        "--gt-folder",
        tmp_path / "gt",
        "--pred-folder",
        tmp_path / "pred",
        "--num-classes",
        3,
        "--json-out",
        out,
    )
    assert done.returncode == 0, done.stderr
    assert "mIoU" in done.stdout
    assert json.loads(out.read_text())["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    done = _evaluate(
        "semantic", "--gt-folder", tmp_path / "gt", "--pred-folder", tmp_path / "pred", "--num-classes", 2
    )
    assert done.returncode == 2 and "image a: ground truth has labels [2] outside [0, 2)" in done.stderr
