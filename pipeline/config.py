"""The one typed config tree for prepare_data, pretrain, tune_mixing and the KubeRay entrypoints.

A run is described by a YAML file (presets live in ``jobs/configs/``) plus dotted ``key=value``
overrides from the command line. Unknown keys and values of the wrong type are errors that name the
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.config import LOSS_NAMES, PHASE_KINDS

KINDS = ("image_text", "image", "text")
Kind = Literal["image_text", "image", "text"]
PRESET_NAMES = ("tiny", "small", "base", "large")  # model.presets.PRESETS (a test keeps them equal)
# keys that were renamed: naming the new key beats "unknown key"
RENAMED = {
    "train.bf16": "train.precision (fp32 | bf16)",
    "data.shuffle_buffer": "data.shuffle_window (rows of a data partition shuffled together)",
    "tune.kinds": "tune.sources (names of data sources; with data.train by kind, the kinds)",
}


class ConfigError(ValueError):
    """A config file or override that does not fit the tree."""


class _Checks:
    """Collects ``section.field: problem`` lines; a section's ``check`` fills one."""

    def __init__(self, section: str, values: Any):
        self.section, self.values, self.problems = section, values, []

    def fail(self, name: str, problem: str) -> None:
        self.problems.append(f"{self.section}.{name} = {getattr(self.values, name)!r}: {problem}")

    def at_least(self, minimum: float, *names: str) -> None:
        for name in names:
            if getattr(self.values, name) < minimum:
                self.fail(name, f"must be >= {minimum:g}")

    def positive(self, *names: str) -> None:
        for name in names:
            if not getattr(self.values, name) > 0:
                self.fail(name, "must be > 0")

    def fraction(self, *names: str, closed: bool = False) -> None:
        for name in names:
            value = getattr(self.values, name)
            if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
                self.fail(name, f"must be in [0, 1{']' if closed else ')'}")


@dataclass
class StorageConfig:
    """Where s3:// URIs and relative paths resolve. Credentials come only from the environment (AWS_*)."""

    # relative local paths resolve against this directory (empty: the working directory). Under
    # ``ray job submit`` the working directory is Ray's temporary package dir: set it (storage.base_dir=$PWD)
    # or use absolute paths (pipeline/paths.py)
    base_dir: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    # attempts per S3 call, with exponential backoff: 8 ride out about 40 s of an unreachable endpoint
    # (measured: 3 -> 2.4 s, 8 -> 40 s, 12 -> 2 min), after which the call fails and the run with it
    s3_max_attempts: int = 8
    s3_request_timeout_s: float = 30.0
    # local paths are on a filesystem every node mounts at the same place (NFS, a shared PVC): without it,
    # a cluster whose nodes are on several hosts refuses local storage and data paths (pipeline/paths.py)
    shared_filesystem: bool = False

    def check(self, c: _Checks) -> None:
        c.at_least(1, "s3_max_attempts")
        c.positive("s3_request_timeout_s")


@dataclass
class PrepareConfig:
    """Converts one raw source into a dataset of shards (one kind per dataset)."""

    source: Literal["", "captioned_folder", "webdataset", "image_folder", "text"] = ""  # "": not set
    inputs: list[str] = field(default_factory=list)  # folders, .tar files, text/jsonl files
    captions: str = ""  # captions .jsonl/.csv for captioned_folder (default: <folder>/captions.jsonl)
    output: str = ""  # local dir or s3:// URI of the dataset
    shard_prefix: str = "shard"
    image_size: int = 224
    patch_size: int = 16
    min_image_size: int = 32
    shard_rows: int = 2048
    shard_bytes: int = 256 * 1024 * 1024
    row_group_rows: int = 256
    codebook: str = ""  # FlavaImageCodebook dir (local or s3://); empty = random init, recorded as such
    codebook_seed: int = 0
    codebook_hidden_size: int = 256  # random-init codebook only (FLAVA's is 256; smaller is faster)
    codebook_batch_size: int = 64
    codebook_actors: int = 1  # concurrency of the codebook actor pool (one GPU each when present)
    image_format: Literal["png", "jpeg"] = "png"  # png: lossless, codes match any decoder; jpeg: smaller
    jpeg_quality: int = 95
    val_fraction: float = 0.0  # > 0: hold out keys by hash into <output>/val, the rest into <output>/train
    strict: bool = False

    def check(self, c: _Checks) -> None:
        c.at_least(1, "min_image_size", "shard_rows", "shard_bytes", "row_group_rows")
        c.at_least(1, "codebook_hidden_size", "codebook_batch_size", "codebook_actors")
        c.at_least(16, "image_size")
        if self.image_size % self.patch_size:
            c.fail("image_size", f"must be a multiple of prepare.patch_size={self.patch_size}")
        if not 1 <= self.jpeg_quality <= 100:
            c.fail("jpeg_quality", "must be in [1, 100]")
        c.fraction("val_fraction")


