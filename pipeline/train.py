"""Training: a Ray Train TorchTrainer whose worker function reads only its config, builds OneFormer, wraps it
with DeepSpeed (pipeline/distributed.py), streams the shards and runs the joint task-conditioned training.

Every checkpoint holds every rank's DeepSpeed state plus each rank's data-stream position and RNG states, so
a restarted worker group (FailureConfig) or a resubmitted job continues from `ray.train.get_checkpoint()`
without repeating or skipping samples. Rank 0 logs to MLflow and evaluates at the end.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import JobConfig
from pipeline.distributed import configure_deepspeed_environment
from pipeline.tracking import create_local_store, resolve_tracking_uri

log = logging.getLogger("pipeline.train")
CHECKPOINT_TAG = "state"


def shard_folder(job: JobConfig, split: str) -> str:
    return f"{(job.stream.shards or job.preprocess.output).rstrip('/')}/{split}"


def read_classes(job: JobConfig):
    import fsspec

    from pipeline.data.shards import manifest_classes, read_manifest

    fs, root = fsspec.core.url_to_fs(shard_folder(job, job.data.train_split))
    return manifest_classes(read_manifest(fs, root))


def training_model_config(job: JobConfig, num_classes: int):
    """The OneFormerConfig of the job's model (with the text mapper, for the contrastive loss)."""
    from model import make_config

    overrides = {"num_classes": num_classes, "training": True}
    if job.model.dataset is not None:
        overrides["dataset"] = job.model.dataset
    if job.model.num_queries is not None:
        overrides["num_queries"] = job.model.num_queries
    if job.model.deform_attn_backend is not None:
        overrides["ms_deform_attn_backend"] = job.model.deform_attn_backend
    return make_config(job.model.preset, **overrides)


def build_training_model(job: JobConfig, num_classes: int):
    from model.convert import build_from_config

    model = build_from_config(training_model_config(job, num_classes))
    if job.model.weights is not None:
        state = torch.load(job.model.weights, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state.get("model", state), strict=False)
        log.info("initialised from %s (missing %d, unexpected %d keys)", job.model.weights, len(missing), len(unexpected))
    return model


