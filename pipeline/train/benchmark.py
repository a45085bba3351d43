"""What the trainer costs: step time of one TorchTrainer worker against the same model and batches in a
bare process, and the data-wait fraction of a pretraining run (``jobs/benchmark_trainer.py``).

All three step-time setups run ``loop.optimizer_step`` on the same pre-built batches (read in process
from the train shards, so no data pipeline is timed) with the same number of torch threads:

  bare             a plain process, unsharded module
  bare + FSDP2     a plain process, ``parallelize`` over a world-size-1 gloo group (what sharding costs)
  TorchTrainer     one Ray Train worker with the training loop's model setup (``build_sharded``, which
                   parallelizes at every world size: compare it with ``bare + FSDP2``)
"""

from __future__ import annotations

import dataclasses
import socket
import statistics
import tempfile
import time

import ray.train
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchConfig, TorchTrainer

from model import build_flava
from model.sharding import parallelize
from pipeline.config import Config, from_dict, to_dict
from pipeline.data.datasets import image_size_of, transform_params
from pipeline.data.mixing import SourceSampler, mixture
from pipeline.data.stream import to_torch
from pipeline.data.validation import held_out_batches
from pipeline.shards.format import read_manifest
from pipeline.train.data_setup import fix_tokenizer
from pipeline.train.launch import resolve_paths, run_pretraining
from pipeline.train.loop import build_sharded, model_kwargs, optimizer_step
from pipeline.train.optim import build_optimizer, build_scheduler


@dataclasses.dataclass
class StepTimes:
    setup: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        """Every setup runs the same step sequence (kinds of unequal cost): the mean compares them."""
        return statistics.fmean(self.seconds)


def step_batches(config: Config, steps: int, per_kind: int = 4) -> tuple[list[dict], int]:
    """The batches of ``steps`` steps (sources drawn by the ratios) as numpy dicts, and the vocab size."""
    config, tokenizer = fix_tokenizer(config)
    ratios, sources = mixture(config.data), config.data.named_sources()
    manifests = {name: read_manifest(sources[name].train, config.storage) for name in ratios}
    params = transform_params(config, tokenizer, image_size_of(manifests))
    train_sets = {name: (sources[name].kind, sources[name].train) for name in ratios}
    pool = held_out_batches(config, params, max_batches=per_kind, datasets=train_sets)
    sampler = SourceSampler(ratios, config.data.seed)
    used = dict.fromkeys(ratios, 0)
    batches = []
    for _ in range(steps):
        name = next(sampler)
        batches.append(pool[name][used[name] % len(pool[name])])
        used[name] += 1
    return batches, tokenizer.vocab_size


def time_steps(model, optimizer, scheduler, batches: list[dict], warmup: int) -> list[float]:
    """Seconds per optimizer step after ``warmup`` untimed steps."""
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        optimizer_step(
            model, optimizer, scheduler, iter([to_torch(batch)]), 1, 1.0, model.spec.losses_for(batch["kind"])
        )
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bare(config: Config, batches: list[dict], vocab: int, warmup: int, fsdp: bool) -> list[float]:
    torch.set_num_threads(config.train.cpus_per_worker)
    if not fsdp:
        torch.manual_seed(config.train.seed)
        model = build_flava(config.model.preset, **model_kwargs(config, vocab))
        optimizer = build_optimizer(model, config.train)
        return time_steps(model, optimizer, build_scheduler(optimizer, config.train), batches, warmup)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(config.train.seed)
        model = build_flava(config.model.preset, **model_kwargs(config, vocab))
        model = parallelize(model, precision=config.train.precision)
        optimizer = build_optimizer(model, config.train)
        return time_steps(model, optimizer, build_scheduler(optimizer, config.train), batches, warmup)
    finally:
        dist.destroy_process_group()


def _trainer_worker(loop_config: dict) -> None:
    config = from_dict(loop_config["config"])
    torch.set_num_threads(config.train.cpus_per_worker)
    model, optimizer, scheduler = build_sharded(config, loop_config["vocab"], torch.device("cpu"))
    times = time_steps(model, optimizer, scheduler, loop_config["batches"], loop_config["warmup"])
    with tempfile.TemporaryDirectory() as empty:  # Train V2 keeps the metrics of checkpointed reports
        ray.train.report({"step_times": times}, checkpoint=ray.train.Checkpoint.from_directory(empty))


def in_trainer(config: Config, batches: list[dict], vocab: int, warmup: int) -> list[float]:
    trainer = TorchTrainer(
        _trainer_worker,
        train_loop_config={"config": to_dict(config), "batches": batches, "vocab": vocab, "warmup": warmup},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": config.train.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name="trainer-overhead", storage_path=tempfile.mkdtemp(prefix="bench-")
        ),
    )
    return trainer.fit().metrics["step_times"]


def step_time_table(config: Config, steps: int, warmup: int) -> list[StepTimes]:
    config = resolve_paths(config)
    batches, vocab = step_batches(config, steps + warmup)
    return [
        StepTimes("bare process", bare(config, batches, vocab, warmup, fsdp=False)),
        StepTimes("bare process + FSDP2 (world 1)", bare(config, batches, vocab, warmup, fsdp=True)),
        StepTimes("TorchTrainer, 1 worker", in_trainer(config, batches, vocab, warmup)),
    ]


def data_wait(config: Config) -> dict[str, float]:
    """Runs the pretraining job and sums its per-step data wait and step time from MLflow."""
    result = run_pretraining(config)
    client = MlflowClient(result.tracking_uri)
    wait = [m.value for m in client.get_metric_history(result.mlflow_run_id, "perf/data_wait_s")]
    step = [m.value for m in client.get_metric_history(result.mlflow_run_id, "perf/step_time_s")]
    out = {
        "steps": len(step),
        "step_time_s_median": statistics.median(step),
        "data_wait_fraction": sum(wait) / sum(step),
        "data_wait_fraction_median_step": statistics.median(w / s for w, s in zip(wait, step, strict=True)),
    }
    for name in ("chance_r1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):  # at step 0 and at the end
        history = client.get_metric_history(result.mlflow_run_id, f"val/retrieval/{name}")
        if history:
            history.sort(key=lambda m: m.step)
            out[f"{name}@init"], out[f"{name}@end"] = history[0].value, history[-1].value
    out["mlflow_run_id"], out["exported_model"] = result.mlflow_run_id, result.exported_model
    return out
