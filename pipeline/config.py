"""The job file: one YAML is the whole configuration of a run, validated into typed objects before any work.

Sections: `data`, `preprocess`, `stream` (pipeline/data/settings.py), `model`, `training`, `deepspeed`,
`tracking`, `scaling`, `evaluation` (here). Every model forbids unknown keys; `load_job` turns any problem
(unknown or mistyped key, wrong type, contradiction, missing input file) into one `JobConfigError` naming the
file and the dotted key, before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.backbones.weights_source import parse_reference, resolve_weights
from model.block_execution import BLOCK_KINDS
from model.checkpoint import weights_config
from model.presets import DATASET_SETTINGS, DATASETS, OneFormerConfig, make_config
from pipeline.data.settings import DatasetSettings, PreprocessSettings, StreamSettings
from pipeline.data.shards import MANIFEST_NAME

JobKind = Literal["train", "preprocess", "evaluate"]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Where relative paths of a job file point. A submitted Ray job runs in a temporary copy of the working
# directory, so a cluster job sets this (or uses absolute/URL paths) to keep outputs out of that copy.
WORKDIR_ENV = "ONEFORMER_WORKDIR"


class JobConfigError(ValueError):
    """A job file that cannot run: the message names the file and the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSettings(_Section):
    """The model's own config: a preset of model.presets (or, without one, the architecture saved with
    `weights`) plus any `OneFormerConfig` field as an override (`dataset`, `num_queries`, `num_classes`,
    `ms_deform_attn_backend`, ...), validated by the same code as `build_model` when the job loads, plus what
    to initialise the model from. Everything the stream needs from the model (text slots, size divisibility,
    pixel mean) is derived from this config."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    preset: Literal["swin_l", "convnext_l", "convnext_xl", "dinat_l", "tiny"] | None = Field(
        None, description="Architecture preset of model.build_model; the other keys of the section override "
                          "its fields. Omit it to fine-tune: the architecture is then the one saved with "
                          "model.weights."
    )
    weights: str | None = Field(
        None, description="Weights to initialise the whole model from: our model file (trained, or converted "
                          "from Hugging Face by model.convert) or a Hugging Face save_pretrained directory. Loaded "
                          "strictly, except a missing text mapper and the class head of weights trained for "
                          "another class set (re-initialised; both logged and recorded as MLflow parameters)."
    )
    backbone_weights: str | None = Field(
        None, description="ImageNet backbone weights: a local file (official, timm, Hugging Face or OneFormer layout), "
                          "an https:// or s3:// URL or a timm hub name; loaded strictly, the count logged to MLflow."
    )

    activation_checkpointing: str | list[str] = Field(
        "none", description="Recompute the repeated blocks in the backward pass instead of keeping their "
                            "activations: none, all, or one or a list of backbone, pixel_decoder, "
                            "transformer_decoder, text_mapper. Same losses and gradients, less memory, more time."
    )
    compile: bool = Field(
        False, description="torch.compile each repeated block (backbone blocks, decoder and pixel-decoder layers, "
                           "text blocks); pays on GPUs, not on CPUs (see the README's performance table)."
    )

    @field_validator("backbone_weights")
    @classmethod
    def _valid_reference(cls, value: str | None) -> str | None:
        if value is not None:
            parse_reference(value)
        return value

    @field_validator("activation_checkpointing")
    @classmethod
    def _known_block_kinds(cls, value: str | list[str]) -> str | list[str]:
        named = [value] if isinstance(value, str) else value
        allowed = ("none", "all") if isinstance(value, str) else ()
        unknown = [kind for kind in named if kind not in allowed + BLOCK_KINDS]
        if unknown or not named:
            raise ValueError(f"must be none, all, or one or a list of {', '.join(BLOCK_KINDS)} (got {value!r})")
        return value

    def checkpointed_block_kinds(self) -> tuple[str, ...]:
        """The components whose repeated blocks are recomputed (model.block_execution.BLOCK_KINDS)."""
        value = self.activation_checkpointing
        if value == "none":
            return ()
        if value == "all":
            return BLOCK_KINDS
        return (value,) if isinstance(value, str) else tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _valid_model_config(self) -> ModelSettings:
        self.oneformer_config()
        return self

    def overrides(self) -> dict[str, Any]:
        """The OneFormerConfig fields this section sets."""
        return dict(self.model_extra or {})

    def oneformer_config(self, num_classes: int | None = None) -> OneFormerConfig:
        """The training model's config (with the text mapper); `num_classes` is the data's class count, which
        a `num_classes` key of the section must equal."""
        overrides = self.overrides()
        _check_override_names(overrides)
        if num_classes is not None:
            if overrides.get("num_classes", num_classes) != num_classes:
                raise ValueError(f"num_classes: {overrides['num_classes']} but the data has {num_classes} classes")
            overrides["num_classes"] = num_classes
        typed = {name: tuple(value) if name in _TUPLE_FIELDS and isinstance(value, list) else value
                 for name, value in overrides.items()}
        if self.preset is None:
            return self._weights_architecture(typed)
        try:
            return make_config(self.preset, training=True, **typed)
        except (TypeError, ValueError) as error:
            raise ValueError(_name_the_field(str(error))) from None

    def _weights_architecture(self, typed: dict[str, Any]) -> OneFormerConfig:
        """The config saved with `weights`, with the section's overrides; `dataset` brings that dataset's
        inference settings but keeps the weights' architecture (their query count)."""
        if self.weights is None:
            raise ValueError("preset: required unless model.weights names the weights whose architecture to "
                             "use")
        path = local_weights(self.weights)
        if not os.path.exists(path):
            raise ValueError(f"weights: file not found: {path}")
        dataset = typed.pop("dataset", None)
        try:
            base = weights_config(path, dataset=dataset)
        except (ValueError, OSError) as error:  # ModelFileError, UnsupportedConfigError, no config.json, ...
            if "guess the dataset" in str(error):
                raise ValueError(f"dataset: required: the class count of {path} is no released dataset's; "
                                 "set model.dataset to the one whose test size and thresholds to use: "
                                 f"{', '.join(DATASETS)}") from None
            message = str(error)
            named = message if message.startswith(path) else f"{path}: {message}"
            raise ValueError(f"weights: {named}") from None
        if dataset is not None:
            inference = {k: v for k, v in DATASET_SETTINGS.get(dataset, {}).items()
                         if k not in ("num_classes", "num_queries")}
            typed = {"dataset": dataset, **inference, **typed}
        try:
            return dataclasses.replace(base, training=True, **typed)
        except (TypeError, ValueError) as error:
            raise ValueError(_name_the_field(str(error))) from None


