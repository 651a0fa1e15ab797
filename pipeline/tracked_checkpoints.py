"""Checkpoints tracked in MLflow, so that any job can find, resume from or fork any run's checkpoints.

Every checkpoint a training run writes is recorded in its MLflow run as one tag (this module owns the names):

    checkpoint.step_0000004   JSON of a CheckpointRecord: step, storage URI, world size, ZeRO stage, data-stream
                              position, the metrics at that step, whether retention still keeps it, whether it
                              is the best by validation PQ so far
    checkpoint.latest_step    the newest recorded step
    checkpoint.best_step      the step of the best validation PQ
    job.001, job.002, ...     one per job that contributed to the run: its name, Ray job and submission ids,
                              cluster address, storage folder and the step it started from

`training.resume_from` names a checkpoint as `runs:/<run id>` (the run's latest kept checkpoint),
`runs:/<run id>@step=<N>`, or the checkpoint folder itself (a path or a URL); `resolve_resume_source` turns it
into the folder to load, the run it belongs to and whether the new job continues that run or forks a child of it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re

import fsspec

log = logging.getLogger("pipeline.tracked_checkpoints")

RECORD_TAG_PREFIX = "checkpoint.step_"
LATEST_TAG = "checkpoint.latest_step"
BEST_TAG = "checkpoint.best_step"
JOB_TAG_PREFIX = "job."
PARENT_RUN_TAG = "mlflow.parentRunId"  # what MLflow itself sets on a nested run: the UI shows the fork under it
FORKED_FROM_TAG = "forked_from"
TRAINER_STATE_FILE = "trainer_rank{rank}.pt"
_RUN_REFERENCE = re.compile(r"^runs:/([0-9a-f]{32})(?:@step=(\d+))?$")
# What may differ between the job that wrote a checkpoint and one that continues its run: where and how the run
# executes and is tracked (the worker count and per-worker batch: the global batch is the recipe's), and how long
# it lasts. Any other difference is a changed recipe, which forks.
NOT_RECIPE = ("name", "synthetic_dataset", "data.root", "data.paths", "preprocess", "stream.shards", "tracking",
              "scaling.num_workers", "stream.batch_size", "stream.loader_workers", "training.gradient_accumulation_steps",
              "scaling.resize_check_s", "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.ray_address",
              "scaling.storage_path", "scaling.max_failures", "scaling.runtime_env", "evaluation.checkpoint",
              "evaluation.shards", "evaluation.output", "evaluation.num_workers", "training.max_steps",
              "training.resume_from", "training.resume_mode", "training.keep_checkpoints", "training.log_every",
              "training.checkpoint_every", "training.record_sample_ids", "model.weights", "model.backbone_weights")


class ResumeError(ValueError):
    """A checkpoint reference that cannot be resumed from; the message names it and says why, in one line."""


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint at `step` inside the job's storage folder."""
    return f"checkpoint_step_{step:07d}"


@dataclasses.dataclass
class CheckpointRecord:
    step: int
    uri: str
    world_size: int
    zero_stage: int
    data_position: dict
    metrics: dict
    job: str
    kept: bool = True
    best: bool = False

    @property
    def tag_key(self) -> str:
        return f"{RECORD_TAG_PREFIX}{self.step:07d}"

    def tag_value(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_tag(cls, value: str) -> CheckpointRecord:
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: item for key, item in json.loads(value).items() if key in fields})


def records_from_tags(tags: dict[str, str]) -> list[CheckpointRecord]:
    """The checkpoint records of a run (its tags), oldest step first."""
    records = [CheckpointRecord.from_tag(value) for key, value in tags.items() if key.startswith(RECORD_TAG_PREFIX)]
    return sorted(records, key=lambda record: record.step)


