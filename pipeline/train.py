"""Training: the `Trainer`, one worker's loop (the step, logging, validation, checkpoints), which takes a small
`TrainContext` (rank, world size, where to resume from, how to report) and knows nothing of Ray;
pipeline/launch.py's Ray Train worker function builds that context.

Every checkpoint holds the worker's DeepSpeed state plus its `Trainer.state_dict()` (data-stream position, RNG
states, step, MLflow run, best validation), so a restarted worker group or a resubmitted job continues without
repeating or skipping samples, on the same number of workers or another (docs/elastic.md). Rank 0 logs to
MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from model.backbones.weights import load_backbone_weights
from model.block_execution import compile_blocks, set_activation_checkpointing
from model.checkpoint import build_from_config, load_finetuning_weights, save_model
from model.criterion import LossConfig, training_loss
from model.inference import resolve_inference_size, thresholds_from_config
from model.oneformer import OneFormer
from model.presets import OneFormerConfig
from pipeline.config import JobConfig, local_weights
from pipeline.data.readers import ClassInfo
from pipeline.data.shards import manifest_classes, read_manifest
from pipeline.data.stream import ModelInputs, build_eval_loader, build_train_loader
from pipeline.distributed import (
    checkpoint_client_state,
    full_state_dict,
    has_partitioned_optimizer,
    load_resized,
    wrap_with_deepspeed,
)
from pipeline.evaluation.report import save_pictures
from pipeline.evaluation.runner import EvaluationOptions, evaluate, merge_parts, split_quota
from pipeline.registry import ExportedModel, register_exported_models
from pipeline.tracked_checkpoints import (
    FORKED_FROM_TAG,
    TRAINER_STATE_FILE,
    CheckpointLedger,
    CheckpointRecord,
    checkpoint_dir_name,
    job_contribution_tags,
    records_from_tags,
)
from pipeline.tracking import RunTracker

log = logging.getLogger("pipeline.train")
CHECKPOINT_TAG = "state"
SAMPLE_IDS_FILE = "samples_rank{rank}.jsonl"


@dataclasses.dataclass
class TrainContext:
    """What a worker's Trainer gets from whatever launched it."""

    rank: int
    world_size: int
    report: Callable[[dict, str, str], None]
    """report(metrics, checkpoint folder, checkpoint name): hands a checkpoint and its metrics to the launcher."""
    tracking_uri: str
    resume_from: str | None = None
    """A local checkpoint folder written by `Trainer.save_checkpoint`."""
    run_tags: dict[str, str] = dataclasses.field(default_factory=dict)
    """Tags of a new MLflow run; `ray_job_id`, `ray_submission_id` and `ray_cluster` also name the job in the
    run's job.NNN tags (pipeline/tracked_checkpoints.py)."""
    fork_from: dict | None = None
    """When `resume_from` is another run's checkpoint to fork: {"run_id", "reference", "step"} of it; the
    Trainer then starts a child run of that run instead of continuing it."""


def read_classes(job: JobConfig) -> ClassInfo:
    fs, root = fsspec.core.url_to_fs(job.split_shards(job.data.train_split))
    return manifest_classes(read_manifest(fs, root))


def _data_class_names(job: JobConfig) -> tuple[str, ...] | None:
    """The training split's class names, to tell weights of another class set of the same size; None where
    no shards exist yet (a model built outside training), leaving the class count as the only test."""
    try:
        return read_classes(job).names
    except FileNotFoundError:
        return None


