"""Streams: disjoint node/worker splits, deterministic and resumable training streams, augmentation
geometry, evaluation at original size, corrupt samples skipped and counted; the colour jitter against the
official float arithmetic and real-valued HSV."""

from __future__ import annotations

import colorsys
import io
import json
import tarfile
from itertools import islice

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import augment as augment_module
from pipeline.data.augment import (
    PIXEL_MEAN,
    JitterPlan,
    affine_table,
    apply_jitter,
    apply_table,
    hue_saturation,
)
from pipeline.data.preprocess import run_preprocess
from pipeline.data.settings import DatasetSettings, PreprocessSettings, StreamSettings
from pipeline.data.shards import file_checksum
from pipeline.data.stream import ModelInputs, PanopticShardStream, build_eval_loader, build_train_loader
from pipeline.synthetic import generate_dataset

NUM_TRAIN = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    generate_dataset(root / "raw", num_images=12, seed=4, val_fraction=1 / 6)
    dataset = DatasetSettings(format="custom_coco_panoptic", root=str(root / "raw"))
    for name, megabytes in (("many", 0.05), ("one", 100.0)):
        run_preprocess(dataset, PreprocessSettings(
            output=str(root / name), target_shard_mb=megabytes, executor="local", show_progress=False))
    return root


INPUTS = ModelInputs(num_text_slots=4, size_divisibility=32, pixel_mean=PIXEL_MEAN)


def _settings(**overrides):
    values = dict(augmentation="ade20k", crop_size=96, batch_size=2, loader_workers=2, shuffle_buffer=4, seed=7)
    return StreamSettings(**{**values, **overrides})


def _train_loader(settings, folder, rank=0, world_size=1):
    return build_train_loader(settings, INPUTS, folder, rank, world_size)


def _eval_loader(folder, rank=0, world_size=1, loader_workers=0):
    return build_eval_loader(folder, INPUTS, rank, world_size, loader_workers=loader_workers)


def _batches(loader, count):
    return list(islice(iter(loader), count))


@pytest.mark.parametrize("layout", ["many", "one"])  # split by shard, and by sample when shards are scarce
@pytest.mark.parametrize("world_size", [2, 8])  # 8 ranks x 2 workers: more consumers than shards or samples
def test_ranks_and_workers_see_disjoint_samples_covering_the_split(shards, layout, world_size):
    seen = []
    for rank in range(world_size):
        loader = _eval_loader(str(shards / layout / "train"), rank=rank, world_size=world_size, loader_workers=2)
        seen.append([image_id for batch in loader for image_id in batch["image_ids"]])
        if world_size == 2:  # 4 consumers for 10 samples: both workers of the rank contribute
            assert len(loader.positions) == 2
    every = [image_id for rank_seen in seen for image_id in rank_seen]
    assert sorted(every) == sorted(set(every)) and len(every) == NUM_TRAIN  # each sample exactly once


def test_training_batches_follow_the_contract(shards):
    settings = _settings(loader_workers=0, batch_size=3)
    batch = next(iter(_train_loader(settings, str(shards / "many" / "train"))))
    images, targets = batch["images"], batch["targets"]
    assert images.dtype == torch.float32 and images.shape == (3, 3, 96, 96)
    assert batch["text_tokens"].shape == (3, INPUTS.num_text_slots, 77) and batch["text_tokens"].dtype == torch.int64
    assert set(batch["tasks"]) <= {"semantic", "instance", "panoptic"} and len(batch["tasks"]) == 3
    for target, (height, width), image in zip(targets, batch["image_sizes"], images):
        assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.bool
        assert target["masks"].shape == (len(target["labels"]), 96, 96)
        assert not target["masks"][:, height:].any() and not target["masks"][:, :, width:].any()
        padding = image[:, height:, :]  # rows below the crop carry the official pad value, raw 128
        assert torch.equal(padding, torch.full_like(padding, 128.0))


def test_stream_is_deterministic_and_seed_dependent(shards):
    folder = str(shards / "many" / "train")
    first, second = (_batches(_train_loader(_settings(), folder), 3) for _ in range(2))
    other = _batches(_train_loader(_settings(seed=8), folder), 3)
    for a, b in zip(first, second):
        assert a["image_ids"] == b["image_ids"] and a["tasks"] == b["tasks"]
        assert torch.equal(a["images"], b["images"])
    assert any(not torch.equal(a["images"], c["images"]) for a, c in zip(first, other))