@dataclass
class DemoConfig:
    """The generated demo corpus that the embedded default trains on (no download)."""

    root: str = "demo_data"
    pairs: int = 1536
    images: int = 768
    texts: int = 3072
    val_fraction: float = 0.125
    seed: int = 0

    def check(self, c: _Checks) -> None:
        c.at_least(0, "pairs", "images", "texts")
        c.fraction("val_fraction")


@dataclass
class SourceConfig:
    """A named data source: one kind of data, its train dataset and (optionally) its held-out split."""

    kind: Kind = "image_text"
    train: str = ""  # dataset dir or s3:// URI
    val: str = ""  # its held-out split: pooled with the same kind's other sources for validation


SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # source names go into metric names and dotted overrides


@dataclass
class DataConfig:
    """Datasets and how batches are made from them.

    Datasets come as named sources (``sources``: name -> kind, train, val), or, for one dataset per kind,
    as ``train``/``val`` maps by kind (each kind then is a source named after it). ``ratios`` weigh the
    sources: at every step all ranks draw one source, and the batch is of that source's kind."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    train: dict[str, str] = field(default_factory=dict)  # kind -> dataset dir or s3:// URI
    val: dict[str, str] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=lambda: {"image_text": 0.5, "image": 0.25, "text": 0.25})
    batch_size: int = 16  # per worker
    tokenizer: str = ""  # WordPiece dir (local or s3://); empty = train one on the text shards
    vocab_size: int = 8192  # only for a tokenizer trained here
    max_text_length: int = 32
    mlm_probability: float = 0.15
    mim_mask_ratio: float = 0.4
    itm_negative_fraction: float = 0.25
    flip_probability: float = 0.5
    # rows of each partition of an epoch that are shuffled together (pipeline/data/order.py): windows
    # hold whole batches, and a worker keeps one window of each of its partitions in memory
    shuffle_window: int = 256
    read_ahead: int = 4  # batches per source a worker thread reads ahead, across epoch restarts (0: none)
    stall_timeout_s: float = 600  # a worker waiting longer for a batch fails (storage gone); 0: no limit
    on_corrupt_shard: Literal["error", "skip"] = "error"
    # a resume whose datasets changed since the checkpoint (shards or checksums differ): error, or start
    # that source's epoch afresh over the new data (logged, and recorded in MLflow as a data.restart tag)
    on_changed_data: Literal["error", "restart_epoch"] = "error"
    verify_checksums: bool = True  # sha256 of every shard before reading (sizes are always checked)
    seed: int = 0
    # online mixing (README "Online mixing"): static = data.ratios throughout; doremi = exponentiated
    # gradient on each source's excess loss over a reference run's; bandit = EXP3 rewarded by the loss.
    # data.ratios are the starting weights; the weights move every mixing_every steps.
    mixing: Literal["static", "doremi", "bandit"] = "static"
    mixing_every: int = 10
    mixing_step_size: float = 1.0  # doremi: eta of the exponentiated gradient (DoReMi's 1.0)
    mixing_smoothing: float = 1e-3  # doremi: weight of the uniform mixture mixed in (DoReMi's 1e-3)
    mixing_decay: float = 0.9  # bandit: smoothing of each source's loss estimate
    mixing_reference: str = ""  # doremi: a finished run's dir (local or s3://) with its source_losses.json

    def named_sources(self) -> dict[str, SourceConfig]:
        """Every source by name: ``sources`` as given, or one per kind of ``train``/``val`` (KINDS order)."""
        if self.sources:
            return dict(self.sources)
        return {
            kind: SourceConfig(kind, self.train.get(kind, ""), self.val.get(kind, ""))
            for kind in KINDS
            if self.train.get(kind) or self.val.get(kind)
        }

    @property
    def named(self) -> bool:
        """Sources are given by name (``data.sources``), not one per kind."""
        return bool(self.sources)

    def key_of(self, name: str, split: str = "train") -> str:
        """A source's dataset's config key, for messages: ``data.sources.X.train`` or ``data.train.X``."""
        return f"data.sources.{name}.{split}" if self.sources else f"data.{split}.{name}"

    def check(self, c: _Checks) -> None:
        c.at_least(1, "batch_size")
        c.at_least(2, "max_text_length")
        c.at_least(8, "vocab_size")
        c.at_least(1, "shuffle_window")
        c.at_least(0, "read_ahead", "stall_timeout_s")
        c.fraction("mlm_probability", "mim_mask_ratio", "itm_negative_fraction")
        c.fraction("flip_probability", closed=True)
        c.at_least(1, "mixing_every")
        c.positive("mixing_step_size")
        c.fraction("mixing_decay")
        if not 0.0 < self.mixing_smoothing <= 1.0:
            c.fail("mixing_smoothing", "must be in (0, 1]: it keeps every weight above 0")
        if self.sources and (self.train or self.val):
            c.fail("sources", "give datasets either as data.sources or as data.train/data.val, not both")
        bad_names = sorted(n for n in self.sources if not SOURCE_NAME.fullmatch(n))
        if bad_names:
            c.fail("sources", f"source names {bad_names} may use only letters, digits, '_' and '-'")
        empty = sorted(n for n, s in self.sources.items() if not (s.train or s.val))
        if empty:
            c.fail("sources", f"source(s) {empty} have no dataset: give each a train and/or val URI")
        unknown = sorted(set(self.ratios) - set(self.sources or KINDS))
        if unknown and self.sources:
            c.fail("ratios", f"unknown source(s) {unknown}; the sources are {list(self.sources)}")
        elif unknown:
            c.fail("ratios", f"unknown kind(s) {unknown}; kinds are {list(KINDS)}")
        bad = {k: v for k, v in self.ratios.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            c.fail("ratios", f"must be finite and non-negative, got {bad}")
        elif self.ratios and sum(self.ratios.values()) <= 0:
            c.fail("ratios", "all ratios are zero: at least one source must get batches")
        for split in ("train", "val"):
            unknown = sorted(set(getattr(self, split)) - set(KINDS))
            if unknown:
                c.fail(split, f"unknown kind(s) {unknown}; kinds are {list(KINDS)}")


@dataclass
class DinoConfig:
    """DINO for the image phase (model/dino.py: the reference's defaults, and where this differs)."""

    out_dim: int = 65536  # prototypes; the reference's 65536 is too many for a tiny model (presets lower it)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0  # linear warm-up of the teacher temperature (0: none)
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996  # cosine to 1 over train.steps
    global_crops: int = 2
    local_crops: int = 8
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # px; 0: 96/224 of the image size (the reference's ratio) rounded to whole patches, at least one
    local_crop_size: int = 0

    def check(self, c: _Checks) -> None:
        c.at_least(1, "out_dim", "hidden_dim", "bottleneck_dim", "global_crops")
        c.at_least(0, "local_crops", "warmup_teacher_temp_steps", "local_crop_size")
        c.positive("student_temp", "teacher_temp", "warmup_teacher_temp")
        c.fraction("center_momentum")
        c.fraction("teacher_momentum", closed=True)
        for name in ("global_crop_scale", "local_crop_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                c.fail(name, "must be [low, high] with 0 < low <= high <= 1")
        if self.global_crops < 2 and self.local_crops == 0:
            c.fail("global_crops", "one global crop and no local crop leave no pair of views to match")


ENCODER_PARTS = ("image", "text")  # what model.init_encoders may initialise


@dataclass
class ModelConfig:
    preset: Literal["tiny", "small", "base", "large"] = "small"
    overrides: dict[str, Any] = field(default_factory=dict)  # flat builder kwargs
    loss_weights: dict[str, float] = field(default_factory=dict)
    init_checkpoint: str = ""  # transformers FlavaForPreTraining dir (local or s3://)
    activation_checkpointing: bool = False
    # the paper's recipe: unimodal phases (text: MLM on text sources; image: MIM or DINO on image sources)
    # that build and checkpoint only their encoder and head, then a joint phase from both encoders
    phase: Literal["joint", "text", "image"] = "joint"
    image_objective: Literal["mim", "dino"] = "mim"
    dino: DinoConfig = field(default_factory=DinoConfig)
    # image/text -> where that encoder's weights come from: an exported model dir (<run>/hf_model), a
    # checkpoint dir of a run, local or s3://, or run:NAME (the latest checkpoint of run NAME under
    # train.storage_path). Only the encoder is copied; the multimodal encoder and heads start random
    init_encoders: dict[str, str] = field(default_factory=dict)
    # torch.compile each transformer layer (model.sharding.compile_layers), on CPU and GPU workers alike:
    # the first steps pay the compilation (about a minute per distinct sequence length on 2 cores)
    compile: bool = False

    def check(self, c: _Checks) -> None:
        unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
        if unknown:
            c.fail("loss_weights", f"unknown loss(es) {unknown}; losses are {list(LOSS_NAMES)}")
        if any(not (math.isfinite(w) and w >= 0) for w in self.loss_weights.values()):
            c.fail("loss_weights", "weights must be finite and non-negative")
        if self.image_objective == "dino" and self.phase != "image":
            c.fail(
                "image_objective", f"dino trains the image phase only (model.phase=image), not {self.phase}"
            )
        unknown = sorted(set(self.init_encoders) - set(ENCODER_PARTS))
        if unknown:
            c.fail("init_encoders", f"unknown part(s) {unknown}; parts are {list(ENCODER_PARTS)}")
        absent = sorted(p for p in self.init_encoders if self.phase not in ("joint", p))
        if absent:
            c.fail("init_encoders", f"a {self.phase}-phase model has no {'/'.join(absent)} encoder")
        if self.init_encoders and self.init_checkpoint:
            c.fail(
                "init_encoders", "give model.init_checkpoint (a whole FLAVA) or model.init_encoders, not both"
            )
        empty = sorted(p for p, uri in self.init_encoders.items() if not uri)
        if empty:
            c.fail("init_encoders", f"no source given for {empty}")


@dataclass
class TrainConfig:
    run_name: str = "flava-demo"
    storage_path: str = "runs"  # local dir or s3:// URI; checkpoints live under <storage>/<run_name>
    num_workers: int = 2  # the full size; the global batch is data.batch_size x num_workers x grad_accum
    # elastic when below num_workers (0: = num_workers, not elastic): the run goes on with as few as this
    # many workers while nodes are lost and grows back when they return (Ray Train V2 elastic training)
    min_workers: int = 0
    elastic_resize_monitor_interval_s: float = 60.0  # how often a running group checks for room to grow
    # custom Ray resources each Train worker reserves besides its CPUs/GPU (e.g. {train_slot: 1}, which only
    # the nodes meant for training offer: ``ray start --resources``, KubeRay rayStartParams.resources).
    # Not node labels: Ray Train 2.60's elastic sizing counts resources and ignores label selectors
    worker_resources: dict[str, float] = field(default_factory=dict)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    steps: int = 200
    stop_at_step: int = 0  # >0: end this job at that step with a checkpoint (a run split across jobs)
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at train.steps
    grad_clip: float = 1.0
    grad_accum: int = 1
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 0
    collective_timeout_s: int = 300
    # parameters and compute in this dtype at every world size (FSDP2's policy, model/sharding.py);
    # gradients are reduced and kept in fp32 either way, LayerNorms and losses compute in fp32
    precision: Literal["fp32", "bf16"] = "fp32"
    export_model: bool = True  # transformers-layout export to <storage>/<run_name>/hf_model + MLflow
    seed: int = 0

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers the run trains with."""
        return (self.min_workers or self.num_workers, self.num_workers)

    def check(self, c: _Checks) -> None:
        c.at_least(1, "steps", "num_workers", "cpus_per_worker", "grad_accum", "log_every")
        c.at_least(1, "checkpoint_every", "keep_checkpoints", "val_batches", "collective_timeout_s")
        c.at_least(0, "stop_at_step", "warmup_steps", "val_every", "weight_decay", "adam_eps")
        c.at_least(-1, "max_failures")  # -1: retry forever (Ray Train's convention)
        c.at_least(0, "min_workers", "elastic_resize_monitor_interval_s")
        if self.min_workers > self.num_workers:
            c.fail("min_workers", f"must be <= train.num_workers={self.num_workers}")
        c.positive("lr", "grad_clip")
        c.fraction("min_lr_ratio", closed=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            c.fail("betas", "must be two numbers in [0, 1)")


@dataclass
class MLflowConfig:
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir
    experiment: str = "flava-pretrain"
    # set by a sweep (pipeline/tune) so that each trial's training run is a nested child of the sweep's run
    parent_run_id: str = ""
    run_tags: dict[str, str] = field(default_factory=dict)

    def check(self, c: _Checks) -> None:
        if not self.experiment:
            c.fail("experiment", "must not be empty")


@dataclass
class TuneConfig:
    """A sweep of mixing ratios (and optionally lr); each trial is a short pretraining run (train.*)."""

    sources: list[str] = field(default_factory=list)  # sources on the simplex; empty: all with train data
    num_samples: int = 8  # random: Dirichlet draws; grid: repeats of the whole grid
    search: Literal["random", "grid", "regmix"] = "random"
    dirichlet_alpha: float = 1.0  # random: the symmetric Dirichlet's alpha
    # regmix: Dirichlet(c x natural share), c log-uniform over [min, max] (corners to near-natural)
    regmix_concentration_min: float = 0.3
    regmix_concentration_max: float = 30.0
    grid_steps: int = 3  # grid: weights are multiples of 1/grid_steps
    lr_choices: list[float] = field(default_factory=list)  # empty: keep train.lr
    seed: int = 0
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = 1  # in validation rounds (train.val_every steps)
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0: derived from cluster resources
    workers_per_trial: int = 0  # 0: train.num_workers, reduced to what one trial can get
    data_cpus_per_trial: float = 1.0  # cap on each trial's Ray Data CPUs (kept beside its workers)
    max_failures: int = 1
    storage_path: str = "tune_runs"
    name: str = "mixing-sweep"

    def check(self, c: _Checks) -> None:
        c.at_least(1, "num_samples", "grid_steps", "grace_period")
        c.at_least(2, "reduction_factor")
        c.at_least(0, "max_concurrent_trials", "workers_per_trial", "data_cpus_per_trial", "max_failures")
        c.positive("dirichlet_alpha", "regmix_concentration_min", "regmix_concentration_max")
        if self.regmix_concentration_max < self.regmix_concentration_min:
            c.fail("regmix_concentration_max", "must be >= tune.regmix_concentration_min")
        if len(set(self.sources)) != len(self.sources):
            c.fail("sources", "a source is listed twice")
        if any(not lr > 0 for lr in self.lr_choices):
            c.fail("lr_choices", "every learning rate must be > 0")


@dataclass
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks (and where lossless, converts) a YAML value against a field's type."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or isinstance(value, bool):
            shown = " | ".join(repr(a) if a == "" else str(a) for a in allowed)
            raise ConfigError(f"{key}: expected one of {shown}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_t, key): _coerce(v, val_t, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_t,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_t, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if hint in (int, float, bool, str):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    where = f"{prefix}." if prefix else ""
    renamed = [f"{where}{u} is now {RENAMED[where + u]}" for u in unknown if where + u in RENAMED]
    if renamed:
        raise ConfigError("renamed config key(s): " + "; ".join(renamed))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(where + u for u in unknown)} "
            f"(known under {prefix or 'the top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(tree: dict) -> Config:
    """The inverse of ``to_dict`` (what Ray ships to workers is a plain dict), checked again."""
    return validate(_build(Config, _with_defaults(Config, tree)))


def validate(config: Config) -> Config:
    """Every section's own checks (ranges, closed sets, fields that must agree), all problems at once.
    Checks that need the cluster or the data (datasets for the ratios, GPUs) are the jobs' pre-flight."""
    problems = []
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        checks = _Checks(f.name, section)
        section.check(checks)
        problems += checks.problems
    problems += _phase_problems(config)
    problems += [
        f"{key}: user:password@ in a URI would travel with the config (Ray keeps it in its experiment "
        "state on storage); pass credentials through the environment (MLFLOW_TRACKING_USERNAME/"
        "MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        for key in _keys_with_userinfo(to_dict(config))
    ]
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def _phase_problems(config: Config) -> list[str]:
    """A unimodal phase has only its encoder: every source it samples or validates on must be its kind."""
    phase = config.model.phase
    allowed = PHASE_KINDS[phase]
    sources = config.data.named_sources()
    kind_of = {name: source.kind for name, source in sources.items()}
    problems = []
    sampled = sorted(n for n, w in config.data.ratios.items() if w > 0 and kind_of.get(n, n) not in allowed)
    if sampled:
        problems.append(
            f"data.ratios: model.phase={phase} trains on {list(allowed)} data only, but {sampled} get "
            "batches (give them ratio 0, or use model.phase=joint)"
        )
    held_out = sorted(n for n, s in sources.items() if s.val and s.kind not in allowed)
    if held_out:
        problems.append(
            f"data.val: model.phase={phase} cannot validate on {held_out} (not {list(allowed)} data): "
            "remove their held-out sets from this phase's config"
        )
    return problems


def _keys_with_userinfo(tree: Any, key: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for name, v in tree.items() for k in _keys_with_userinfo(v, f"{key}.{name}".lstrip("."))]
    if isinstance(tree, list):
        return [k for v in tree for k in _keys_with_userinfo(v, key)]
    return [key] if isinstance(tree, str) and _URI_USERINFO.search(tree) else []


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _validate_dotted(dotted: str) -> None:
    """Rejects an override whose path does not exist in the tree (dict-valued fields accept new keys)."""
    cls: Any = Config
    for i, part in enumerate(dotted.split(".")):
        if not dataclasses.is_dataclass(cls):
            if typing.get_origin(cls) is dict:
                return
            raise ConfigError(f"{dotted}: {'.'.join(dotted.split('.')[:i])} has no sub-keys")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            if dotted in RENAMED:
                raise ConfigError(f"renamed config key: {dotted} is now {RENAMED[dotted]}")
            known = ", ".join(sorted(hints))
            raise ConfigError(f"unknown config key: {dotted} (known at this level: {known})")
        cls = hints[part]


def _with_defaults(cls: type, values: dict) -> dict:
    """The full tree: defaults, replaced by the YAML values (a mapping-valued field is replaced whole)."""
    tree = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            given = values[f.name]
            nested = dataclasses.is_dataclass(hints[f.name]) and isinstance(given, dict)
            tree[f.name] = _with_defaults(hints[f.name], given) if nested else given
        else:
            tree[f.name] = dataclasses.asdict(cls())[f.name]
    tree.update({k: v for k, v in values.items() if k not in tree})  # unknown keys: reported by _build
    return tree


def _yaml_where(error: yaml.YAMLError) -> str:
    """``LINE:COL: problem`` (1-based) of a YAML syntax error, as editors and compilers print them."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None) or str(error)
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context:
        problem += f" {context}" + (
            f" started at {context_mark.line + 1}:{context_mark.column + 1}" if context_mark else ""
        )
    return f"{mark.line + 1}:{mark.column + 1}: {problem}" if mark is not None else problem


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads YAML (if given), applies ``a.b.c=value`` overrides (values parsed as YAML), type-checks."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}:{_yaml_where(e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded or {}
    tree = _with_defaults(Config, tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        _validate_dotted(dotted)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: the value is not YAML ({_yaml_where(e)}); quote a string, "
                "e.g. key='\"text\"'"
            ) from None
        _set_dotted(tree, dotted, value)
    return validate(_build(Config, tree))


REDACTED = "***redacted***"
_SECRET_KEY = re.compile(
    r"secret|password|passwd|credential|api_key|access_key|private_key|(^|_)token$", re.I
)
# userinfo runs to the last "@" before the path, so that a password holding "@" is masked whole
_URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s]+@", re.I)


def redact_uri(text: str) -> str:
    """``text`` with the ``user:password@`` of every URI in it masked."""
    return _URI_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)


def redact(tree: Any, key: str = "") -> Any:
    """A config tree with secrets masked: secret-looking keys, and user:password@ inside URIs."""
    if isinstance(tree, dict):
        return {k: redact(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v, key) for v in tree]
    if _SECRET_KEY.search(key) and tree not in ("", None):
        return REDACTED
    if isinstance(tree, str):
        return redact_uri(tree)
    return tree


def dump_config(config: Config) -> str:
    """The config as YAML, redacted: every printed or written config (``--dry-run``, ``best_config.yaml``,
    ``recommended_config.yaml``, MLflow's ``config/resolved.yaml``) goes through here."""
    return yaml.safe_dump(redact(to_dict(config)), sort_keys=False)


def parse_cli(
    argv: list[str] | None,
    description: str,
    add_arguments: typing.Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """The command line every job shares: ``--config FILE [key=value ...] [--dry-run]``."""
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--config", help="YAML file (presets in jobs/configs/)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the config and inputs, print it, start nothing"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    return config, args