class Trainer:
    """One worker's training: `train_step` is the step; `fit` runs steps, logging, checkpoints, validation."""

    def __init__(self, job: JobConfig, tracking_uri: str, run_tags: dict[str, str] | None = None):
        import ray.train

        from model.criterion import LossWeights, OneFormerCriterion
        from model.matcher import HungarianMatcher
        from pipeline.data.stream import build_train_loader
        from pipeline.distributed import wrap_with_deepspeed

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.job = job
        torch.manual_seed(job.training.seed)
        self.classes = read_classes(job)
        model = build_training_model(job, self.classes.num_classes)
        self.criterion = OneFormerCriterion(self.classes.num_classes, HungarianMatcher())
        self.loss_weights = LossWeights()
        self.engine, self.scheduler = wrap_with_deepspeed(model, job)
        self.loader = build_train_loader(job.stream, shard_folder(job, job.data.train_split), self.rank, self.world_size)
        self.dtype = next(self.engine.module.parameters()).dtype
        self.step = 0
        self.best: dict | None = None  # step and validation metrics of the best PQ so far (rank 0)
        self.tracker = None
        resumed_run_id = self._restore(ray.train.get_checkpoint())
        if self.rank == 0:
            from pipeline.tracking import RunTracker

            self.tracker = RunTracker(job, tracking_uri, run_id=resumed_run_id, tags=run_tags)

    # ------------------------------------------------------------------------------------------ the step
    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward, loss and backward of one micro-batch; the optimizer steps on accumulation boundaries.
        Returns detached tensors: converting them to numbers is a host sync, left to the logging steps."""
        device = self.engine.device
        images = batch["images"].to(device=device, dtype=self.dtype)
        outputs = self.engine(images, batch["tasks"], batch["text_tokens"].to(device))
        targets = [{key: value.to(device) for key, value in target.items()} for target in batch["targets"]]
        terms = self.criterion(outputs, targets)
        loss = self._weighted(terms)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach(), **self._grouped_terms(terms)}

    def _weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        from model.criterion import weighted_total

        return weighted_total(terms, self.loss_weights)

    @staticmethod
    def _grouped_terms(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The final prediction's terms and the contrastive term, for logging (aux terms are in the total)."""
        return {name: value.detach() for name, value in terms.items() if name.count("_") == 1}

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> None:
        accumulation = self.job.training.gradient_accumulation_steps
        window = _ThroughputWindow()
        batches = iter(self.loader)
        while self.step < self.job.training.max_steps:
            for micro_step in range(accumulation):
                waited = time.perf_counter()
                batch = next(batches)
                window.data_wait += time.perf_counter() - waited
                self._seed_micro_step(micro_step)
                step_terms = self.train_step(batch)
                window.images += len(batch["tasks"])
            self.step += 1
            metrics = {name: value.item() for name, value in step_terms.items()} if self._is_reporting_step() else {}
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
        run_id = {"mlflow_run_id": self.tracker.run_id} if self.tracker is not None else {}
        self._checkpoint({"step": self.step, **metrics, **validation, **run_id})
        if self.tracker is not None:
            self.tracker.log_metrics(validation, self.step)
            self.tracker.finish()

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
                  "max_rss_gb": _max_rss_gb()}
        if torch.cuda.is_available():
            record["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.rank == 0:
            log.info("step %d/%d %s", self.step, self.job.training.max_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in record.items()))
            self.tracker.log_metrics(record, self.step)

    # ------------------------------------------------------------------------------------------ validation
    def _validate(self, final: bool) -> dict[str, float]:
        """Every rank evaluates its part of the validation shards with the current weights; rank 0 merges,
        logs the metrics and pictures, keeps the best model by PQ, and exports the model when `final`."""
        import torch.distributed as dist

        from pipeline.distributed import full_state_dict

        state = full_state_dict(self.engine)  # collective under ZeRO-3
        validator = self._evaluate_part(state)
        if dist.is_initialized() and self.world_size > 1:
            parts = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(validator, parts, dst=0)
            if self.rank == 0:
                validator = parts[0]
                for part in parts[1:]:
                    validator.merge(part)
        summary: dict[str, float] = {}
        if self.rank == 0:
            summary = self._publish_validation(validator, state, final)
        if dist.is_initialized():
            dist.barrier()
        return summary

    def _evaluate_part(self, state: dict):
        from model.inference import thresholds_for
        from pipeline.data.stream import build_eval_loader
        from pipeline.validate import Validator

        with torch.random.fork_rng(devices=[]):  # the training's random stream must not depend on validations
            model = build_training_model(self.job, self.classes.num_classes)
        model.load_state_dict(state)
        model.to(self.engine.device).eval()
        evaluation = self.job.evaluation
        validator = Validator(self.classes, thresholds_for(self.job.model.dataset or "ade20k"), evaluation.metrics,
                              pictures=self.job.tracking.log_pictures if self.rank == 0 else 0,
                              semantic_multiscale=evaluation.semantic_multiscale,
                              size_divisibility=self.job.stream.size_divisibility)
        loader = build_eval_loader(self.job.stream, shard_folder(self.job, self.job.data.val_split),
                                   rank=self.rank, world_size=self.world_size)
        limit = None if evaluation.max_images is None else -(-evaluation.max_images // self.world_size)
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                break
            validator.add_batch(model, batch, self.engine.device, torch.float32)
        return validator

    def _publish_validation(self, validator, state: dict, final: bool) -> dict[str, float]:
        details = validator.compute_details()
        summary = {f"val/{key}": value for key, value in validator.compute(details).items()}
        log.info("validation at step %d: %s", self.step, " ".join(f"{k}={v:.2f}" for k, v in summary.items()))
        pq = summary.get("val/PQ")
        if pq is not None and (self.best is None or pq > self.best["val/PQ"]):
            self.best = {"step": self.step, **summary}
            shutil.rmtree(self._write_model_files(state, "best", self.best))
        if self.tracker is not None:
            pictures = Path(tempfile.mkdtemp(prefix="pictures_"))
            for picture in validator.save_pictures(pictures, details):
                self.tracker.log_artifact(picture, f"pictures/step_{self.step:07d}")
        if final:
            folder = self._write_model_files(state, "model", summary)
            if self.tracker is not None:
                for name in ("model.pt", "classes.json"):
                    self.tracker.log_artifact(folder / name, "model")
                if self.best is not None:
                    self.tracker.log_metrics({"val/best_PQ": self.best["val/PQ"], "val/best_step": self.best["step"]}, self.step)
        return summary

    def _write_model_files(self, state: dict, name: str, metrics: dict) -> Path:
        """A consolidated fp32 model file that `model.convert.load_checkpoint` loads without DeepSpeed, the
        class metadata and the metrics, in `<storage_path>/<job name>/<name>/`. Returns a local copy."""
        import dataclasses
        import json

        import fsspec

        folder = Path(tempfile.mkdtemp(prefix=f"{name}_"))
        config = training_model_config(self.job, self.classes.num_classes)
        torch.save({"config": dataclasses.asdict(config), "model": state}, folder / "model.pt")
        (folder / "classes.json").write_text(json.dumps(self.classes.to_json(), indent=1))
        (folder / "metrics.json").write_text(json.dumps({"step": self.step, **metrics}, indent=1))
        fs, destination = fsspec.core.url_to_fs(f"{self.job.scaling.storage_path.rstrip('/')}/{self.job.name}/{name}")
        fs.makedirs(destination, exist_ok=True)
        for file in folder.iterdir():  # model.pt last: a reader that sees it sees a complete folder
            if file.name != "model.pt":
                fs.put_file(str(file), f"{destination}/{file.name}")
        fs.put_file(str(folder / "model.pt"), f"{destination}/model.pt.partial")
        fs.mv(f"{destination}/model.pt.partial", f"{destination}/model.pt")
        return folder

    # ------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG)
            torch.save({"step": self.step, "loader": self.loader.state_dict(), "rng": _rng_state(),
                        "run_id": self.tracker.run_id if self.tracker else None, "best": self.best},
                       Path(folder) / f"trainer_rank{self.rank}.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def _restore(self, checkpoint) -> str | None:
        """Continue from `checkpoint` if there is one; returns the MLflow run id that rank 0 was logging to."""
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            self.engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
            state = torch.load(Path(folder) / f"trainer_rank{self.rank}.pt", weights_only=False)
        self.step, self.best = state["step"], state["best"]
        self.loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        log.info("rank %d resumed at step %d", self.rank, self.step)
        return state["run_id"]


class _ThroughputWindow:
    def __init__(self):
        self.started = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0


def _max_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------------------------------- entry points
def train_worker(config: dict) -> None:
    """The Ray Train worker function: reads only its config."""
    job = JobConfig.model_validate(config["job"])
    configure_deepspeed_environment(job.scaling.use_gpu)
    torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    Trainer(job, config["tracking_uri"], config.get("run_tags")).fit()


def ray_job_tags() -> dict[str, str]:
    """The Ray job id and, for a `ray job submit`, the submission id that `ray job logs/status` take."""
    import json
    import os

    import ray

    tags = {"ray_job_id": ray.get_runtime_context().get_job_id()}
    injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))  # set for submitted jobs' drivers
    submission_id = injected.get("metadata", {}).get("job_submission_id")
    if submission_id:
        tags["ray_submission_id"] = submission_id
    return tags


