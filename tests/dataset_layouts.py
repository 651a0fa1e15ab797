"""Real-format dataset layouts for tests: re-lay a custom COCO-panoptic dataset (e.g. the synthetic
one) out as COCO 2017, ADE20K panoptic or Cityscapes gtFine panoptic, with each format's file naming."""

from __future__ import annotations

import json
import os
import shutil

from PIL import Image

from pipeline.data.readers import default_split_paths


def _names(dataset_format: str, index: int, stem: str) -> tuple[str, str, str]:
    """(image id, image file name, panoptic file name) as the format names them."""
    if dataset_format == "cityscapes_panoptic":
        city = ("aachen", "bochum")[index % 2]
        base = f"{city}_000000_{index:06d}"
        return base, f"{base}_leftImg8bit.png", f"{base}_gtFine_panoptic.png"
    if dataset_format == "ade20k_panoptic":
        return stem, f"ADE_{stem}.jpg", f"ADE_{stem}.png"
    return stem, f"{stem}.jpg", f"{stem}.png"


def relayout(source_root: str, target_root: str, dataset_format: str, splits=("train", "val")) -> None:
    """Copy a dataset in the custom layout (`{split}/`, `annotations/panoptic_{split}.json`) into the layout
    of `dataset_format` under target_root. Cityscapes images are re-encoded as PNG, as the originals are."""
    for split in splits:
        with open(os.path.join(source_root, "annotations", f"panoptic_{split}.json")) as handle:
            document = json.load(handle)
        target = default_split_paths(dataset_format, split)
        paths = {k: os.path.join(target_root, v) for k, v in target.model_dump().items() if v is not None}
        os.makedirs(paths["panoptic_dir"], exist_ok=True)
        images = {image["id"]: image for image in document["images"]}
        for index, annotation in enumerate(document["annotations"]):
            image = images[annotation["image_id"]]
            stem = os.path.splitext(image["file_name"])[0]
            image_id, image_name, png_name = _names(dataset_format, index, stem)
            image_source = os.path.join(source_root, split, image["file_name"])
            image_folder = paths["image_dir"]
            if dataset_format == "cityscapes_panoptic":
                image_folder = os.path.join(image_folder, image_name.split("_")[0])
            os.makedirs(image_folder, exist_ok=True)
            if image_name.endswith(".png"):
                Image.open(image_source).save(os.path.join(image_folder, image_name))
            else:
                shutil.copyfile(image_source, os.path.join(image_folder, image_name))
            shutil.copyfile(
                os.path.join(source_root, "annotations", f"panoptic_{split}", annotation["file_name"]),
                os.path.join(paths["panoptic_dir"], png_name),
            )
            image.update(id=image_id, file_name=image_name)
            annotation.update(image_id=image_id, file_name=png_name)
        with open(paths["annotation_json"], "w") as handle:
            json.dump(document, handle)
