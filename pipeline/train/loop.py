"""The training loop that runs inside every Ray Train worker (and inside every Ray Tune trial).

Per step all ranks draw the same data source (so the same batch kind) from the mixed stream, run
``grad_accum`` micro-batches of it through the FSDP2-sharded model, clip, step AdamW and the schedule.
Rank 0 logs to MLflow and prints progress; every ``val_every`` steps all ranks validate and report the
metrics (``val/objective`` for Tune); the checkpoint manager saves the training state when it is due. A
(re)started worker group resumes from the newest complete checkpoint of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model import FlavaForPretraining, build_flava, load_hf_checkpoint, save_hf_checkpoint
from model.dino import DinoSpec
from model.sharding import parallelize
from pipeline import storage
from pipeline.config import KINDS, Config, dump_config, from_dict
from pipeline.data.mixing import SOURCE_LOSSES
from pipeline.data.reader import KEY_HASH_BITS
from pipeline.data.tokenizer import load_tokenizer
from pipeline.train import events
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.collectives import (
    mean_across_ranks,
    rank_world,
    spread_across_ranks,
    sum_across_ranks_mod,
)
from pipeline.train.data_setup import WorkerData
from pipeline.train.evaluate import chance_losses, evaluate, normalized_loss
from pipeline.train.init_encoders import load_encoder_
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters of the run so far (a stateful part of the checkpoint)."""

    step: int = 0
    samples: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))  # global, per kind
    steps_by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    loss_runs: dict[str, dict[str, int]] = field(default_factory=lambda: {k: {} for k in KINDS})
    time_step_s: float = 0.0  # summed over the steps trained: the run's data-wait fraction
    time_data_s: float = 0.0
    # seconds of the training loop (from its first step to its last), and the parts of it outside the
    # steps: what the whole job pays beyond training (jobs/benchmark_trainer.py breaks it down)
    time_loop_s: float = 0.0
    time_mlflow_s: float = 0.0
    time_checkpoint_s: float = 0.0
    time_validation_s: float = 0.0
    samples_by_source: dict[str, int] = field(default_factory=dict)  # global, per source
    steps_by_source: dict[str, int] = field(default_factory=dict)
    # per source, a moving average of the normalised training loss: written at the end as the run's
    # source_losses.json, the reference of a later data.mixing=doremi run
    loss_by_source: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):  # a checkpoint from before named sources lacks the by-source counters
            setattr(self, f.name, state.get(f.name, getattr(self, f.name)))


def model_kwargs(config: Config, text_vocab_size: int) -> dict:
    """Builder kwargs: the preset, the run's vocabulary and text length, then explicit overrides."""
    kwargs = {
        "text_vocab_size": text_vocab_size,
        "max_position_embeddings": max(128, config.data.max_text_length),
        **config.model.overrides,
    }
    if config.model.loss_weights:
        kwargs["loss_weights"] = dict(config.model.loss_weights)
    model = config.model
    kwargs.update(phase=model.phase, image_objective=model.image_objective)
    if model.image_objective == "dino":
        heads = ("out_dim", "hidden_dim", "bottleneck_dim", "student_temp", "teacher_temp")
        schedule = ("warmup_teacher_temp", "warmup_teacher_temp_steps", "center_momentum", "teacher_momentum")
        kwargs["dino"] = DinoSpec(**{name: getattr(model.dino, name) for name in heads + schedule})
    return kwargs


def build_sharded(config: Config, text_vocab_size: int, device: torch.device):
    """(model, AdamW, schedule), identically initialised on every rank, then ``parallelize``d (collective)."""
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank before sharding
    if config.model.init_checkpoint:
        model = load_hf_checkpoint(storage.localize_dir(config.model.init_checkpoint, config.storage))
    else:
        model = build_flava(config.model.preset, **model_kwargs(config, text_vocab_size))
    for part, source in config.model.init_encoders.items():  # the driver resolved and checked them
        load_encoder_(model, part, source, config)
    model = parallelize(
        model.to(device),
        precision=config.train.precision,
        activation_checkpointing=config.model.activation_checkpointing,
        compile=config.model.compile,
    )
    optimizer = build_optimizer(model, config.train)
    return model, optimizer, build_scheduler(optimizer, config.train)