_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(OneFormerConfig)}
_TUPLE_FIELDS = {name for name, f in _CONFIG_FIELDS.items() if str(f.type).startswith("tuple")}
_SET_BY_THE_JOB = {"training": "training jobs always build the text mapper"}


def _check_override_names(overrides: dict[str, Any]) -> None:
    for name in overrides:
        if name in _SET_BY_THE_JOB:
            raise ValueError(f"{name}: set by the job, not the file ({_SET_BY_THE_JOB[name]})")
        if name not in _CONFIG_FIELDS:
            hint = difflib.get_close_matches(name, list(_CONFIG_FIELDS) + list(ModelSettings.model_fields), n=1)
            raise ValueError(f"{name}: unknown key" + (f" (did you mean 'model.{hint[0]}'?)" if hint else ""))


def _name_the_field(message: str) -> str:
    """make_config's messages start with the field's name; put it first as 'field: message'."""
    first = message.split(" ", 1)[0]
    return f"{first}: {message}" if first in _CONFIG_FIELDS else message


class TrainingSettings(_Section):
    """Optimisation: AdamW with the backbone multiplier, poly or step schedule, full-model clipping."""

    max_steps: int = Field(ge=1, description="Optimizer steps (the paper's 'iterations').")
    global_batch_size: int = Field(16, ge=1, description="Images per optimizer step over all workers.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step per worker.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW base learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay; none on norm layers, nn.Embedding, "
                                "relative_position_bias_table and absolute_pos_embed (the official rule).")
    backbone_lr_multiplier: float = Field(0.1, gt=0, description="Backbone learning rate = base x this.")
    schedule: Literal["poly", "step"] = Field("poly", description="poly (ADE20K, Cityscapes) or step (COCO).")
    poly_power: float = Field(0.9, gt=0, description="Exponent of the poly schedule.")
    step_milestones: list[int] = Field(default_factory=list, description="Steps where the step schedule multiplies by step_gamma.")
    step_gamma: float = Field(0.1, gt=0, description="Factor of the step schedule at each milestone.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (0 in the paper's configs).")
    gradient_clip_norm: float | None = Field(
        None, gt=0, description="Clip the full model's gradient L2 norm at this value. Default none: the official "
        "configs say 0.01, but in the official train_net.py that clip never runs (its parameter iterator is used up "
        "by the NaN/inf pass first), and that is what produced the paper's numbers. NaN/inf gradients are always "
        "sanitised (NaN -> 0, inf -> +-1e5)."
    )
    seed: int = Field(0, description="Seeds initialisation and every worker's randomness.")
    log_every: int = Field(20, ge=1, description="Steps between metric logs.")
    eval_every: int | None = Field(None, ge=1, description="Steps between validations; default: only at the end.")
    checkpoint_every: int = Field(1000, ge=1, description="Steps between checkpoints.")
    record_sample_ids: bool = Field(
        False, description="Each checkpoint also holds, per rank, the ids and epochs of the images of every step "
                           "since the previous one (samples_rank<r>.jsonl): which images a step trained on, "
                           "across restarts and resizes.")
    keep_checkpoints: int = Field(2, ge=1, description="Latest checkpoints kept in this job's storage (older ones are "
                                  "deleted and marked so in MLflow); the best model by validation PQ is exported to "
                                  "<storage_path>/<name>/best/ whatever this is.")
    resume_from: str | None = Field(
        None, description="Start from a tracked checkpoint: runs:/<run id> (that MLflow run's latest kept checkpoint), "
                          "runs:/<run id>@step=<N>, or a checkpoint folder (path or URL). Ignored once this job has "
                          "checkpoints of its own. Any world size: the checkpoint and the data stream are resharded.")
    resume_mode: Literal["auto", "continue", "fork"] = Field(
        "auto", description="continue: the same MLflow run goes on; fork: a child run of it. auto: continue from the "
                            "run's latest checkpoint with the same recipe, fork otherwise (the log says why).")

    @model_validator(mode="after")
    def _schedule_is_consistent(self) -> TrainingSettings:
        if self.schedule == "step" and not self.step_milestones:
            raise ValueError("schedule 'step' needs step_milestones")
        if self.schedule == "poly" and self.step_milestones:
            raise ValueError("step_milestones are set but schedule is 'poly'")
        if self.step_milestones != sorted(self.step_milestones) or any(m >= self.max_steps for m in self.step_milestones):
            raise ValueError(f"step_milestones must be increasing and below max_steps ({self.max_steps})")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.resume_from is None and self.resume_mode != "auto":
            raise ValueError(f"resume_mode is {self.resume_mode!r} but resume_from is not set")
        if self.resume_from is not None:
            from pipeline.tracked_checkpoints import parse_resume_reference

            parse_resume_reference(self.resume_from)
        return self


