"""Data pipeline throughput per CPU core at the ADE20K-640 setting, against transformers'
OneFormerImageProcessor building the same targets (masks, classes, text list) from the same images in the
same run. Everything runs in this one process with one torch thread. Rates are samples per CPU-second of this
process (so "per core", and steady on a shared, busy machine where wall time is not); the stream and the
reference alternate over --rounds passes and each keeps its best pass. --breakdown adds the stream's
CPU ms per sample by stage.

    .venv/bin/python benchmarks/bench_data.py [--num-images 24] [--min-size 384] [--max-size 683] [--rounds 3]
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

from model.presets import make_config
from pipeline.data.augment import augment
from pipeline.data.preprocess import plan_shards, write_shard
from pipeline.data.readers import read_split
from pipeline.data.settings import DatasetSettings, PreprocessSettings, StreamSettings
from pipeline.data.shards import decode_sample
from pipeline.data.stream import (
    ModelInputs,
    PanopticShardStream,
    augment_params_from_settings,
    pick_task,
    sample_seed,
    training_canvas,
    training_pad_value,
)
from pipeline.data.targets import plan_targets, rgb_to_ids
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


def _cpu_seconds(function) -> float:
    started = time.process_time()
    function()
    return time.process_time() - started


def _rate(function, count: int) -> float:
    return count / _cpu_seconds(function)


def _stream_breakdown(stream: PanopticShardStream) -> dict[str, float]:
    """CPU ms per sample of each stage of the training stream, on one pass over the raw samples."""
    raws = list(stream._epoch_raw(0, 0, 1))
    stages = {"read tar": _cpu_seconds(lambda: list(stream._epoch_raw(0, 0, 1)))}
    decoded: list = []
    stages["decode jpeg+png"] = _cpu_seconds(lambda: decoded.extend(decode_sample(r, keep_pil_image=True) for r in raws))
    augmented: list = []

    def run_augment():
        for d in decoded:
            rng = np.random.default_rng(sample_seed(stream.seed, 0, d.key))
            task = pick_task(rng.uniform(), stream.task_thresholds)
            values = np.concatenate([[-1], np.where(d.table.iscrowd, -1, d.table.classes)])
            augmented.append((task, d.table, *augment(d.image, d.index_map, values, stream.augment_params, rng)))

    stages["augment (resize, crop, jitter, flip)"] = _cpu_seconds(run_augment)
    plans: list = []
    stages["targets plan + text tokens"] = _cpu_seconds(lambda: plans.extend(
        (p := plan_targets(m, table, task), stream._tokens.tokens(p.labels, task)) for task, table, _, m in augmented))
    stages["collate (float images, masks, padding)"] = _cpu_seconds(lambda: [stream._collate(
        [{"image_id": "", "task": task, "image": torch.from_numpy(planes), "index_map": m, "plan": plan,
          "text_tokens": tokens}], {}) for (task, _, planes, m), (plan, tokens) in zip(augmented, plans)])
    return {name: seconds / len(raws) * 1e3 for name, seconds in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--min-size", type=int, default=384)
    parser.add_argument("--max-size", type=int, default=683)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    generate_dataset(work / "raw", args.num_images, seed=0, val_fraction=0.0,
                     settings=GeneratorSettings(min_size=args.min_size, max_size=args.max_size))
    dataset = DatasetSettings(format="custom_coco_panoptic", root=str(work / "raw"))
    split = read_split(dataset, "train")
    count = len(split.records)
    stream_settings = StreamSettings(augmentation="ade20k", crop_size=640, batch_size=1)
    inputs = ModelInputs.from_config(make_config("swin_l", dataset="ade20k"))

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
        augment_params=augment_params_from_settings(stream_settings), num_text_slots=inputs.num_text_slots,
        image_pad_value=training_pad_value(stream_settings), canvas=training_canvas(stream_settings), shuffle_buffer=1,
    )
    next(iter(stream))  # tokenizer load outside the timing

    # Reference: transformers' processor on the same raw images (shortest edge 640), tasks in rotation.
    processor = _hf_processor(split.classes, inputs.num_text_slots, work)
    _hf_sample(processor, split.records[0], split.classes, "panoptic")
    tasks = ("semantic", "instance", "panoptic")
    stream_rates, hf_rates = [], []
    for _ in range(args.rounds):
        stream_rates.append(_rate(lambda: list(stream), count))
        hf_rates.append(_rate(
            lambda: [_hf_sample(processor, r, split.classes, tasks[i % 3]) for i, r in enumerate(split.records)],
            count))
    stream_rate, hf_rate = max(stream_rates), max(hf_rates)

    print(f"images: {count}, sizes {args.min_size}-{args.max_size}, crop 640, one thread, "
          f"best of {args.rounds} alternating passes, rates per CPU-second")
    print(f"{'stage':<44}{'samples/s/core':>16}{'ms/sample':>11}{'vs HF':>8}")
    for name, rate in (("(a) preprocess raw -> shards", preprocess_rate),
                       ("(b) stream: decode+augment+targets+text", stream_rate),
                       ("transformers OneFormerImageProcessor", hf_rate)):
        print(f"{name:<44}{rate:>16.2f}{1e3 / rate:>11.1f}{rate / hf_rate:>7.2f}x")
    ratios = sorted(s / h for s, h in zip(stream_rates, hf_rates))
    print(f"stream / HF per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"cores to feed 8 GPUs x 3 img/s (24 samples/s): {24 / stream_rate:.2f}")
    if args.breakdown:
        for name, milliseconds in _stream_breakdown(stream).items():
            print(f"  {name:<42}{milliseconds:>8.2f} ms/sample")


if __name__ == "__main__":
    main()
