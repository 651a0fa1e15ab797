"""Data pipeline throughput per CPU core at the ADE20K-640 setting, against transformers'
OneFormerImageProcessor building the same targets (masks, classes, text list) from the same images in the
same run. Everything runs in this one process with one torch thread, so samples/s is per core.

    .venv/bin/python benchmarks/bench_data.py [--num-images 24] [--min-size 384] [--max-size 683]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.augment import PIXEL_MEAN
from pipeline.data.preprocess import plan_shards, write_shard
from pipeline.data.readers import read_split
from pipeline.data.settings import DatasetSettings, PreprocessSettings, StreamSettings
from pipeline.data.stream import PanopticShardStream, augment_params_from_settings
from pipeline.data.targets import rgb_to_ids
from pipeline.synthetic import GeneratorSettings, generate_dataset


def _hf_processor(classes, num_text: int, folder: Path):
    """OneFormerImageProcessor without hub access: its class-info JSON written locally."""
    from transformers import OneFormerImageProcessor

    info = {str(i): {"name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(classes.names, classes.isthing))}
    (folder / "class_info.json").write_text(json.dumps(info))
    return OneFormerImageProcessor(
        repo_path=str(folder), class_info_file="class_info.json", num_text=num_text,
        size={"shortest_edge": 640, "longest_edge": 2560}, ignore_index=255,
    )


def _hf_sample(processor, record, classes, task):
    """Raw files -> targets for one image, as a user of the HF port would build them."""
    image = np.asarray(Image.open(record.image_path).convert("RGB"))
    ids = rgb_to_ids(np.asarray(Image.open(record.panoptic_path).convert("RGB")))
    lookup = {cid: i for i, cid in enumerate(classes.category_ids)}
    values, instance_map = np.unique(ids, return_inverse=True)
    by_id = {s["id"]: s for s in record.segments}
    mapping = {i: lookup[by_id[int(v)]["category_id"]] if int(v) in by_id else 0 for i, v in enumerate(values)}
    return processor(images=[image], task_inputs=[task], segmentation_maps=[instance_map.reshape(ids.shape)],
                     instance_id_to_semantic_id=mapping, return_tensors="pt")


def _rate(function, count: int) -> float:
    started = time.perf_counter()
    function()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--min-size", type=int, default=384)
    parser.add_argument("--max-size", type=int, default=683)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    generate_dataset(work / "raw", args.num_images, seed=0, val_fraction=0.0,
                     settings=GeneratorSettings(min_size=args.min_size, max_size=args.max_size))
    dataset = DatasetSettings(format="custom_coco_panoptic", root=str(work / "raw"))
    split = read_split(dataset, "train")
    count = len(split.records)
    stream_settings = StreamSettings(augmentation="ade20k", crop_size=640, num_queries=250, batch_size=1)

    # (a) preprocessing, one process: raw files -> shards.
    plans = plan_shards(split, PreprocessSettings(output=str(work), target_shard_mb=1e6).target_shard_mb)
    (work / "shards" / "train").mkdir(parents=True)
    preprocess_rate = _rate(
        lambda: [write_shard(p, split.classes, str(work / "shards" / "train"), "fail") for p in plans], count)
    from pipeline.data.preprocess import preprocess_split  # writes the manifest the stream reads

    preprocess_split(dataset, PreprocessSettings(output=str(work / "shards"), executor="local",
                                                 show_progress=False, splits=["train"]), "train")

    # (b) streaming: decode, ADE20K augmentation, task sampling, targets, text tokens, collation.
    stream = PanopticShardStream(
        str(work / "shards" / "train"), training=True, batch_size=1, repeat=False,
        augment_params=augment_params_from_settings(stream_settings), num_text_slots=stream_settings.num_text_slots,
        image_pad_value=PIXEL_MEAN, shuffle_buffer=1,
    )
    next(iter(stream))  # tokenizer load outside the timing
    stream_rate = _rate(lambda: list(stream), count)

    # Reference: transformers' processor on the same raw images (shortest edge 640), tasks in rotation.
    processor = _hf_processor(split.classes, stream_settings.num_text_slots, work)
    _hf_sample(processor, split.records[0], split.classes, "panoptic")
    tasks = ("semantic", "instance", "panoptic")
    hf_rate = _rate(
        lambda: [_hf_sample(processor, r, split.classes, tasks[i % 3]) for i, r in enumerate(split.records)], count)

    print(f"images: {count}, sizes {args.min_size}-{args.max_size}, crop 640, one thread")
    print(f"{'stage':<44}{'samples/s/core':>16}{'vs HF':>8}")
    for name, rate in (("(a) preprocess raw -> shards", preprocess_rate),
                       ("(b) stream: decode+augment+targets+text", stream_rate),
                       ("transformers OneFormerImageProcessor", hf_rate)):
        print(f"{name:<44}{rate:>16.2f}{rate / hf_rate:>7.2f}x")


if __name__ == "__main__":
    main()