def build_training_model(job: JobConfig, config: OneFormerConfig) -> tuple[OneFormer, dict[str, str]]:
    """A fresh model, then the backbone weights, then the whole-model weights of the job, all loaded strictly
    (the class head of weights for another class set re-initialised, named in the log and the parameters);
    then the job's activation checkpointing and compilation of the repeated blocks. Returns the model and what
    it was initialised from (MLflow parameters)."""
    model = build_from_config(config)
    initialised: dict[str, str] = {}
    if job.model.backbone_weights is not None:
        report = load_backbone_weights(model.backbone, job.model.backbone_weights)
        log.info("backbone weights: %s", report.summary())
        initialised |= {"init.backbone_weights": report.source,
                        "init.backbone_tensors_loaded": f"{report.loaded}/{report.backbone_tensors}"}
    if job.model.weights is not None:
        weights = load_finetuning_weights(model, local_weights(job.model.weights), _data_class_names(job))
        log.info("model weights: %s", weights.summary())
        initialised |= {"init.weights": job.model.weights, "init.tensors_loaded": str(weights.loaded)}
        if weights.reinitialised:  # fine-tuning on another class set: the class head starts fresh
            initialised["init.reinitialised"] = (f"{', '.join(weights.reinitialised)} "
                                                 f"({weights.source_num_classes} -> {weights.model_num_classes} "
                                                 "classes)")
        if weights.fresh_text_mapper:
            initialised["init.fresh_text_mapper_tensors"] = str(weights.fresh_text_mapper)
    kinds = job.model.checkpointed_block_kinds()
    if kinds:
        log.info("activation checkpointing: %d blocks of %s", set_activation_checkpointing(model, kinds), kinds)
    if job.model.compile:
        log.info("compiled %d repeated blocks", compile_blocks(model))
    return model, initialised


