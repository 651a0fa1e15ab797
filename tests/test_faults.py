"""Fault injection: every damaged shard, bad file, empty split, odd file name and interrupted run of the issue
"nothing lost, nothing silent" reproduced, and each outcome asserted by its count, its reason and the file it
names. Numbers in the test names refer to the issue's items."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model import make_config
from model.checkpoint import build_from_config, save_model
from pipeline.data.preprocess import PreprocessError, run_preprocess
from pipeline.data.settings import DatasetSettings, PreprocessSettings, StreamSettings
from pipeline.data.shards import CHECKSUM_KEY, EmptySplitError, ShardError, file_checksum
from pipeline.data.stream import (
    ModelInputs,
    PanopticShardStream,
    ResumableLoader,
    augment_params_from_settings,
    build_eval_loader,
    build_train_loader,
)
from pipeline.evaluate import main as evaluate_main
from pipeline.job import main as job_main
from pipeline.synthetic import GeneratorSettings, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN = 6  # of the 8 generated images; the other 2 are val
INPUTS = ModelInputs(num_text_slots=4, size_divisibility=32, pixel_mean=(123.675, 116.28, 103.53))
CONFIG = make_config("tiny", num_classes=10, object_mask_threshold=0.0)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "raw"
    generate_dataset(root, num_images=8, seed=5, val_fraction=0.25, settings=GeneratorSettings(min_size=64, max_size=96))
    return root


@pytest.fixture
def raw(raw_dataset, tmp_path) -> Path:
    """A private copy of the raw dataset, free to damage."""
    shutil.copytree(raw_dataset, tmp_path / "raw")
    return tmp_path / "raw"


@pytest.fixture(scope="module")
def one_shard(raw_dataset, tmp_path_factory) -> Path:
    """The train split in one shard of NUM_TRAIN samples (copy it before damaging it)."""
    out = tmp_path_factory.mktemp("one_shard")
    run_preprocess(_dataset(raw_dataset), _settings(out, target_shard_mb=100.0, splits=["train"]))
    return out / "train"


@pytest.fixture
def shard_copy(one_shard, tmp_path) -> Path:
    shutil.copytree(one_shard, tmp_path / "train")
    return tmp_path / "train"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(build_from_config(CONFIG).eval(), CONFIG, path)
    return path


def _dataset(root: Path) -> DatasetSettings:
    return DatasetSettings(format="custom_coco_panoptic", root=str(root))


def _settings(output: Path, **overrides) -> PreprocessSettings:
    values = dict(output=str(output), target_shard_mb=0.01, executor="local", show_progress=False)
    return PreprocessSettings(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------- shard damage
def _tar(folder: Path) -> Path:
    return folder / "train-000000.tar"


def _members(tar_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return tar.getmembers()


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def _reseal(folder: Path) -> None:
    """Record the shards' present size and checksum in the manifest: damage done before the checksum was
    taken (or an encoder bug), which only the reading checks below the checksum can catch."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.update(file_checksum(fsspec.filesystem("file"), str(folder / entry["name"])))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _drop_checksums(folder: Path) -> None:
    """A manifest written before shards had checksums: only sizes."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop(CHECKSUM_KEY)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _eval_pass(folder: Path, on_error: str = "skip") -> tuple[list[str], dict[str, int]]:
    loader = build_eval_loader(str(folder), INPUTS, rank=0, world_size=1, on_error=on_error)
    ids = [image_id for batch in loader for image_id in batch["image_ids"]]
    return ids, loader.skip_reasons


def _training_pass(folder: Path) -> tuple[list[str], dict[str, int]]:
    """One epoch of the training stream (augmentation, targets, text tokens)."""
    settings = StreamSettings(augmentation="ade20k", crop_size=64)
    stream = PanopticShardStream(str(folder), training=True, augment_params=augment_params_from_settings(settings),
                                 batch_size=2, num_text_slots=4, repeat=False)
    loader = ResumableLoader(stream, num_workers=0)
    ids = [image_id for batch in loader for image_id in batch["image_ids"]]
    return ids, loader.skip_reasons


def test_2_damaged_tar_header_loses_the_shard_counted_never_silently(shard_copy, caplog):
    second_sample_header = _members(_tar(shard_copy))[3].offset
    _patch(_tar(shard_copy), second_sample_header + 148, b"garbage!")  # the header checksum field
    with caplog.at_level("WARNING"):
        ids, skipped = _eval_pass(shard_copy)
    assert ids == [] and skipped == {"damaged shard": NUM_TRAIN}
    assert "train-000000.tar does not match its manifest checksum" in caplog.text
    assert _training_pass(shard_copy) == ([], {"damaged shard": NUM_TRAIN})
    # A manifest without checksums (older shards): the tar ends at the damaged header; what it lost is counted.
    _drop_checksums(shard_copy)
    ids, skipped = _eval_pass(shard_copy)
    assert len(ids) == 1 and skipped == {"tar breaks off": NUM_TRAIN - 1}
    ids, skipped = _training_pass(shard_copy)
    assert len(ids) == 1 and skipped == {"tar breaks off": NUM_TRAIN - 1}
    with pytest.raises(ShardError, match=r"train-000000.tar ends after 1 of the 6 samples"):
        _eval_pass(shard_copy, on_error="fail")


def test_2_truncated_tar_is_counted_not_a_traceback(shard_copy, caplog):
    tar_path = _tar(shard_copy)
    cut = _members(tar_path)[7].offset_data + 10  # inside the third sample's second member
    tar_path.write_bytes(tar_path.read_bytes()[:cut])
    ids, skipped = _eval_pass(shard_copy)
    assert ids == [] and skipped == {"damaged shard": NUM_TRAIN}
    _reseal(shard_copy)
    with caplog.at_level("WARNING"):
        ids, skipped = _eval_pass(shard_copy)
    assert len(ids) == 2 and skipped == {"tar breaks off": NUM_TRAIN - 2}
    assert "train-000000.tar breaks off after 2 of its 6 samples" in caplog.text


def test_2_stream_split_by_sample_counts_each_lost_sample_once(raw, tmp_path):
    """Fewer shards than readers: every reader reads every shard and keeps its share, so a lost shard must
    be counted once over all readers, and the others keep their samples."""
    run_preprocess(_dataset(raw), _settings(tmp_path / "shards", splits=["train"], target_shard_mb=0.02))
    folder = tmp_path / "shards" / "train"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert 1 < len(manifest["shards"]) < 4
    victim = manifest["shards"][0]
    _patch(folder / victim["name"], 600, b"\x00\x01")
    loaders = [build_eval_loader(str(folder), INPUTS, rank=r, world_size=4) for r in range(4)]
    ids = [image_id for loader in loaders for batch in loader for image_id in batch["image_ids"]]
    assert len(ids) == len(set(ids)) == NUM_TRAIN - victim["num_samples"]
    assert sum(loader.num_skipped for loader in loaders) == victim["num_samples"]


def test_2_a_resumed_training_stream_counts_each_skip_once(raw, tmp_path):
    """The skip counts travel in the checkpoint; replaying to the resume position counts nothing twice."""
    run_preprocess(_dataset(raw), _settings(tmp_path / "shards", splits=["train"], target_shard_mb=0.02))
    folder = str(tmp_path / "shards" / "train")
    lost = json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())["shards"][1]["num_samples"]
    _patch(tmp_path / "shards" / "train" / "train-000001.tar", 600, b"\x00\x01")
    settings = StreamSettings(augmentation="none", crop_size=64, loader_workers=0, batch_size=1, shuffle_buffer=2)

    def loader():
        return build_train_loader(settings, INPUTS, folder, rank=0, world_size=1)

    steps = 3 * (NUM_TRAIN - lost)  # three epochs
    whole = loader()
    uninterrupted = [whole.num_skipped for _ in islice(whole, steps)]
    assert uninterrupted[-1] == 3 * lost and uninterrupted[0] in (0, lost)
    for cut in range(1, steps, 2):
        first = loader()
        for _ in islice(first, cut):
            pass
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert [resumed.num_skipped for _ in islice(resumed, steps - cut)] == uninterrupted[cut:], cut


@pytest.mark.parametrize("member", ["image.jpg", "seg.png", "meta.json"])
def test_3_flipped_bytes_in_any_member_are_caught_by_the_shard_checksum(shard_copy, member):
    info = next(m for m in _members(_tar(shard_copy)) if m.name.endswith(member))
    position = info.offset_data + info.size // 2
    data = bytearray(_tar(shard_copy).read_bytes())
    data[position] ^= 0x5A
    _tar(shard_copy).write_bytes(bytes(data))
    assert _eval_pass(shard_copy) == ([], {"damaged shard": NUM_TRAIN})
    with pytest.raises(ShardError, match="train-000000.tar does not match its manifest checksum"):
        _eval_pass(shard_copy, on_error="fail")


def _rewrite_member(folder: Path, member: str, change) -> None:
    """Replace the first sample's `member` by change(bytes) in a rewritten tar (USTAR, same order)."""
    with tarfile.open(_tar(folder)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_key = members[0][0].name.split(".")[0]
    with tarfile.open(_tar(folder), "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{first_key}.{member}":
                data = change(data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _reseal(folder)


def _out_of_table(png: bytes) -> bytes:
    index_map = np.asarray(Image.open(io.BytesIO(png))).copy()
    index_map[0, 0] = index_map.max() + 7  # no row of the segment table
    buffer = io.BytesIO()
    Image.fromarray(index_map).save(buffer, format="PNG")
    return buffer.getvalue()


def test_3_segment_map_outside_its_table_is_a_counted_skip_in_training_and_evaluation(shard_copy, checkpoint):
    _rewrite_member(shard_copy, "seg.png", _out_of_table)
    ids, skipped = _training_pass(shard_copy)
    assert len(ids) == NUM_TRAIN - 1 and skipped == {"segment map outside its table": 1}
    ids, skipped = _eval_pass(shard_copy)
    assert len(ids) == NUM_TRAIN - 1 and skipped == {"segment map outside its table": 1}
    # Evaluation used to stop with an IndexError here: now it scores the rest and says what it left out.
    result = _evaluate_model(checkpoint, shard_copy)
    assert result["num_images"] == NUM_TRAIN - 1 and result["num_skipped"] == 1
    assert result["skipped"] == {"segment map outside its table": 1}


def test_3_image_that_does_not_decode_fully_is_a_counted_skip(shard_copy):
    _rewrite_member(shard_copy, "image.jpg", lambda jpeg: jpeg[: len(jpeg) // 2])  # truncated JPEG
    for ids, skipped in (_eval_pass(shard_copy), _training_pass(shard_copy)):
        assert len(ids) == NUM_TRAIN - 1 and skipped == {"undecodable sample": 1}


def test_3_manifest_records_each_shard_checksum(one_shard):
    manifest = json.loads((one_shard / "manifest.json").read_text())
    entry = manifest["shards"][0]
    assert entry == {**entry, **file_checksum(fsspec.filesystem("file"), str(one_shard / entry["name"]))}
    done = json.loads((one_shard / f"{entry['name']}.done.json").read_text())
    assert done[CHECKSUM_KEY] == entry[CHECKSUM_KEY] and done["bytes"] == entry["bytes"]


def _evaluate_model(checkpoint: Path, shards: Path) -> dict:
    from pipeline.evaluation.runner import evaluate_model

    return evaluate_model(checkpoint, shards, metrics=["pq"], test_size=(48, 192), progress=False, device="cpu")


# ---------------------------------------------------------------------------------------------- empty splits
def _empty_annotations(raw: Path, split: str) -> None:
    path = raw / "annotations" / f"panoptic_{split}.json"
    document = json.loads(path.read_text())
    document["annotations"] = []
    path.write_text(json.dumps(document))


def test_4_preprocessing_an_empty_split_fails_naming_it(raw, tmp_path):
    _empty_annotations(raw, "val")
    with pytest.raises(PreprocessError, match=r"split 'val' has no images: .*panoptic_val.json lists no annotations"):
        run_preprocess(_dataset(raw), _settings(tmp_path / "shards", splits=["val"]))


def test_4_preprocessing_a_split_whose_images_are_all_bad_fails_with_the_reasons_kept(raw, tmp_path):
    for image in (raw / "val").iterdir():
        image.write_bytes(b"not an image")
    with pytest.raises(PreprocessError, match=r"split 'val': all 2 images are bad input .*corrupt image"):
        run_preprocess(_dataset(raw), _settings(tmp_path / "shards", splits=["val"], on_error="skip"))
    manifest = json.loads((tmp_path / "shards" / "val" / "manifest.json").read_text())
    assert manifest["num_samples"] == 0 and manifest["num_skipped"] == 2


def _empty_split_folder(one_shard: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    manifest = json.loads((one_shard / "manifest.json").read_text())
    manifest.update(num_samples=0, shards=[])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_4_streams_over_an_empty_split_fail_at_once(one_shard, tmp_path):
    folder = _empty_split_folder(one_shard, tmp_path)
    settings = StreamSettings(augmentation="none", crop_size=64, loader_workers=0)
    with pytest.raises(EmptySplitError, match=r"split 'train' at .*empty has no samples \(it has no images"):
        build_train_loader(settings, INPUTS, str(folder), rank=0, world_size=1)
    with pytest.raises(EmptySplitError, match="split 'train'"):
        build_eval_loader(str(folder), INPUTS, rank=0, world_size=1)


def test_4_training_stream_that_reads_nothing_fails_instead_of_spinning(shard_copy):
    _patch(_tar(shard_copy), 700, b"\x00")
    loader = build_train_loader(StreamSettings(augmentation="none", crop_size=64, loader_workers=0), INPUTS,
                                str(shard_copy), rank=0, world_size=1)
    with pytest.raises(EmptySplitError, match=r"read no sample in epoch 0 \(6 skipped: \{'damaged shard': 6\}"):
        next(iter(loader))


def test_4_evaluating_an_empty_or_unreadable_split_exits_2_naming_it(one_shard, shard_copy, checkpoint, tmp_path,
                                                                      capsys):
    empty = _empty_split_folder(one_shard, tmp_path)
    command = ["model", "--checkpoint", str(checkpoint), "--metrics", "pq", "--test-size", "48", "192"]
    assert evaluate_main([*command, "--shards", str(empty)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"error: split 'train' at {empty} has no samples" in error
    _patch(_tar(shard_copy), 700, b"\x00")
    assert evaluate_main([*command, "--shards", str(shard_copy)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: no image of {shard_copy} could be read: 6 skipped ({{'damaged shard': 6}}")


def test_2_evaluation_reports_what_it_skipped(one_shard, checkpoint, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(one_shard, folder)
    _patch(_tar(folder), _members(_tar(folder))[3].offset + 148, b"garbage!")
    _drop_checksums(folder)
    out = tmp_path / "result.json"
    assert evaluate_main(["model", "--checkpoint", str(checkpoint), "--shards", str(folder), "--metrics", "pq",
                          "--test-size", "48", "192", "--json-out", str(out), "--out", str(tmp_path / "eval")]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 1 and result["num_skipped"] == NUM_TRAIN - 1
    assert result["skipped"] == {"tar breaks off": NUM_TRAIN - 1}
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_skipped"] == NUM_TRAIN - 1 and metrics["skipped"] == result["skipped"]


# ---------------------------------------------------------------------------------------------- file names
def _rename_to_non_utf8(raw: Path, split: str = "train") -> tuple[bytes, str]:
    """The first image of a split renamed to a name that is not UTF-8 (as a file system may hold it), the
    annotation JSON pointing at it the way Python spells such a name (surrogate escapes)."""
    path = raw / "annotations" / f"panoptic_{split}.json"
    document = json.loads(path.read_text())
    image = document["images"][0]
    new_name = b"caf\xe9-" + image["file_name"].encode()
    os.rename(raw / split / image["file_name"], os.fsencode(raw / split) + b"/" + new_name)
    image["file_name"] = os.fsdecode(new_name)
    path.write_text(json.dumps(document))
    return new_name, str(image["id"])


def test_5_non_utf8_file_names_are_read(raw, tmp_path):
    _rename_to_non_utf8(raw)
    summary = run_preprocess(_dataset(raw), _settings(tmp_path / "shards", splits=["train"]))[0]
    assert (summary["num_samples"], summary["num_skipped"]) == (NUM_TRAIN, 0)


def test_5_bad_input_with_a_non_utf8_name_is_skipped_and_named_printably(raw, tmp_path, capsys):
    new_name, image_id = _rename_to_non_utf8(raw)
    (raw / "train" / os.fsdecode(new_name)).write_bytes(b"not an image")
    summary = run_preprocess(_dataset(raw), _settings(tmp_path / "shards", splits=["train"], on_error="skip"))[0]
    assert (summary["num_samples"], summary["num_skipped"]) == (NUM_TRAIN - 1, 1)
    skipped = json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())["skipped"]
    assert skipped[0]["image_id"] == image_id and skipped[0]["file"].endswith("caf\\xe9-" + new_name[5:].decode())
    with pytest.raises(PreprocessError, match=r"bad input .*caf\\xe9-.*corrupt image") as error:
        run_preprocess(_dataset(raw), _settings(tmp_path / "fail", splits=["train"]))
    print(error.value)  # printable: stdout is strict UTF-8, a surrogate would raise UnicodeEncodeError here
    assert "caf\\xe9" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- re-runs
def test_6_fixing_an_input_rebuilds_its_shard(raw, tmp_path):
    settings = _settings(tmp_path / "shards", splits=["train"])
    victim = sorted((raw / "train").iterdir())[0]
    good = victim.read_bytes()
    victim.write_bytes(b"broken".ljust(len(good), b"\0"))  # same size: the same shard plan
    first = run_preprocess(_dataset(raw), settings.model_copy(update={"on_error": "skip"}))[0]
    assert first["num_skipped"] == 1 and first["num_shards"] > 1
    victim.write_bytes(good)  # the fix
    second = run_preprocess(_dataset(raw), settings)[0]
    assert (second["num_samples"], second["num_skipped"]) == (NUM_TRAIN, 0)
    assert (second["shards_written"], second["shards_reused"]) == (1, first["num_shards"] - 1)
    # Unchanged inputs: everything reused. A shard damaged on disk since: written again.
    assert run_preprocess(_dataset(raw), settings)[0]["shards_reused"] == first["num_shards"]
    _patch(tmp_path / "shards" / "train" / "train-000001.tar", 700, b"\x00")
    third = run_preprocess(_dataset(raw), settings)[0]
    assert (third["shards_written"], third["num_samples"]) == (1, NUM_TRAIN)
    assert _eval_pass(tmp_path / "shards" / "train")[1] == {}


def test_7_temporaries_of_a_killed_run_are_removed_by_the_next(raw, tmp_path):
    """A real kill: a local preprocessing process SIGKILLs itself while renaming its first finished shard."""
    script = f"""
import os, signal
from pipeline.data import preprocess
from pipeline.data.settings import DatasetSettings, PreprocessSettings
original = preprocess._write_tar
def dying(fs, path, samples):
    fs.mv = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    return original(fs, path, samples)
preprocess._write_tar = dying
preprocess.run_preprocess(DatasetSettings(format="custom_coco_panoptic", root={str(raw)!r}),
    PreprocessSettings(output={str(tmp_path / "shards")!r}, splits=["train"], executor="local", show_progress=False,
                       target_shard_mb=0.01))
"""
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    folder = tmp_path / "shards" / "train"
    orphans = [p.name for p in folder.iterdir() if ".tmp-" in p.name]
    assert len(orphans) == 1 and orphans[0].startswith(".train-000000.tar.tmp-")
    # A temporary of a writer still running here (this process) is left alone.
    alive = folder / f".train-000009.tar.tmp-{socket.gethostname()}-{os.getpid()}-feed"
    alive.write_bytes(b"being written")
    run_preprocess(_dataset(raw), _settings(tmp_path / "shards", splits=["train"]))
    assert sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) == [alive.name]


# ---------------------------------------------------------------------------------------------- command lines
def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


def test_8_evaluate_command_names_bad_files_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt" / "a.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "pred" / "a.png").write_bytes(b"\x89PNG garbage")
    folders = ["--gt-folder", str(tmp_path / "gt"), "--pred-folder", str(tmp_path / "pred")]
    cases = [
        (["panoptic", "--gt-json", str(tmp_path / "bad.json"), "--pred-json", str(tmp_path / "bad.json"), *folders],
         f"{tmp_path / 'bad.json'} is not a JSON file: Expecting value: line 1 column 1"),
        (["panoptic", "--gt-json", str(tmp_path / "list.json"), "--pred-json", str(tmp_path / "list.json"), *folders],
         f"{tmp_path / 'list.json'} must hold a JSON object, not a list"),
        (["instance", "--gt-json", str(tmp_path / "list.json"), "--results-json", str(tmp_path / "list.json")],
         f"{tmp_path / 'list.json'} must hold a JSON object, not a list"),
        (["semantic", *folders, "--num-classes", "3"], "a.png is not a readable image: cannot identify image file"),
    ]
    for argv, message in cases:
        assert evaluate_main(argv) == 2, argv
        assert message in _one_line_error(capsys)


def _job_file(tmp_path: Path, raw: Path, **preprocess) -> Path:
    document = {"kind": "preprocess", "name": "faults",
                "data": {"format": "custom_coco_panoptic", "root": str(raw)},
                "preprocess": {"output": str(tmp_path / "shards"), "executor": "local", "show_progress": False,
                               "target_shard_mb": 0.01, **preprocess}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_8_job_bad_input_under_on_error_fail_is_one_line_and_exit_2(raw, tmp_path, capsys):
    victim = sorted((raw / "train").iterdir())[0]
    victim.write_bytes(b"garbage")
    assert job_main([str(_job_file(tmp_path, raw, on_error="fail"))]) == 2
    assert f"error: bad input {victim} (image " in _one_line_error(capsys)


def test_8_job_on_an_empty_split_is_one_line_and_exit_2(raw, tmp_path, capsys):
    _empty_annotations(raw, "train")
    assert job_main([str(_job_file(tmp_path, raw))]) == 2
    assert "error: split 'train' has no images" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------- Ray under load
def test_9_test_ray_instances_leave_memory_kills_to_the_kernel():
    """Ray's memory monitor kills its own (small) workers when anything fills the shared node; the tests'
    Ray instances (which inherit this environment) must not (tests/conftest.py)."""
    assert os.environ.get("RAY_memory_monitor_refresh_ms") == "0"