# Progress.time_<part>_s, reported as perf/total_<part>_s ("checkpoint": checkpoints and other reports)
LOOP_PARTS = ("step", "data", "loop", "mlflow", "checkpoint", "validation")
LOSS_AVERAGE = 0.9  # weight of the past in Progress.loss_by_source


def _by_source(p: Progress) -> dict[str, float]:
    return {
        **{f"samples/source/{k}": float(v) for k, v in p.samples_by_source.items()},
        **{f"steps/source/{k}": float(v) for k, v in p.steps_by_source.items()},
    }


def _memory_mb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"sys/gpu_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"sys/rss_mb": rss_pages * 4096 / 2**20}


def _fmt_eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _progress_line(step: int, steps: int, kind: str, metrics: dict, eta_s: float) -> str:
    prefix = f"train/{kind}/"
    losses = " ".join(
        f"{name[len(prefix) :]} {value:.3f}"
        for name, value in sorted(metrics.items())
        if name.startswith(prefix) and name != f"{prefix}total"
    )
    wait = metrics["perf/data_wait_s"] / metrics["perf/step_time_s"]
    return (
        f"[train] step {step}/{steps} {kind:<10} loss {metrics[prefix + 'total']:.3f} ({losses}) "
        f"lr {metrics['train/lr']:.2e} | {metrics['perf/samples_per_s']:.1f} samples/s "
        f"| data wait {wait:.0%} | ETA {_fmt_eta(eta_s)}"
    )


def optimizer_step(
    model, optimizer, scheduler, batches, accum: int, grad_clip: float, expected: frozenset[str]
) -> tuple[Counter, float, float, float]:
    """One optimizer step over ``accum`` micro-batches drawn from the iterator ``batches``.

    Returns (losses averaged over the micro-batches, incl. ``total``; grad norm before clipping; the lr
    used; seconds spent waiting for batches). Raises if a batch ran other losses than ``expected``.
    """
    losses: Counter = Counter()
    wait = 0.0
    for micro in range(accum):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once, on the last one
            model.set_requires_gradient_sync(micro == accum - 1)
        out = model(batch)
        if set(out.losses) != expected:
            raise RuntimeError(
                f"a {batch['kind']!r} batch ran losses {sorted(out.losses)}, expected {sorted(expected)}"
            )
        (out.loss / accum).backward()
        losses.update({name: v.item() / accum for name, v in out.losses.items()})
        losses["total"] += out.loss.item() / accum
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_optimizer_step_()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return losses, float(grad_norm), lr, wait