class Trainer:
    """One worker's training: `train_step` is the step; `fit` runs steps, logging, checkpoints, validation."""

    def __init__(self, job: JobConfig, context: TrainContext):
        self.job, self.context = job, context
        self.rank, self.world_size = context.rank, context.world_size
        self.batch_layout = job.batch_layout(self.world_size)
        self.sized = job.at_world_size(self.world_size)  # the per-worker batch and accumulation of this size
        torch.manual_seed(job.training.seed)
        self.classes = read_classes(job)
        self.model_config = job.model.oneformer_config(self.classes.num_classes)
        model, initialised = build_training_model(job, self.model_config)
        self.losses = LossConfig()
        self.criterion = self.losses.build_criterion(self.classes.num_classes)
        saved = _trainer_states(context.resume_from) if context.resume_from is not None else []
        self.resized_from = len(saved) if saved and len(saved) != self.world_size else None
        universal = self.resized_from is not None and has_partitioned_optimizer(context.resume_from, CHECKPOINT_TAG)
        self.engine, self.scheduler = wrap_with_deepspeed(model, self.sized, load_universal=universal)
        self.inputs = ModelInputs.from_config(self.model_config)
        self.loader = build_train_loader(self.sized.stream, self.inputs, job.split_shards(job.data.train_split),
                                         self.rank, self.world_size)
        self.evaluation_model: OneFormer | None = None  # built at the first validation, then only refreshed
        self.step = self.images_seen = 0
        self.sample_ids: list[dict] | None = [] if job.training.record_sample_ids else None  # since the last checkpoint
        self.best: dict | None = None  # step and validation metrics of the best PQ so far (rank 0)
        self.run_id: str | None = None
        if saved:
            self.load_checkpoint(context.resume_from, saved, universal)
        if context.fork_from is not None:  # the step, weights and stream go on; the run and its best start anew
            self.run_id, self.best = None, None
        self.tracker: RunTracker | None = None
        self.ledger: CheckpointLedger | None = None
        if self.rank == 0 and not self.finished:
            self._open_run(initialised)

    def _open_run(self, initialised: dict[str, str]) -> None:
        """Rank 0: open (or reopen) the MLflow run, read its checkpoint records and record this job in it."""
        context, fork = self.context, self.context.fork_from
        tags = context.run_tags if fork is None else {**context.run_tags, FORKED_FROM_TAG: fork["reference"]}
        self.tracker = RunTracker(self.job, context.tracking_uri, run_id=self.run_id, tags=tags,
                                  parent_run_id=fork and fork["run_id"])
        if self.run_id is None:
            self.tracker.log_params(initialised)
        self.run_id = self.tracker.run_id
        existing = self.tracker.current_tags()
        self.ledger = CheckpointLedger(records_from_tags(existing), self.job_folder, self.job.training.keep_checkpoints)
        contribution = {"job": self.job.name, "ray_job_id": context.run_tags.get("ray_job_id"),
                        "ray_submission_id": context.run_tags.get("ray_submission_id"),
                        "cluster": context.run_tags.get("ray_cluster"), "storage": self.job_folder,
                        "from_step": self.step}
        self.tracker.set_tags(job_contribution_tags(existing, contribution))
        self._record_world_size()

    def _record_world_size(self) -> None:
        """The worker count and batch layout from this step on (metrics world_size and global_batch), and a
        resize as a tag resize.step_NNNNNNN; a global batch other than the recipe's is said here too."""
        layout = self.batch_layout
        self.tracker.log_metrics({"world_size": self.world_size, "global_batch": layout.global_batch}, self.step)
        tags = {"batch_layout": layout.describe()}
        if self.resized_from is not None:
            tags[f"resize.step_{self.step:07d}"] = f"{self.resized_from} -> {self.world_size} workers: {layout.describe()}"
            log.info("resized from %d to %d workers at step %d", self.resized_from, self.world_size, self.step)
        if not layout.exact:
            log.warning("the global batch changes: %s", layout.describe())
        self.tracker.set_tags(tags)

    @property
    def job_folder(self) -> str:
        """Where this job's checkpoints and exported models go: <storage_path>/<job name>."""
        return f"{self.job.scaling.storage_path.rstrip('/')}/{self.job.name}"

    @property
    def finished(self) -> bool:
        return self.step >= self.job.training.max_steps

    # ------------------------------------------------------------------------------------------ the step
    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward, loss and backward of one micro-batch; the optimizer steps on accumulation boundaries.
        Returns detached tensors: converting them to numbers is a host sync, left to the logging steps.
        Images stay float32 (0-255): the model normalises them in float32 whatever its weights' precision."""
        device = self.engine.device
        targets = [{key: value.to(device) for key, value in target.items()} for target in batch["targets"]]
        loss, terms = training_loss(self.engine, self.criterion, self.losses, batch["images"].to(device),
                                    batch["tasks"], batch["text_tokens"].to(device), targets)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach(), **self._grouped_terms(terms)}

    @staticmethod
    def _grouped_terms(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The final prediction's terms and the contrastive term, for logging (aux terms are in the total)."""
        return {name: value.detach() for name, value in terms.items() if name.count("_") == 1}

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Train to max_steps; a run that raises is closed as FAILED in MLflow (a restart reopens it)."""
        try:
            self._fit()
        except BaseException:
            if self.tracker is not None:
                self.tracker.finish(status="FAILED")
            raise

    def _fit(self) -> None:
        if self.finished:  # the driver normally says so first (launch.completed_run); the run stays as it is
            log.info("rank %d: the run already reached step %d of %d", self.rank, self.step, self.job.training.max_steps)
            return
        accumulation = self.sized.training.gradient_accumulation_steps
        window = _ThroughputWindow()
        batches = iter(self.loader)
        metrics: dict[str, float] = {}
        while self.step < self.job.training.max_steps:
            step_terms: dict[str, torch.Tensor] = {}
            for micro_step in range(accumulation):
                waited = time.perf_counter()
                batch = next(batches)
                window.data_wait += time.perf_counter() - waited
                if self.sample_ids is not None:
                    self.sample_ids.append({"step": self.step + 1, "micro_step": micro_step,
                                            "image_ids": batch["image_ids"], "epochs": batch["epochs"]})
                self._seed_micro_step(micro_step)
                for name, value in self.train_step(batch).items():
                    step_terms[name] = step_terms[name] + value if name in step_terms else value
                window.images += len(batch["tasks"])
            self.step += 1
            self.images_seen += self.batch_layout.global_batch
            metrics = self._global_batch_means(step_terms, accumulation) if self._is_reporting_step() else {}
            if self.step % self.job.training.log_every == 0 or self.step == 1:
                self._log(metrics, window)
                window = _ThroughputWindow()
            if self.step < self.job.training.max_steps and self._is_validation_step():
                validation = self._validate(final=False)
                if self.tracker is not None:
                    self.tracker.log_metrics(validation, self.step)
                self._checkpoint({"step": self.step, **metrics, **validation})
            elif self.step % self.job.training.checkpoint_every == 0 and self.step < self.job.training.max_steps:
                self._checkpoint({"step": self.step, **metrics})
        validation = self._validate(final=True)
        self._checkpoint({"step": self.step, **metrics, **validation, "mlflow_run_id": self.run_id})
        if self.tracker is not None:
            self.tracker.log_metrics(validation, self.step)
            self.tracker.finish()

    def _global_batch_means(self, step_terms: dict[str, torch.Tensor], accumulation: int) -> dict[str, float]:
        """The step's loss terms averaged over its micro-batches and ranks: the global batch's, whatever the
        number of workers (every rank reports on the same steps, so the reduction is collective)."""
        names = sorted(step_terms)
        values = torch.stack([step_terms[name].float() for name in names]) / accumulation
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        return dict(zip(names, values.tolist(), strict=True))

    def _seed_micro_step(self, micro_step: int) -> None:
        """Seed torch's generators from (seed, rank, step, micro-step): point sampling, dropout and drop-path then
        repeat exactly after a resume, whatever else drew from the global generator before (a data-loader
        iterator takes its base seed from it when it is created)."""
        key = [self.job.training.seed, self.rank, self.step, micro_step]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]))

    def _is_validation_step(self) -> bool:
        return self.job.training.eval_every is not None and self.step % self.job.training.eval_every == 0

    def _is_reporting_step(self) -> bool:
        training = self.job.training
        return (self.step % training.log_every == 0 or self.step == 1 or self.step % training.checkpoint_every == 0
                or self.step == training.max_steps or self._is_validation_step())

    def _log(self, metrics: dict[str, float], window: _ThroughputWindow) -> None:
        elapsed = time.perf_counter() - window.started
        record = {**metrics, "learning_rate": self.scheduler.get_last_lr()[0],
                  "images_per_second": window.images * self.world_size / max(elapsed, 1e-9),
                  "data_wait_share": window.data_wait / max(elapsed, 1e-9),
                  "max_rss_gb": _max_rss_gb(), "data/skipped_samples": self._skipped_over_ranks()}
        if torch.cuda.is_available():
            record["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.rank == 0:
            log.info("step %d/%d %s", self.step, self.job.training.max_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in record.items()))
            self.tracker.log_metrics(record, self.step)

    def _skipped_over_ranks(self) -> float:
        """Training samples every rank's stream left out so far (damaged shards, undecodable samples)."""
        skipped = torch.tensor([float(self.loader.num_skipped)], device=self.engine.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(skipped)
        return skipped.item()

    # ------------------------------------------------------------------------------------------ validation
    def _validate(self, final: bool) -> dict[str, float]:
        """Every rank evaluates its part of the validation shards with the current weights; rank 0 merges,
        logs the metrics and pictures, keeps the best model by PQ, and exports the model when `final`."""
        state = full_state_dict(self.engine)  # collective under ZeRO-3
        results = self._evaluate_part(state)
        if dist.is_initialized() and self.world_size > 1:
            parts = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(results, parts, dst=0)
            if self.rank == 0:
                results = merge_parts(parts)
        summary: dict[str, float] = {}
        if self.rank == 0:
            summary = self._publish_validation(results, state, final)
        if dist.is_initialized():
            dist.barrier()
        return summary

    def _evaluate_part(self, state: dict):
        """This rank's PartialResults, predicted at the test size exactly as `python -m pipeline.evaluate model`
        does (pipeline/evaluation/runner.py); max_images is shared out over the ranks."""
        model = self._refreshed_evaluation_model(state)
        evaluation = self.job.evaluation
        options = EvaluationOptions(
            self.classes, thresholds_from_config(self.model_config), tuple(evaluation.metrics),
            size=resolve_inference_size(self.model_config, evaluation.test_size),
            semantic_multiscale=evaluation.semantic_multiscale, size_divisibility=self.model_config.size_divisibility,
            pictures=self.job.tracking.log_pictures if self.rank == 0 else 0)
        loader = build_eval_loader(self.job.split_shards(self.job.data.val_split), self.inputs, self.rank,
                                   self.world_size)
        return evaluate(model, loader, options, max_images=split_quota(evaluation.max_images, self.rank, self.world_size))

    def _refreshed_evaluation_model(self, state: dict) -> OneFormer:
        """A float32 copy of the model for evaluation, built once (its random init must not shift the training's
        random stream) and given the current weights at each validation."""
        if self.evaluation_model is None:
            with torch.random.fork_rng(devices=[]):
                self.evaluation_model = build_from_config(self.model_config).to(self.engine.device)
        self.evaluation_model.load_state_dict(state)
        return self.evaluation_model.eval()

    def _publish_validation(self, results, state: dict, final: bool) -> dict[str, float]:
        details = results.compute_details()
        summary = {f"val/{key}": value for key, value in results.compute(details).items()}
        summary["val/skipped_samples"] = float(results.num_skipped)
        log.info("validation at step %d: %s", self.step, " ".join(f"{k}={v:.2f}" for k, v in summary.items()))
        pq = summary.get("val/PQ")
        if pq is not None and (self.best is None or pq > self.best["val/PQ"]):
            self.best = {"step": self.step, **summary, "location": f"{self.job_folder}/best"}
            shutil.rmtree(self._write_model_files(state, "best", self.best))
        if self.tracker is not None:
            pictures = Path(tempfile.mkdtemp(prefix="pictures_"))
            for picture in save_pictures(results, pictures, details):
                self.tracker.log_artifact(picture, f"pictures/step_{self.step:07d}")
        if final:
            folder = self._write_model_files(state, "model", summary)
            if self.tracker is not None:
                self._log_exported_models(folder, summary)
        return summary

    def _log_exported_models(self, final_folder: Path, summary: dict[str, float]) -> None:
        """The final model (and the best, when it is another step's) as run artifacts, then registered in the
        MLflow Model Registry (pipeline/registry.py), after the uploads even when the store was away."""
        final = ExportedModel("model", ("final",), self.step, summary)
        exported = [final]
        for file in sorted(final_folder.iterdir()):
            self.tracker.log_artifact(file, "model")
        if self.best is not None:
            self.tracker.log_metrics({"val/best_PQ": self.best["val/PQ"], "val/best_step": self.best["step"]}, self.step)
            if self.best["step"] == self.step:
                final.roles = ("final", "best")
            else:
                exported[:0] = self._log_best_model()
        if self.job.tracking.register_models:
            self.tracker.defer("model registration", lambda: self._register(exported))

    def _log_best_model(self) -> list[ExportedModel]:
        """The best model's files (written by this job or, in a continued run, an earlier one) as run artifacts;
        a folder gone since costs a warning, not the run's end."""
        location = self.best.get("location", f"{self.job_folder}/best")
        try:
            files = _fetched(location)
        except OSError as error:
            log.warning("the best model (step %d) at %s cannot be read (%s): not logged or registered",
                        self.best["step"], location, error)
            return []
        for file in files:
            self.tracker.log_artifact(file, "best")
        best_metrics = {key: value for key, value in self.best.items() if key.startswith("val/")}
        return [ExportedModel("best", ("best",), self.best["step"], best_metrics)]

    def _register(self, exported: list[ExportedModel]) -> None:
        name = self.job.tracking.registered_model or self.tracker.experiment_name
        versions = register_exported_models(self.tracker.client, name, self.run_id, exported,
                                            self.job.model_dump(mode="json"))
        self.tracker.client.set_tag(self.run_id, "registered_models", "; ".join(versions))
        log.info("registered %s", ", ".join(versions))

    def _write_model_files(self, state: dict, name: str, metrics: dict) -> Path:
        """A consolidated fp32 model file that `model.checkpoint.load_model` reads without DeepSpeed, the class
        metadata and the metrics, in `<storage_path>/<job name>/<name>/`. Returns a local copy."""
        folder = Path(tempfile.mkdtemp(prefix=f"{name}_"))
        self._refreshed_evaluation_model(state)
        # The classes go inside model.pt (what predict, export and evaluate read first) and, for older readers,
        # beside it as classes.json.
        save_model(self.evaluation_model, self.model_config, folder / "model.pt", classes=self.classes.to_json())
        (folder / "classes.json").write_text(json.dumps(self.classes.to_json(), indent=1))
        (folder / "metrics.json").write_text(json.dumps({"step": self.step, **metrics}, indent=1))
        (folder / "job_config.json").write_text(json.dumps(self.job.model_dump(mode="json"), indent=1))
        fs, destination = fsspec.core.url_to_fs(f"{self.job_folder}/{name}")
        fs.makedirs(destination, exist_ok=True)
        for file in folder.iterdir():  # model.pt last: a reader that sees it sees a complete folder
            if file.name != "model.pt":
                fs.put_file(str(file), f"{destination}/{file.name}")
        fs.put_file(str(folder / "model.pt"), f"{destination}/model.pt.partial")
        fs.mv(f"{destination}/model.pt.partial", f"{destination}/model.pt")
        return folder

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This worker's state beside the DeepSpeed engine's: step, stream position, RNG states, run, best."""
        return {"step": self.step, "images_seen": self.images_seen, "loader": self.loader.state_dict(),
                "rng": _rng_state(), "run_id": self.run_id, "best": self.best}

    def load_state_dicts(self, states: list[dict]) -> None:
        """The states of every rank of a checkpoint (rank order), written on this world size or another: the
        stream resumes by global sample position (ResumableLoader.resume); step, run and best are rank 0's."""
        first, own = states[0], states[self.rank] if self.rank < len(states) else states[0]
        self.step, self.best, self.run_id = first["step"], first["best"], first["run_id"]
        self.images_seen = first.get("images_seen", self.step * self.job.training.global_batch_size)
        self.loader.resume([state["loader"] for state in states])
        _set_rng_state(own["rng"])

    def save_checkpoint(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state=checkpoint_client_state())
        torch.save(self.state_dict(), Path(folder) / TRAINER_STATE_FILE.format(rank=self.rank))
        if self.sample_ids is not None:
            lines = "".join(json.dumps(record) + "\n" for record in self.sample_ids)
            Path(folder, SAMPLE_IDS_FILE.format(rank=self.rank)).write_text(lines)
            self.sample_ids.clear()

    def load_checkpoint(self, folder: str, states: list[dict], universal: bool) -> None:
        """`states`: _trainer_states(folder); `universal`: the optimizer state is partitioned for another world
        size, so it is loaded through DeepSpeed's universal checkpoint (pipeline/distributed.py)."""
        if universal:
            load_resized(self.engine, folder, CHECKPOINT_TAG, f"step_{self.step}_{_content_key(folder)}")
        else:
            self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        self.load_state_dicts(states)
        resized = f" (written by {self.resized_from} workers)" if self.resized_from else ""
        log.info("rank %d resumed at step %d%s", self.rank, self.step, resized)

    def _checkpoint(self, metrics: dict) -> None:
        """Write this rank's part of the checkpoint and hand it to the launcher, which stores it as
        <job folder>/checkpoint_step_NNNNNNN; rank 0 then records it in the MLflow run."""
        name = checkpoint_dir_name(self.step)
        with tempfile.TemporaryDirectory() as folder:
            self.save_checkpoint(folder)
            self.context.report(metrics, folder, name)
        if self.tracker is not None:
            record = CheckpointRecord(
                step=self.step, uri=f"{self.job_folder}/{name}", world_size=self.world_size,
                zero_stage=self.job.deepspeed.zero_stage, job=self.job.name,
                data_position={"images_seen": self.images_seen,
                               "rank0_stream": self.loader.state_dict()["positions"]},
                metrics={key: value for key, value in metrics.items() if isinstance(value, int | float) and key != "step"})
            is_best = self.best is not None and self.best["step"] == self.step
            self.tracker.set_tags(self.ledger.add(record, is_best))


class _ThroughputWindow:
    def __init__(self):
        self.started = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0


def _fetched(location: str) -> list[Path]:
    """The files of an exported model folder (local or remote) as local files."""
    fs, path = fsspec.core.url_to_fs(location)
    folder = Path(tempfile.mkdtemp(prefix="exported_"))
    for remote in fs.ls(path, detail=False):
        fs.get_file(remote, str(folder / Path(remote).name))
    return sorted(folder.iterdir())


def _trainer_states(folder: str) -> list[dict]:
    """Every rank's Trainer.state_dict() in a checkpoint folder, in rank order."""
    files = {int(file.stem.removeprefix("trainer_rank")): file
             for file in Path(folder).glob(TRAINER_STATE_FILE.format(rank="*"))}
    if sorted(files) != list(range(len(files))) or not files:
        raise FileNotFoundError(f"{folder}: the checkpoint lacks ranks' trainer states (found ranks {sorted(files)})")
    return [torch.load(files[rank], weights_only=False) for rank in range(len(files))]


def _content_key(folder: str) -> str:
    """A name for a checkpoint's content, the same on every node (local copies differ in path)."""
    return hashlib.sha256(Path(folder, TRAINER_STATE_FILE.format(rank=0)).read_bytes()).hexdigest()[:16]


def _max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