def test_resume_mid_epoch_neither_repeats_nor_skips(shards):
    folder = str(shards / "many" / "train")
    reference = _batches(_train_loader(_settings(), folder), 9)  # crosses into the second epoch
    interrupted = _train_loader(_settings(), folder)
    _batches(interrupted, 4)
    state = interrupted.state_dict()
    resumed = _train_loader(_settings(), folder)
    resumed.load_state_dict(state)
    for want, got in zip(reference[4:], _batches(resumed, 5)):
        assert want["image_ids"] == got["image_ids"] and want["tasks"] == got["tasks"]
        assert torch.equal(want["images"], got["images"])
        assert all(torch.equal(w["masks"], g["masks"]) for w, g in zip(want["targets"], got["targets"]))
    with pytest.raises(ValueError, match="layout"):
        _train_loader(_settings(loader_workers=1), folder).load_state_dict(state)


@pytest.mark.parametrize("preset,crop", [("ade20k", (96, 96)), ("cityscapes", (64, 128)), ("coco_lsj", (128, 128))])
def test_augmentation_keeps_image_and_targets_aligned(shards, preset, crop):
    stream = PanopticShardStream(
        str(shards / "many" / "train"), training=True, batch_size=1, num_text_slots=8, repeat=False,
        augment_params=__import__("pipeline.data.stream", fromlist=["x"]).augment_params_from_settings(
            _settings(augmentation=preset, crop_size=crop)),
        image_pad_value=(0.0, 0.0, 0.0),
    )
    for batch in stream:
        (height, width), masks = batch["image_sizes"][0], batch["targets"][0]["masks"]
        assert height <= crop[0] and width <= crop[1]
        if preset != "coco_lsj":  # ADE20K/Cityscapes short side >= half the base: crop is never starved
            assert min(height, width) >= min(crop) // 2
        if batch["tasks"][0] == "panoptic":  # panoptic masks never overlap
            assert masks.sum(0).max() <= 1
        assert masks.shape[1:] == batch["images"].shape[2:]


def test_corrupt_sample_is_skipped_and_counted(shards, tmp_path, caplog):
    import shutil

    folder = tmp_path / "train"
    shutil.copytree(shards / "one" / "train", folder)
    tar_path = folder / "train-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for index, (member, data) in enumerate(members):
            data = b"\xff\xd8broken" if index == 0 and member.name.endswith("image.jpg") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    loader = _eval_loader(str(folder))
    with caplog.at_level("WARNING"):
        ids = [i for batch in loader for i in batch["image_ids"]]
    # The shard no longer matches its manifest: skipped whole, every one of its samples counted.
    assert ids == [] and loader.skip_reasons == {"damaged shard": NUM_TRAIN}
    assert "train-000000.tar has" in caplog.text and "but the manifest says" in caplog.text
    # Written that way (the manifest's checksum is the tar's): only the sample is left out.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0].update(file_checksum(fsspec.filesystem("file"), str(tar_path)))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loader = _eval_loader(str(folder))
    with caplog.at_level("WARNING"):
        ids = [i for batch in loader for i in batch["image_ids"]]
    assert len(ids) == NUM_TRAIN - 1 and loader.num_skipped == 1
    assert loader.skip_reasons == {"undecodable sample": 1} and "skipping unreadable sample" in caplog.text


def test_eval_stream_keeps_original_sizes_and_annotations(shards):
    loader = _eval_loader(str(shards / "many" / "val"))
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        height, width = batch["image_sizes"][0]
        assert batch["index_maps"][0].shape == (height, width)
        assert 160 <= height <= 320 and 160 <= width <= 320
        assert int(batch["index_maps"][0].max()) == len(batch["segments"][0])
        assert np.all(batch["images"][0, :, height:, :].numpy() == np.array(PIXEL_MEAN, np.float32)[:, None, None])


@pytest.mark.parametrize("preset,crop,canvas_value", [("ade20k", (96, 96), 128.0), ("coco_lsj", (128, 128), 128.0),
                                                     ("cityscapes", (64, 128), None)])