class CheckpointLedger:
    """Rank 0's view of the run's checkpoint records; each change returns the tags to write.

    Retention is Ray Train's (`CheckpointConfig(num_to_keep=keep)`, no score): in each job's storage folder the
    `keep` newest checkpoints stay, so a record of this folder older than those is marked as no longer kept.
    Checkpoints of other folders (an earlier job of a continued run) are not this job's to delete."""

    def __init__(self, records: list[CheckpointRecord], job_folder: str, keep: int):
        self.records = {record.step: record for record in records}
        self.job_folder = job_folder.rstrip("/") + "/"
        self.keep = keep

    def add(self, record: CheckpointRecord, is_best: bool) -> dict[str, str]:
        changed = {record.step: record}
        if is_best:
            for earlier in self.records.values():
                if earlier.best and earlier.step != record.step:
                    earlier.best = False
                    changed[earlier.step] = earlier
            record.best = True
        self.records[record.step] = record
        own = sorted((r for r in self.records.values() if r.uri.startswith(self.job_folder) and r.kept),
                     key=lambda r: r.step)
        for removed in own[:-self.keep]:
            removed.kept = False
            changed[removed.step] = removed
        tags = {item.tag_key: item.tag_value() for item in changed.values()}
        tags[LATEST_TAG] = str(max(self.records))
        if is_best:
            tags[BEST_TAG] = str(record.step)
        return tags


def job_contribution_tags(tags: dict[str, str], contribution: dict) -> dict[str, str]:
    """A `job.NNN` tag for `contribution` unless the same job (all but its starting step) is recorded already,
    as it is when Ray restarts the job's workers."""
    identity = {key: value for key, value in contribution.items() if key != "from_step"}
    recorded = [json.loads(value) for key, value in tags.items() if key.startswith(JOB_TAG_PREFIX)]
    if any({key: value for key, value in job.items() if key != "from_step"} == identity for job in recorded):
        return {}
    return {f"{JOB_TAG_PREFIX}{len(recorded) + 1:03d}": json.dumps(contribution, separators=(",", ":"))}


# ------------------------------------------------------------------------------------------ resolving
@dataclasses.dataclass(frozen=True)
class ResumeReference:
    run_id: str | None = None
    step: int | None = None
    uri: str | None = None


def parse_resume_reference(text: str) -> ResumeReference:
    """runs:/<run id>[@step=<N>] or a checkpoint folder; raises ValueError('resume_from: ...') otherwise."""
    if text.startswith("runs:/"):
        match = _RUN_REFERENCE.match(text)
        if match is None:
            raise ValueError(f"resume_from: {text!r} is not runs:/<32-hex-digit run id> or runs:/<run id>@step=<N>")
        return ResumeReference(run_id=match.group(1), step=None if match.group(2) is None else int(match.group(2)))
    if text.startswith("models:/"):
        raise ValueError(f"resume_from: {text!r} is a registered model, not a checkpoint (models hold no optimizer "
                         "state: start from one with model.weights)")
    return ResumeReference(uri=text)


@dataclasses.dataclass(frozen=True)
class ResumeSource:
    """What a job starts from: the checkpoint folder, its step and world size, the run it belongs to, and how
    the job goes on from it ('continue' that run, or 'fork' a child run)."""

    reference: str
    uri: str
    step: int
    world_size: int
    run_id: str | None
    mode: str
    reason: str


def resolve_resume_source(job, tracking_uri: str) -> ResumeSource:
    """`job.training.resume_from` resolved and checked (the folder is there and readable, the world size fits),
    and the continue-or-fork decision made. Raises ResumeError in one line naming the reference."""
    reference = job.training.resume_from
    parsed = parse_resume_reference(reference)
    client = _client(tracking_uri)
    if parsed.run_id is not None:
        records = records_from_tags(_run(client, parsed.run_id, reference).data.tags)
        record = _pick_record(records, parsed.step, reference)
        uri, run_id, latest = record.uri, parsed.run_id, max(r.step for r in records)
    else:
        uri, run_id, latest = parsed.uri, None, None
    state = read_checkpoint_state(uri, reference)
    if run_id is None and state["run_id"] is not None:
        run_id = state["run_id"]
        latest = _latest_step(client, run_id, reference)
    mode, reason = _continue_or_fork(job, client, run_id, state["step"], latest)
    return ResumeSource(reference, uri, state["step"], state["world_size"], run_id, mode, reason)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    from pipeline.tracking import limit_http_retries

    limit_http_retries()  # an unreachable server fails the resolution in seconds, not minutes
    return MlflowClient(tracking_uri)