class Trainer:
    """One worker's training state; ``run()`` trains to the target step."""

    def __init__(self, config: Config, spec, mlflow_run_id: str, device: torch.device):
        self.config, self.train, self.device = config, config.train, device
        self.rank, self.world = rank_world()
        self.data = WorkerData(config, spec, device)
        self.model, self.optimizer, self.scheduler = build_sharded(config, self.data.text_vocab_size, device)
        self.spec = self.model.spec
        self.progress = Progress()
        self.expected = {kind: self.spec.losses_for(kind) for kind in KINDS}
        # the same at every world size: fewer ranks take larger shares (MixedStream.batch_rows)
        self.global_batch = config.data.batch_size * self.train.grad_accum * self.train.num_workers
        pairs = config.data.batch_size * self.train.num_workers  # a micro-step's contrastive candidates
        self.dino_out_dim = self.spec.dino.out_dim if self.spec.dino else 0
        self.chance = chance_losses(
            self.spec.text_vocab_size, self.spec.mim_vocab_size, pairs, self.dino_out_dim
        )
        self.run_fs, self.run_dir = storage.resolve(
            storage.join(self.train.storage_path, self.train.run_name), config.storage
        )
        self.checkpoints = CheckpointManager(
            self.run_fs,
            self.run_dir,
            every=self.train.checkpoint_every,
            model=self.model,
            optimizer=self.optimizer,
            parts={"scheduler": self.scheduler, "stream": self.data.stream, "progress": self.progress},
            meta={"mlflow_run_id": mlflow_run_id},
        )
        self.tracker = Tracker(config.mlflow.tracking_uri, mlflow_run_id) if self.rank == 0 else None

    @contextlib.contextmanager
    def timed(self, part: str):
        """Adds the block's seconds to ``Progress.time_<part>_s``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            name = f"time_{part}_s"
            setattr(self.progress, name, getattr(self.progress, name) + time.perf_counter() - t0)

    def log(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

    def resume(self) -> None:
        found = self.checkpoints.restore()
        if self.rank == 0:
            events.record(
                self.run_fs,
                self.run_dir,
                "train_start",
                world_size=self.world,
                step=self.progress.step,
                resumed_from=found.path if found else None,
            )
        if found is not None:
            self.log(f"[train] resumed from {found.path} at step {self.progress.step}")
        for source in self.data.stream.restarted:  # data.on_changed_data=restart_epoch
            if self.rank == 0:
                self.tracker.set_tags({f"data.restart.{source}": f"step {self.progress.step}"})
                events.record(
                    self.run_fs, self.run_dir, "data_restart", source=source, step=self.progress.step
                )

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        source = self.data.next_source()
        kind = self.data.spec.kind_of(source)
        accum = self.train.grad_accum
        batches = (self.data.next_batch(source) for _ in range(accum))
        self.model.set_progress(self.progress.step, self.train.steps)
        losses, grad_norm, lr, wait = optimizer_step(
            self.model,
            self.optimizer,
            self.scheduler,
            batches,
            accum,
            self.train.grad_clip,
            self.expected[kind],
        )
        p = self.progress
        p.step += 1
        p.steps_by_kind[kind] += 1
        p.samples[kind] += self.global_batch
        p.steps_by_source[source] = p.steps_by_source.get(source, 0) + 1
        p.samples_by_source[source] = p.samples_by_source.get(source, 0) + self.global_batch
        for name in self.expected[kind]:
            p.loss_runs[kind][name] = p.loss_runs[kind].get(name, 0) + accum
        step_time = time.perf_counter() - t0
        p.time_step_s += step_time
        p.time_data_s += wait
        losses = mean_across_ranks(dict(losses), self.device)
        normalized = normalized_loss(losses, self.chance)
        self.data.stream.observe(source, normalized)  # the same on every rank: the losses are all-reduced
        previous = p.loss_by_source.get(source, normalized)
        p.loss_by_source[source] = LOSS_AVERAGE * previous + (1 - LOSS_AVERAGE) * normalized
        metrics = {f"train/{kind}/{n}": v for n, v in losses.items()}
        metrics.update(
            {
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "perf/step_time_s": step_time,
                "perf/data_wait_s": wait,
                "perf/samples_per_s": self.global_batch / step_time,
                "sys/world_size": float(self.world),
                # the rows of this step (all ranks): a resumed or resized run must train the same rows
                f"data/keys/{kind}": float(
                    sum_across_ranks_mod(self.data.stream.take_keys_digest(), 1 << KEY_HASH_BITS, self.device)
                ),
                **{f"samples/{k}": float(v) for k, v in p.samples.items()},
                **{f"steps/{k}": float(v) for k, v in p.steps_by_kind.items()},
                **_memory_mb(self.device),
            }
        )
        if self.data.spec.named:  # the sources' own curves beside the kinds'
            metrics.update({f"train/source/{source}/{n}": v for n, v in losses.items()})
            metrics[f"train/source/{source}/normalized"] = normalized
            metrics.update(_by_source(p))
        mixing = self.data.spec.mixing
        if mixing.rule != "static" and (p.step % mixing.every == 0 or p.step == 1):
            weights = self.data.stream.mixing.current()
            spread = spread_across_ranks(list(weights.values()), self.device)
            if spread > 0:  # every rank must draw the same source: the weights are computed, not sent
                raise RuntimeError(
                    f"online mixing weights differ across ranks by {spread:g} at step {p.step}"
                )
            metrics.update({f"mix/weight/{s}": w for s, w in weights.items()})
            metrics["mix/rank_spread"] = spread
        metrics["_kind"] = kind  # for the progress line only
        return metrics

    def validate(self) -> dict[str, float]:
        metrics = evaluate(
            self.model,
            self.data.val_batches(),
            self.spec.text_vocab_size,
            self.spec.mim_vocab_size,
            self.dino_out_dim,
        )
        if self.tracker is not None:
            self.tracker.add(self.progress.step, metrics)
            self.tracker.flush()
            shown = {k: v for k, v in metrics.items() if k.endswith(("objective", "_r1", "/total"))}
            self.log(
                f"[val] step {self.progress.step} "
                + " ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
            )
        return metrics

    def summary(self) -> dict[str, float]:
        """Run-level numbers every report carries (Ray keeps the last one as the result's metrics)."""
        p = self.progress
        out = {
            "step": p.step,
            "perf/data_wait_fraction": p.time_data_s / p.time_step_s if p.time_step_s else 0.0,
            **{f"perf/total_{part}_s": getattr(p, f"time_{part}_s") for part in LOOP_PARTS},
        }
        out.update({f"samples/{k}": v for k, v in p.samples.items()})
        out.update({f"loss_runs/{k}/{n}": c for k, runs in p.loss_runs.items() for n, c in runs.items()})
        if self.data.spec.named:
            out.update(_by_source(p))
        return out

    def write_mixing_outcome(self) -> None:
        """Rank 0, at the end: the run's loss per source (``source_losses.json``, a later DoReMi run's
        reference); with online mixing also ``mixing/``: the weights over the steps (a stacked-area PNG,
        from the logged ``mix/weight/*``), the final and time-averaged weights, and a static config of the
        time-averaged ones (DoReMi's output mixture). Logged to MLflow as artifacts ``mixing/``."""
        base = storage.join(self.train.storage_path, self.train.run_name)
        losses = json.dumps(dict(sorted(self.progress.loss_by_source.items())), indent=2).encode()
        storage.write_bytes_atomic(storage.join(base, SOURCE_LOSSES), losses, self.config.storage)
        policy = self.data.stream.mixing
        if self.data.spec.mixing.rule == "static":
            return
        from pipeline.tune.report import mixing_weights_plot

        history = {
            s: [(m.step, m.value) for m in self.tracker.metric_history(f"mix/weight/{s}")]
            for s in policy.sources
        }
        averaged = policy.time_averaged()
        static = dataclasses.replace(
            self.config.data, mixing="static", ratios={s: round(w, 4) for s, w in averaged.items()}
        )
        files = {
            "weights.png": mixing_weights_plot(history),
            "weights.json": json.dumps(
                {"final": policy.current(), "time_averaged": averaged}, indent=2
            ).encode(),
            "recommended_config.yaml": dump_config(dataclasses.replace(self.config, data=static)).encode(),
        }
        with tempfile.TemporaryDirectory(prefix="flava-mixing-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
                storage.write_bytes_atomic(storage.join(base, "mixing", name), data, self.config.storage)
            self.tracker.log_dir(tmp, "mixing")

    def export(self) -> str:
        """Collective gather of the full weights; rank 0 writes the transformers layout (plus the run's
        tokenizer) to ``<run>/hf_model`` and to the MLflow artifact ``model``. Returns the URI (rank 0)."""
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.rank != 0:
            return ""
        plain = FlavaForPretraining(self.spec)  # the trained architecture, also for an init checkpoint
        plain.load_state_dict(full)
        local = Path(tempfile.mkdtemp(prefix="flava-export-"))
        target = f"{self.run_dir}/hf_model"
        uri = target if isinstance(self.run_fs, pafs.LocalFileSystem) else f"s3://{target}"
        try:
            save_hf_checkpoint(plain, local)
            data = self.config.data
            load_tokenizer(data.tokenizer, data.max_text_length, self.config.storage).save(
                str(local), self.config.storage
            )
            self.run_fs.create_dir(target, recursive=True)
            pafs.copy_files(
                str(local),
                target,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.run_fs,
            )
            self.tracker.log_model(str(local), uri)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        events.record(self.run_fs, self.run_dir, "export", uri=uri)
        self.log(f"[train] exported the model (transformers layout) to {uri}")
        return uri

    def run(self) -> None:
        train, p = self.train, self.progress
        stop = min(train.steps, train.stop_at_step) if train.stop_at_step > 0 else train.steps
        if p.step == 0 and train.val_every > 0:  # the untrained model: the baseline of every curve
            ray.train.report({**self.validate(), **self.summary()})
        started, first_step = time.perf_counter(), p.step
        while p.step < stop:
            step_started = time.perf_counter()
            metrics = self.step()
            kind = metrics.pop("_kind")
            if self.tracker is not None:
                with self.timed("mlflow"):
                    self.tracker.add(p.step, metrics)
                    if p.step % train.log_every == 0 or p.step == stop:
                        self.tracker.add(p.step, self.data.skip_counts())
                        self.tracker.flush(background=True)
                        eta = (time.perf_counter() - started) / (p.step - first_step) * (stop - p.step)
                        self.log(_progress_line(p.step, train.steps, kind, metrics, eta))
            if p.step < stop:
                if train.val_every > 0 and p.step % train.val_every == 0:
                    with self.timed("validation"):
                        report = self.validate()
                else:
                    report = {}
                with self.timed("checkpoint"):
                    if self.checkpoints.should_save(p.step):
                        self.checkpoints.save(p.step, {**report, **self.summary()})
                    elif report:
                        ray.train.report({**report, **self.summary()})
            p.time_loop_s += time.perf_counter() - step_started

        final = self.validate() if train.val_every > 0 else {}
        trained_now = p.step > first_step
        if p.step == train.steps and train.export_model:
            final["export_uri"] = self.export()
        final.update(self.summary())
        if p.step == train.steps and self.rank == 0:
            self.write_mixing_outcome()
        if trained_now:  # the last step always gets a checkpoint: a rerun of the name finds it finished
            self.checkpoints.save(p.step, final)
        else:  # a rerun of a finished run: its final checkpoint is already there
            ray.train.report(final)
        if self.tracker is not None:
            self.tracker.flush()


def quiet_per_report_logs() -> None:
    """Ray Train logs every ``report`` with all its metrics at INFO; the progress lines already say it,
    once. No public setting turns that off, and its logger is named by its file path, not its module
    name, so this is the one place that knows where that private module lives (without importing it)."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of ``TorchTrainer``: ``loop_config`` = {"config": <config dict>, "stream_spec":
    pipeline.data StreamSpec, "mlflow_run_id": str}, all fixed by the driver (``launch.build_trainer``)."""
    config = from_dict(loop_config["config"])
    quiet_per_report_logs()
    log.setLevel(logging.INFO)
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # as many intra-op threads as CPUs reserved for the worker, no more
        torch.set_num_threads(max(1, config.train.cpus_per_worker))
    trainer = Trainer(config, loop_config["stream_spec"], loop_config["mlflow_run_id"], device)
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.data.stream.close()