class DeepSpeedSettings(_Section):
    """The DeepSpeed engine that wraps the model on every worker."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: optimizer (1), gradients (2), parameters (3) sharded.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Training precision (the official DiNAT configs use fp32).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO stage >= 1).")
    extra_config: dict[str, Any] = Field(
        default_factory=dict, description="Merged last into the generated DeepSpeed config, for knobs not named here."
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSettings:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


class TrackingSettings(_Section):
    """MLflow tracking. MLFLOW_TRACKING_URI in the environment wins over tracking_uri, as MLflow users expect."""

    tracking_uri: str = Field(
        "sqlite:///mlruns/mlflow.db", description="Tracking store; relative sqlite paths are under the work directory."
    )
    experiment: str = Field("oneformer", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; default: the job name and a timestamp.")
    log_pictures: int = Field(4, ge=0, description="Overlay pictures per task logged at each validation.")
    registered_model: str | None = Field(
        None, description="MLflow Model Registry name under which the exported best and final models are registered "
                          "(alias best: the best validation PQ; models:/<name>/latest: the last final model); default: the "
                          "experiment's name.")
    register_models: bool = Field(True, description="Register the exported models in the MLflow Model Registry.")


class ScalingSettings(_Section):
    """Ray Train scaling and storage."""

    num_workers: int | tuple[int, int] = Field(
        1, description="Ray Train workers (one per GPU on a GPU cluster), or [min, max] for elastic training: the "
                       "run starts with what it can get, at least min, and resizes on failures and when nodes come "
                       "back; the global batch is kept (JobConfig.batch_layout) and the checkpoint and the data "
                       "stream resume on any size.")
    resize_check_s: float = Field(
        60.0, gt=0, description="Elastic num_workers: how often a healthy run checks whether more workers can be "
                                "placed (a resize restarts the group from the latest checkpoint).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (data loading runs there too).")
    ray_address: str | None = Field(None, description="None: local Ray or the cluster a submitted job runs in.")
    storage_path: str = Field("runs", description="Checkpoints and results: local path (under the work directory) or URL.")
    max_failures: int = Field(3, ge=-1, description="Automatic restarts from the latest checkpoint (-1: unlimited).")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime environment of the training workers (RunConfig's "
                                          "worker_runtime_env), e.g. {env_vars: {AWS_ENDPOINT_URL: ...}}.")

    @field_validator("num_workers")
    @classmethod
    def _workers_are_positive(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError(f"num_workers must be >= 1 or [min, max] with 1 <= min <= max, got {value}")
        return value

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def is_elastic(self) -> bool:
        return isinstance(self.num_workers, tuple) and self.num_workers[0] != self.num_workers[1]


class EvaluationSettings(_Section):
    """Validation: PQ (panoptic task), AP (instance task), mIoU (semantic task)."""

    metrics: list[Literal["pq", "ap", "miou"]] = Field(["pq", "ap", "miou"], description="Metrics to compute.")
    max_images: int | None = Field(None, ge=1, description="Evaluate on at most this many validation images.")
    semantic_multiscale: bool = Field(False, description="Multi-scale + flip test for semantic segmentation.")
    checkpoint: str | None = Field(
        None, description="kind evaluate: the model file to score (training exports <storage_path>/<name>/model/model.pt)."
    )
    shards: str | None = Field(
        None, description="kind evaluate: folder (or URL) of the shards; default: stream.shards, else preprocess.output."
    )
    num_workers: int = Field(1, ge=1, description="kind evaluate: Ray workers, each scoring its part of the shards.")
    output: str | None = Field(
        None, description="kind evaluate: folder for predictions in the standard formats, pictures and metrics.json."
    )
    test_size: tuple[int, int] | Literal["none"] | None = Field(
        None, description="[short side, max size] of the ResizeShortestEdge before the model (scores stay at the "
                          "original size); default: the official test size of the model's dataset (ADE20K 640/2560, "
                          "ADE20K-1280 1280/5120, COCO 800/1333, Cityscapes 1024/2048); none: each image as it is."
    )

    @model_validator(mode="after")
    def _test_size_is_ordered(self) -> EvaluationSettings:
        if isinstance(self.test_size, tuple) and not 0 < self.test_size[0] <= self.test_size[1]:
            raise ValueError(f"test_size must be [short side, max size] with 0 < short <= max, got {list(self.test_size)}")
        return self


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How a step's global batch is made on a number of workers (JobConfig.batch_layout)."""

    world_size: int
    micro_batch: int
    accumulation: int
    global_batch: int
    recipe_global_batch: int

    @property
    def exact(self) -> bool:
        return self.global_batch == self.recipe_global_batch

    def describe(self) -> str:
        made = (f"{self.world_size} worker(s) x {self.micro_batch} image(s) x {self.accumulation} accumulation "
                f"step(s) = {self.global_batch} images per step")
        if self.exact:
            return made
        return (f"{made}, not the recipe's {self.recipe_global_batch} (training.global_batch_size does not divide "
                f"over {self.world_size} workers)")