def test_training_canvas_is_the_official_one(shards, preset, crop, canvas_value):
    """ADE20K and COCO pad every crop to the crop size with raw 128 (void in the targets); Cityscapes pads
    the batch to its largest image, rounded to the size multiple, with the mean (0 after normalising)."""
    settings = _settings(augmentation=preset, crop_size=crop, loader_workers=0, batch_size=1)
    for batch in _batches(_train_loader(settings, str(shards / "many" / "train")), 6):
        (height, width), image = batch["image_sizes"][0], batch["images"][0]
        if canvas_value is not None:
            assert tuple(image.shape[1:]) == crop
        else:
            assert tuple(image.shape[1:]) == tuple(-(-side // 32) * 32 for side in (height, width))
        fill = torch.tensor([canvas_value] * 3 if canvas_value is not None else PIXEL_MEAN).view(3, 1, 1)
        assert torch.equal(image[:, height:, :], fill.expand(3, image.shape[1] - height, image.shape[2]))
        assert torch.equal(image[:, :, width:], fill.expand(3, image.shape[1], image.shape[2] - width))
        assert not batch["targets"][0]["masks"][:, height:].any() and not batch["targets"][0]["masks"][:, :, width:].any()


def _float_convert(values, alpha=1.0, beta=0.0):
    """The official ColorAugSSDTransform.convert: float32 arithmetic, clip, truncation to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _exact_hue_saturation(planes, saturation, hue_shift):
    """Real-valued HSV (colorsys) per pixel: S scaled and capped at 1, hue + hue_shift * 2 degrees."""
    out = np.empty_like(planes)
    for row in range(planes.shape[1]):
        for col in range(planes.shape[2]):
            hue, sat, value = colorsys.rgb_to_hsv(*(planes[:, row, col] / 255.0))
            sat = sat if saturation is None else min(sat * saturation, 1.0)
            rgb = colorsys.hsv_to_rgb((hue + hue_shift / 180.0) % 1.0, sat, value)
            out[:, row, col] = np.floor(np.array(rgb) * 255 + 0.5)
    return out


def test_colour_tables_equal_float_arithmetic():
    values = np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    for alpha, beta in ((1.4, -20.0), (0.6, 0.0), (1.0, 31.5)):
        assert np.array_equal(apply_table(values, affine_table(alpha, beta)), _float_convert(values, alpha, beta))
    fused = affine_table(1.3)[affine_table(beta=-17.0)]  # brightness, then contrast
    assert np.array_equal(apply_table(values, fused), _float_convert(_float_convert(values, beta=-17.0), 1.3))


@pytest.mark.parametrize("saturation,hue_shift", [(None, 18), (None, -18), (None, 1), (1.5, 0), (0.5, 7),
                                                  (1.37, -11), (0.73, 18)])
def test_hue_saturation_is_within_one_level_of_exact_hsv(monkeypatch, saturation, hue_shift):
    monkeypatch.setattr(augment_module, "HSV_BLOCK_PIXELS", 500)  # several blocks, one of them partial
    planes = np.random.default_rng(1).integers(0, 256, (3, 30, 41), dtype=np.uint8)
    planes[:, :3] = planes[0, :3]  # grey pixels (no hue) included
    got = hue_saturation(planes, saturation, hue_shift).astype(int)
    assert np.abs(got - _exact_hue_saturation(planes, saturation, hue_shift)).max() <= 1
    assert np.array_equal(hue_saturation(planes, 1.0, 0), planes)  # identity parameters change nothing
    with pytest.raises(ValueError, match="planes"):
        hue_saturation(planes.transpose(1, 2, 0), saturation, hue_shift)


@pytest.mark.parametrize("plan", [
    JitterPlan(brightness=20.5, contrast=1.4, contrast_first=True, saturation=0.7, hue_shift=-5),
    JitterPlan(brightness=-31.0, contrast=0.6, contrast_first=False, saturation=None, hue_shift=12),
    JitterPlan(brightness=10.0, contrast=1.2, contrast_first=False, saturation=None, hue_shift=None),
    JitterPlan(brightness=None, contrast=None, contrast_first=True, saturation=1.3, hue_shift=None),
    JitterPlan(brightness=None, contrast=None, contrast_first=False, saturation=None, hue_shift=None),
])
def test_fused_jitter_equals_the_official_step_order(plan):
    hwc = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    want = hwc.transpose(2, 0, 1)
    if plan.brightness is not None:
        want = _float_convert(want, beta=plan.brightness)
    if plan.contrast_first and plan.contrast is not None:
        want = _float_convert(want, alpha=plan.contrast)
    if plan.saturation is not None or plan.hue_shift is not None:
        want = hue_saturation(np.ascontiguousarray(want), plan.saturation, plan.hue_shift or 0)
    if not plan.contrast_first and plan.contrast is not None:
        want = _float_convert(want, alpha=plan.contrast)
    assert np.array_equal(apply_jitter(Image.fromarray(hwc), plan), want)


# ---------------------------------------------------------------------------------------------- resizing
def _rank_loaders(folder, world_size, loader_workers, batch_size, states=None):
    loaders = [_train_loader(_settings(loader_workers=loader_workers, batch_size=batch_size), folder, rank, world_size)
               for rank in range(world_size)]
    for loader in loaders:
        if states is not None:
            loader.resume(states)
    return loaders


def _steps(loaders, count):
    """`count` synchronous steps: every rank takes one batch per step; returns each step's batches."""
    iterators = [iter(loader) for loader in loaders]
    return [[next(iterator) for iterator in iterators] for _ in range(count)]


def _seen(steps) -> list[tuple[int, str]]:
    return [(epoch, image_id) for step in steps for batch in step
            for epoch, image_id in zip(batch["epochs"], batch["image_ids"])]


# (world size, loader workers, per-rank batch) of each layout in turn; the first stops after 3 steps, the
# next after 2 more, the last runs on until every part has finished epoch 1.
LAYOUT_CHAINS = [
    [(2, 0, 2), (1, 0, 4)],
    [(1, 0, 4), (2, 0, 2)],
    [(2, 2, 1), (3, 1, 1)],
    [(3, 0, 1), (1, 2, 3)],
    [(2, 1, 2), (1, 0, 4), (4, 2, 1)],  # two resizes inside one epoch
]


@pytest.mark.parametrize("layout", ["many", "one"])
@pytest.mark.parametrize("chain", LAYOUT_CHAINS, ids=lambda chain: "-".join(f"{w}x{n}" for w, n, _ in chain))
def test_resized_stream_reads_every_sample_of_an_epoch_once(shards, layout, chain):
    folder = str(shards / layout / "train")
    seen, states = [], None
    for number, (world_size, loader_workers, batch_size) in enumerate(chain):
        loaders = _rank_loaders(folder, world_size, loader_workers, batch_size, states)
        last = number == len(chain) - 1
        steps = _steps(loaders, 40 if last else 3 if number == 0 else 2)
        seen += _seen(steps)
        states = [loader.state_dict() for loader in loaders]
    assert min(epoch for state in states for epoch, _ in state["positions"].values()) >= 2  # epochs 0, 1 done
    for epoch in (0, 1):
        ids = [image_id for seen_epoch, image_id in seen if seen_epoch == epoch]
        assert len(ids) == NUM_TRAIN and len(set(ids)) == NUM_TRAIN, f"epoch {epoch}: {sorted(ids)}"
    later = [(epoch, image_id) for epoch, image_id in seen if epoch >= 2]
    assert len(later) == len(set(later))


@pytest.mark.parametrize("before,after", [((2, 2), (1, 4)), ((1, 4), (2, 2))])
def test_resized_stream_keeps_the_global_batches_within_the_epoch(shards, before, after):
    """Without loader workers, what the old layout left is dealt in its batches: a step's global batch after
    the resize holds the images (and augmentations) the old layout's step would have had."""
    folder = str(shards / "many" / "train")
    reference = _steps(_rank_loaders(folder, before[0], 0, before[1]), 4)
    interrupted = _rank_loaders(folder, before[0], 0, before[1])
    _steps(interrupted, 1)
    resized = _steps(_rank_loaders(folder, after[0], 0, after[1], [loader.state_dict() for loader in interrupted]), 3)
    within_epoch = [(want, got) for want, got in zip(reference[1:], resized)
                    if all(epoch == 0 for batch in want for epoch in batch["epochs"])]
    assert within_epoch  # the shards' sizes leave at least one whole step of epoch 0 after the resize
    for want, got in within_epoch:
        assert [i for batch in want for i in batch["image_ids"]] == [i for batch in got for i in batch["image_ids"]]
        want_images, got_images = (torch.cat([batch["images"] for batch in step]) for step in (want, got))
        assert torch.equal(want_images, got_images)


def test_resize_keeps_the_skip_counts_and_refuses_another_seed(shards):
    folder = str(shards / "many" / "train")
    old = _rank_loaders(folder, 2, 0, 2)
    _steps(old, 1)
    states = [loader.state_dict() for loader in old]
    states[1]["skip_reasons"] = {"1": {"undecodable sample": 2}}
    new = _rank_loaders(folder, 1, 0, 4, states)
    assert new[0].skip_reasons == {"undecodable sample": 2}
    assert new[0].state_dict()["carried_skip_reasons"] == {"undecodable sample": 2}
    with pytest.raises(ValueError, match="stream.seed 7 but this job has 8"):
        _train_loader(_settings(seed=8, loader_workers=0), folder).resume(states)
    with pytest.raises(ValueError, match="stream states of 1 ranks but was written by 2"):
        _train_loader(_settings(loader_workers=0, batch_size=4), folder).resume(states[:1])