def run_training(job: JobConfig):
    """Driver side: start (or join) Ray and run the TorchTrainer; prints the final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    configure_deepspeed_environment(job.scaling.use_gpu)
    create_local_store(resolve_tracking_uri(job))
    if not ray.is_initialized():
        ray.init(address=job.scaling.ray_address)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "tracking_uri": resolve_tracking_uri(job),
                           "run_tags": ray_job_tags()},
        scaling_config=ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker={"CPU": job.scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=job.name, storage_path=job.scaling.storage_path,
            failure_config=FailureConfig(max_failures=job.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.training.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    _print_results(job, result)
    return result


def _print_results(job: JobConfig, result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{job.name}: final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    metrics = result.metrics or {}
    for key, value in sorted(metrics.items()):
        if isinstance(value, int | float):
            table.add_row(key, f"{value:.4g}")
    Console().print(table)
    exported = f"{job.scaling.storage_path.rstrip('/')}/{job.name}"
    print(f"checkpoints: {result.path}")
    best = f" (best by val PQ: {exported}/best/model.pt)" if "val/PQ" in metrics else ""
    print(f"model: {exported}/model/model.pt{best}")
    print(f"MLflow: {resolve_tracking_uri(job)} (experiment {job.tracking.experiment})")
    run_id = metrics.get("mlflow_run_id")
    if run_id:
        print(f"pictures: {_artifact_uri(job, run_id)}/pictures/ (run {run_id})")


def _artifact_uri(job: JobConfig, run_id: str) -> str:
    import mlflow

    try:
        return mlflow.MlflowClient(resolve_tracking_uri(job)).get_run(run_id).info.artifact_uri
    except Exception as error:  # noqa: BLE001 - the run is done; a tracking server gone by now costs only this line
        return f"<MLflow unreachable: {error}>"