class JobConfig(_Section):
    """A whole run. Which sections are needed depends on `kind`."""

    kind: JobKind = Field(description="train (preprocesses first when the job has a preprocess section), preprocess, "
                                      "or evaluate (scores evaluation.checkpoint on the validation shards).")
    name: str = Field(min_length=1, description="Job name, used for runs and output folders.")
    synthetic_dataset: SyntheticSettings | None = Field(
        None, description="Generate the embedded synthetic dataset at data.root first (skipped when present)."
    )
    data: DatasetSettings | None = None
    preprocess: PreprocessSettings | None = None
    stream: StreamSettings | None = None
    model: ModelSettings | None = None
    training: TrainingSettings | None = None
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)

    @model_validator(mode="after")
    def _sections_fit_the_kind(self) -> JobConfig:
        required = {"preprocess": ("data", "preprocess"), "train": ("data", "stream", "model", "training"),
                    "evaluate": ("data",)}[self.kind]
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} job needs the section(s) {', '.join(missing)}")
        if self.synthetic_dataset is not None and self.data is None:
            raise ValueError("synthetic_dataset needs a data section whose root receives the dataset")
        if self.synthetic_dataset is not None and "://" in self.data.root:
            raise ValueError(f"synthetic_dataset writes local files but data.root is {self.data.root}: generate it "
                             "in a folder (python -m pipeline.synthetic) and upload it, or drop synthetic_dataset")
        if self.kind == "train":
            self._check_training_layout()
        if self.kind == "evaluate" and self.evaluation.checkpoint is None:
            raise ValueError("an evaluate job needs evaluation.checkpoint, the model file to score")
        if self.kind == "evaluate" and self.evaluation_shards() is None:
            raise ValueError("an evaluate job needs evaluation.shards (or stream.shards, or a preprocess section)")
        return self

    def shards_root(self) -> str | None:
        """The shard folder of the job (split folders inside): stream.shards, else the preprocess output."""
        stream_shards = self.stream.shards if self.stream is not None else None
        return stream_shards or (self.preprocess.output if self.preprocess is not None else None)

    def split_shards(self, split: str) -> str:
        """The one place a split's shard folder is named."""
        return f"{self.shards_root().rstrip('/')}/{split}"

    def evaluation_shards(self) -> str | None:
        """The shard folder an evaluate job reads (split folders inside)."""
        return self.evaluation.shards or self.shards_root()

    def batch_layout(self, world_size: int) -> BatchLayout:
        """Per-worker micro-batch and accumulation that keep training.global_batch_size on `world_size` workers,
        with micro-batches of at most stream.batch_size (what a worker's memory was sized for); where the global
        batch does not divide over the workers, each takes the nearest whole number of images (`exact` False)."""
        per_worker = max(1, round(self.training.global_batch_size / world_size))
        accumulation = -(-per_worker // self.stream.batch_size)
        while per_worker % accumulation:
            accumulation += 1
        return BatchLayout(world_size, per_worker // accumulation, accumulation, per_worker * world_size,
                           self.training.global_batch_size)

    def at_world_size(self, world_size: int) -> JobConfig:
        """This job as it runs on `world_size` workers: batch_layout's micro-batch and accumulation."""
        layout = self.batch_layout(world_size)
        job = self.model_copy(deep=True)
        job.scaling.num_workers = world_size
        job.stream.batch_size, job.training.gradient_accumulation_steps = layout.micro_batch, layout.accumulation
        job.training.global_batch_size = layout.global_batch
        return job

    def _check_training_layout(self) -> None:
        workers = self.scaling.max_workers
        per_step = workers * self.stream.batch_size * self.training.gradient_accumulation_steps
        if self.training.global_batch_size != per_step:
            raise ValueError(
                f"training.global_batch_size ({self.training.global_batch_size}) must equal scaling.num_workers "
                f"({workers}{' at most' if self.scaling.is_elastic else ''}) x stream.batch_size "
                f"({self.stream.batch_size}) x training.gradient_accumulation_steps "
                f"({self.training.gradient_accumulation_steps}) = {per_step}"
            )
        config = self.model.oneformer_config()
        expected_classes = self.data.expected_num_classes
        if expected_classes is not None and config.num_classes != expected_classes and "num_classes" in self.model.overrides():
            raise ValueError(f"model.num_classes ({config.num_classes}) and data.expected_num_classes "
                             f"({expected_classes}) differ")
        if self.stream.pads_to_crop and any(side % config.size_divisibility for side in self.stream.crop_size):
            raise ValueError(f"stream.crop_size {self.stream.crop_size} is not a multiple of model.size_divisibility "
                             f"({config.size_divisibility}): the crop canvas is the model's input")
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision fp16 needs scaling.use_gpu: the CPU accelerator has no fp16 training")


class SyntheticSettings(_Section):
    """The embedded default dataset (pipeline/synthetic.py)."""

    num_images: int = Field(ge=2, description="Images over both splits.")
    seed: int = Field(0, description="Generator seed: the same seed gives byte-identical files.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of images in the val split.")
    min_size: int = Field(160, ge=16, description="Smallest image side.")
    max_size: int = Field(320, ge=16, description="Largest image side.")

    @model_validator(mode="after")
    def _sizes_ordered(self) -> SyntheticSettings:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) exceeds max_size ({self.max_size})")
        return self