def _run(client, run_id: str, reference: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise ResumeError(f"training.resume_from: {reference}: no such MLflow run at {client.tracking_uri} "
                          f"({error.message.splitlines()[0]})") from None


def _pick_record(records: list[CheckpointRecord], step: int | None, reference: str) -> CheckpointRecord:
    kept = [record for record in records if record.kept]
    if step is None:
        if not kept:
            raise ResumeError(f"training.resume_from: {reference}: the run has no kept checkpoint "
                              f"({len(records)} recorded, all removed by retention)")
        return kept[-1]
    matching = [record for record in records if record.step == step]
    if not matching:
        raise ResumeError(f"training.resume_from: {reference}: the run recorded no checkpoint at step {step} "
                          f"(recorded: {[r.step for r in records] or 'none'})")
    if not matching[0].kept:
        raise ResumeError(f"training.resume_from: {reference}: the checkpoint at step {step} ({matching[0].uri}) was "
                          f"removed by retention (kept: {[r.step for r in kept] or 'none'})")
    return matching[0]


def _latest_step(client, run_id: str, reference: str) -> int | None:
    """The newest step recorded by the run a bare checkpoint folder belongs to (None if the store lacks it)."""
    from mlflow.exceptions import MlflowException

    try:
        records = records_from_tags(client.get_run(run_id).data.tags)
    except MlflowException:
        log.warning("%s: its MLflow run %s is not in this store; the job starts a new run", reference, run_id)
        return None
    return records[-1].step if records else None


def read_checkpoint_state(uri: str, reference: str | None = None) -> dict:
    """Step, run id and world size of the checkpoint folder at `uri` (from rank 0's trainer state), checking
    that every rank's state and the DeepSpeed state are there. Raises ResumeError naming it."""
    import torch

    name = f"training.resume_from: {reference or uri}" + (f" ({uri})" if reference not in (None, uri) else "")
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isdir(path):
        raise ResumeError(f"{name}: the checkpoint is gone (no such folder)")
    ranks = fs.glob(f"{path.rstrip('/')}/{TRAINER_STATE_FILE.format(rank='*')}")
    if not ranks or not fs.isdir(f"{path.rstrip('/')}/state"):
        raise ResumeError(f"{name}: not a complete training checkpoint (expected trainer_rank*.pt and state/)")
    try:
        with fs.open(f"{path.rstrip('/')}/{TRAINER_STATE_FILE.format(rank=0)}", "rb") as handle:
            state = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=False)
        step, run_id = int(state["step"]), state.get("run_id")
    except Exception as error:  # a truncated or foreign file: whatever torch.load raises
        raise ResumeError(f"{name}: unreadable trainer state ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    return {"step": step, "run_id": run_id, "world_size": len(ranks)}


def _continue_or_fork(job, client, run_id: str | None, step: int, latest: int | None) -> tuple[str, str]:
    requested = job.training.resume_mode
    if run_id is None or latest is None:
        if requested == "continue":
            raise ResumeError(f"training.resume_from: {job.training.resume_from}: no MLflow run of this checkpoint "
                              "is in the store, so there is none to continue (use resume_mode: fork or auto)")
        return "fork", "the checkpoint's MLflow run is not in this store: a new run"
    if requested == "fork":
        return "fork", "resume_mode: fork"
    if step != latest:
        if requested == "continue":
            raise ResumeError(f"training.resume_from: {job.training.resume_from}: continuing the run from step {step} "
                              f"would overwrite its steps after {step} (its latest checkpoint is at {latest}); "
                              "fork it instead (resume_mode: fork or auto)")
        return "fork", f"step {step} is not the run's latest checkpoint (step {latest})"
    changed = recipe_changes(job, _source_job_config(client, run_id))
    if changed and requested == "auto":
        return "fork", f"the recipe changed: {', '.join(changed)}"
    return "continue", "the run's latest checkpoint" + (f" (recipe changes kept by resume_mode: continue: "
                                                        f"{', '.join(changed)})" if changed else "")


def _source_job_config(client, run_id: str) -> dict | None:
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "job_config.json", folder)
        except (MlflowException, OSError):
            return None
        with open(path) as handle:
            return json.load(handle)


def recipe_changes(job, source_config: dict | None) -> list[str]:
    """Flattened job-config keys whose values differ from the source run's, leaving out NOT_RECIPE."""
    from pipeline.tracking import flatten

    if source_config is None:
        return []
    ours, theirs = flatten(job.model_dump(mode="json")), flatten(source_config)
    differing = {key for key in set(ours) | set(theirs) if ours.get(key) != theirs.get(key)}
    return sorted(key for key in differing
                  if not any(key == prefix or key.startswith(prefix + ".") for prefix in NOT_RECIPE))
