"""The Ray preprocessing job: same shards as the in-process writer, resumable, bad input reported."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from pipeline.data.preprocess import PreprocessError, run_preprocess
from pipeline.data.settings import DatasetSettings, PreprocessSettings
from pipeline.synthetic import generate_dataset

pytestmark = pytest.mark.slow  # Ray tasks and killed preprocessing processes


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _digests(folder):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder)) if name.endswith(".tar")
    }


def test_ray_job_writes_resumes_and_reports(ray_local, tmp_path):
    generate_dataset(tmp_path / "raw", num_images=10, seed=2, val_fraction=0.2)
    dataset = DatasetSettings(format="custom_coco_panoptic", root=str(tmp_path / "raw"))

    def settings(output, **overrides):
        return PreprocessSettings(output=str(output), target_shard_mb=0.1, show_progress=False, **overrides)

    first = run_preprocess(dataset, settings(tmp_path / "ray"))
    train = tmp_path / "ray" / "train"
    assert first[0]["num_shards"] >= 3 and first[0]["shards_written"] == first[0]["num_shards"]
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and sum(s["num_samples"] for s in manifest["shards"]) == 8
    assert manifest["schema_version"] == 1 and len(manifest["classes"]) == 10
    # Same bytes as the in-process writer: the shard assignment and tar contents are deterministic.
    run_preprocess(dataset, settings(tmp_path / "local", executor="local"))
    assert _digests(train) == _digests(tmp_path / "local" / "train")

    # Resume after losing one shard (and a stale temporary file): only that shard is rewritten.
    before = _digests(train)
    os.remove(train / "train-000001.tar")
    (train / ".train-000001.tar.tmp-dead").write_bytes(b"partial")
    again = run_preprocess(dataset, settings(tmp_path / "ray", splits=["train"]))[0]
    assert (again["shards_written"], again["shards_reused"]) == (1, first[0]["num_shards"] - 1)
    assert _digests(train) == before

    # Bad input inside a Ray task: the driver names the file and the reason.
    broken = dataset.model_copy(update={"root": str(tmp_path / "broken")})
    generate_dataset(tmp_path / "broken", num_images=4, seed=9, val_fraction=0.25)
    victim = sorted(os.listdir(tmp_path / "broken" / "train"))[0]
    (tmp_path / "broken" / "train" / victim).write_bytes(b"garbage")
    with pytest.raises(PreprocessError, match=f"{victim}.*corrupt image"):
        run_preprocess(broken, settings(tmp_path / "bad", splits=["train"]))
    skipped = run_preprocess(broken, settings(tmp_path / "bad", splits=["train"], on_error="skip"))[0]
    assert (skipped["num_samples"], skipped["num_skipped"]) == (2, 1)