JobConfig.model_rebuild()


# ------------------------------------------------------------------------------------------------ loading
def work_directory() -> Path:
    """Where relative paths of job files resolve: $ONEFORMER_WORKDIR, else the current directory."""
    return Path(os.environ.get(WORKDIR_ENV) or os.getcwd()).resolve()


MLFLOW_URI_SCHEMES = ("runs:/", "models:/")


def is_uri(value: str) -> bool:
    """A URL or an MLflow URI rather than a local path."""
    return "://" in value or value.startswith(MLFLOW_URI_SCHEMES)


def resolve_path(value: str, base: Path | None = None) -> str:
    """Absolute local path for a relative one; URLs (s3://, gs://, file://, ...), MLflow URIs (runs:/, models:/)
    and absolute paths unchanged."""
    if is_uri(value) or os.path.isabs(value):
        return value
    return str(((base or work_directory()) / os.path.expanduser(value)).resolve())


def _format_location(location: tuple) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def _known_keys(model: type[BaseModel], location: tuple) -> list[str]:
    """Field names of the section at `location` (for 'did you mean' hints)."""
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _describe(error: dict) -> str:
    location = tuple(part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    key = _format_location(location)
    if error["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(location[-1]), _known_keys(JobConfig, location), n=1)
        return f"{key}: unknown key" + (f" (did you mean '{'.'.join(map(str, location[:-1] + (hint[0],)))}'?)" if hint else "")
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    named = re.match(r"^([A-Za-z_]\w*): (.*)$", message, flags=re.S)
    if location and named:  # a section validator naming one of its keys
        return f"{key}.{named.group(1)}: {named.group(2)}"
    if not location:
        return f"contradiction: {message}"
    if error["type"].endswith("_type") or error["type"].endswith("_parsing") or error["type"] == "literal_error":
        return f"{key}: {message} (got {error.get('input')!r})"
    return f"{key}: {message}"


def parse_job(document: Any, source: str) -> JobConfig:
    """Validate an already-parsed YAML document; errors name `source` and every bad key."""
    if not isinstance(document, dict):
        raise JobConfigError(f"{source}: a job file must be a YAML mapping of sections, got {type(document).__name__}")
    try:
        return JobConfig.model_validate(document)
    except ValidationError as err:
        problems = "\n".join(f"  - {_describe(e)}" for e in err.errors())
        raise JobConfigError(f"{source}: invalid job file\n{problems}") from None


def _resolve_paths(job: JobConfig) -> None:
    """Make every local path absolute against the work directory, so Ray workers (which run in temporary
    directories) see the same files."""
    if job.data is not None:
        job.data.root = resolve_path(job.data.root)
    if job.preprocess is not None:
        job.preprocess.output = resolve_path(job.preprocess.output)
    if job.stream is not None and job.stream.shards is not None:
        job.stream.shards = resolve_path(job.stream.shards)
    if job.model is not None:
        if job.model.weights is not None:
            job.model.weights = resolve_path(job.model.weights)
        if job.model.backbone_weights is not None:
            job.model.backbone_weights = _resolved_weights_reference(job.model.backbone_weights)
    if job.tracking.tracking_uri.startswith("sqlite:///") and not job.tracking.tracking_uri.startswith("sqlite:////"):
        job.tracking.tracking_uri = "sqlite:///" + resolve_path(job.tracking.tracking_uri.removeprefix("sqlite:///"))
    job.scaling.storage_path = resolve_path(job.scaling.storage_path)
    if job.training is not None and job.training.resume_from is not None:
        job.training.resume_from = resolve_path(job.training.resume_from)
    for name in ("checkpoint", "output", "shards"):
        if getattr(job.evaluation, name) is not None:
            setattr(job.evaluation, name, resolve_path(getattr(job.evaluation, name)))


def local_weights(reference: str) -> str:
    """A local path for `model.weights`: an object-store or https URL is fetched into the weights cache once
    (model/backbones/weights_source.py, as backbone weights are); a path is made absolute."""
    if "://" in reference:
        try:
            return str(resolve_weights(reference))
        except (OSError, ValueError) as error:
            raise ValueError(f"weights: {reference}: {error}") from None
    return resolve_path(reference)


def _resolved_weights_reference(reference: str) -> str:
    """A local weights path made absolute (its #sha256= suffix kept); remote references unchanged."""
    parsed = parse_reference(reference)
    if parsed.kind != "local":
        return reference
    return resolve_path(parsed.location) + reference[len(parsed.location):]


def _check_inputs_exist(job: JobConfig, source: str) -> None:
    """Input files named by the job must exist before any work starts (outputs are created later)."""
    backbone_weights = job.model and job.model.backbone_weights and parse_reference(job.model.backbone_weights)
    inputs = {
        "model.weights": job.model and job.model.weights,
        "model.backbone_weights": backbone_weights and backbone_weights.kind == "local" and backbone_weights.location,
        "evaluation.checkpoint": job.kind == "evaluate" and job.evaluation.checkpoint,
    }
    if job.preprocess is not None and job.synthetic_dataset is None:
        inputs["data.root"] = job.data.root
    for key, path in inputs.items():
        if path and not is_uri(path) and not os.path.exists(path):
            raise JobConfigError(f"{source}: {key}: file not found: {path}")
    _check_shards_exist(job, source)


def _check_shards_exist(job: JobConfig, source: str) -> None:
    """Shards a job only reads (no preprocess section makes them) must be there, one manifest per split."""
    if job.preprocess is not None or job.kind == "preprocess":
        return
    root, key = (job.evaluation_shards(), "evaluation.shards") if job.kind == "evaluate" else (job.shards_root(), "stream.shards")
    if root is None or "://" in root:
        return
    splits = [job.data.val_split] if job.kind == "evaluate" else [job.data.train_split, job.data.val_split]
    for split in splits:
        manifest = Path(root) / split / MANIFEST_NAME
        if not manifest.is_file():
            raise JobConfigError(f"{source}: {key}: no shards for split {split!r} ({manifest} not found; "
                                 "run preprocessing first or add a preprocess section)")


def apply_overrides(document: Any, overrides: list[str], source: str) -> Any:
    """`section.key=value` command-line overrides on a parsed job document; each value is read as YAML
    (`2`, `false`, `null`, `[4, 8]`, `{a: 1}`), so it is validated exactly like the same value in the file."""
    if not overrides:
        return document
    document = dict(document) if isinstance(document, dict) else document
    for override in overrides:
        key, separator, text = override.partition("=")
        parts = key.strip().split(".")
        if not separator or not all(parts):
            raise JobConfigError(f"{source}: override {override!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise JobConfigError(f"{source}: override {override!r}: the value is not valid YAML: {err}") from None
        _set_dotted(document, parts, value, source, override)
    return document


def _set_dotted(document: Any, parts: list[str], value: Any, source: str, override: str) -> None:
    node = document
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise JobConfigError(f"{source}: override {override!r}: {'.'.join(parts[:depth])} is not a section")
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else ({} if child is None else child)
        node = node[part]
    if not isinstance(node, dict):
        raise JobConfigError(f"{source}: override {override!r}: {'.'.join(parts[:-1])} is not a section")
    node[parts[-1]] = value


def load_job(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job file, apply `section.key=value` overrides, validate and resolve. Raises JobConfigError naming
    the file (and the overrides) and the key."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise JobConfigError(f"{source}: job file not found") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise JobConfigError(f"{source}: not valid YAML: {err}") from None
    if overrides:
        source = f"{source} with overrides {' '.join(overrides)}"
    job = parse_job(apply_overrides(document, list(overrides), source), source)
    _resolve_paths(job)
    _check_inputs_exist(job, source)
    return job
