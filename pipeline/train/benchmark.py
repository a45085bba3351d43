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
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
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
from pipeline.drills.nodes import descendants
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


def step_batches(
    config: Config, steps: int, ranks: int = 1, per_kind: int = 4
) -> tuple[list[list[dict]], int]:
    """Each rank's batches of ``steps`` steps as numpy dicts (sources drawn by the ratios, every rank the
    same source at a step, as in training), and the vocab size."""
    config, tokenizer = fix_tokenizer(config)
    ratios, sources = mixture(config.data), config.data.named_sources()
    manifests = {name: read_manifest(sources[name].train, config.storage) for name in ratios}
    params = transform_params(config, tokenizer, image_size_of(manifests))
    train_sets = {name: (sources[name].kind, sources[name].train) for name in ratios}
    pool = held_out_batches(config, params, max_batches=per_kind * ranks, datasets=train_sets)
    size = config.data.batch_size  # ranks' batches of unequal sizes would mismatch their collectives
    pool = {name: [b for b in batches if _rows(b) == size] for name, batches in pool.items()}
    if not all(pool.values()):
        short = sorted(name for name, batches in pool.items() if not batches)
        raise ValueError(f"no full batch of {size} rows in the train data of {short}")
    sampler = SourceSampler(ratios, config.data.seed)
    used = dict.fromkeys(ratios, 0)
    per_rank: list[list[dict]] = [[] for _ in range(ranks)]
    for _ in range(steps):
        name = next(sampler)
        for rank, batches in enumerate(per_rank):
            batches.append(pool[name][(used[name] * ranks + rank) % len(pool[name])])
        used[name] += 1
    return per_rank, tokenizer.vocab_size


def _rows(batch: dict) -> int:
    return len(next(v for v in batch.values() if isinstance(v, np.ndarray)))


def time_steps(
    model, optimizer, scheduler, batches: list[dict], warmup: int, cpu: list[float] | None = None
) -> list[float]:
    """Seconds per optimizer step after ``warmup`` untimed steps (and this process's CPU seconds per
    step appended to ``cpu``)."""
    times = []
    for i, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer_step(
            model, optimizer, scheduler, iter([to_torch(batch)]), 1, 1.0, model.spec.losses_for(batch["kind"])
        )
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.append(time.process_time() - c0)
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


def sharded_step_times(
    config: Config, vocab: int, batches: list[dict], warmup: int, cpu: list[float] | None = None
) -> list[float]:
    """The training loop's model setup (``build_sharded``) timed on ``batches``; in a process group."""
    torch.set_num_threads(config.train.cpus_per_worker)
    model, optimizer, scheduler = build_sharded(config, vocab, torch.device("cpu"))
    return time_steps(model, optimizer, scheduler, batches, warmup, cpu)


def _trainer_worker(loop_config: dict) -> None:
    times = sharded_step_times(
        from_dict(loop_config["config"]), loop_config["vocab"], loop_config["batches"], loop_config["warmup"]
    )
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
    (batches,), vocab = step_batches(config, steps + warmup)
    return [
        StepTimes("bare process", bare(config, batches, vocab, warmup, fsdp=False)),
        StepTimes("bare process + FSDP2 (world 1)", bare(config, batches, vocab, warmup, fsdp=True)),
        StepTimes("TorchTrainer, 1 worker", in_trainer(config, batches, vocab, warmup)),
    ]


def bare_torchrun(config: Config, steps: int) -> dict[str, list[float]]:
    """Rank 0's seconds and CPU seconds per step (``times``, ``cpu``) of ``train.num_workers`` plain
    ``torchrun`` processes (``torchrun_baseline``): the job's model, FSDP2 and per-rank batch, on in-memory
    batches; every step timed (the whole job's are too)."""
    config = resolve_paths(config)
    per_rank, vocab = step_batches(config, steps, ranks=config.train.num_workers)
    with tempfile.TemporaryDirectory(prefix="bench-torchrun-") as tmp:
        payload, out = Path(tmp, "payload.pkl"), Path(tmp, "times.json")
        payload.write_bytes(
            pickle.dumps({"config": to_dict(config), "vocab": vocab, "batches": per_rank, "warmup": 0})
        )
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={config.train.num_workers}", "-m", "pipeline.train.torchrun_baseline"]
        threads = str(config.train.cpus_per_worker)
        subprocess.run(
            [*command, str(payload), str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": threads}
        )
        return json.loads(out.read_text())


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CpuSampler(threading.Thread):
    """CPU seconds of this process's descendants (the local Ray cluster it started, with every worker
    process), sampled with their titles: Ray titles a worker process after the task or actor it runs."""

    def __init__(self, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.period_s = period_s
        self.samples: list[tuple[float, dict[int, float]]] = []  # (epoch s, pid -> CPU s so far)
        self.titles: dict[int, set[str]] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            now, cpu = time.time(), {}
            for pid in descendants(os.getpid()):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except (OSError, IndexError):
                    continue  # it ended meanwhile
                cpu[pid] = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS  # utime + stime
                self.titles.setdefault(pid, set()).add(title)
            self.samples.append((now, cpu))
            self._done.wait(self.period_s)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def kind_of(self, pid: int) -> str:
        titles = " ".join(self.titles[pid])
        if "RayTrainWorker" in titles:
            return "train workers"
        if "MapBatches(" in titles:  # Ray Data's tasks (the reader's read-and-prepare tasks)
            return "data preparation"
        return "other Ray processes"

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by kind of process from ``start`` to ``end`` (epoch s)."""

        def at(moment: float) -> dict[int, float]:
            seen: dict[int, float] = {}
            for when, cpu in self.samples:
                if when > moment:
                    break
                seen.update(cpu)  # a process that ended keeps its last count
            return seen

        before, after = at(start), at(end)
        out = dict.fromkeys(("train workers", "data preparation", "other Ray processes"), 0.0)
        for pid, total in after.items():
            out[self.kind_of(pid)] += total - before.get(pid, 0.0)
        return out


def whole_job(config: Config) -> dict:
    """Runs the pretraining job while sampling its processes' CPU; per-step seconds of its training loop
    and of the loop's parts (from the run's summary and MLflow), its data-wait fraction (whole run, and
    the median step's), the CPU seconds per step of each kind of process over the loop, and the retrieval
    metrics at initialisation and at the end."""
    sampler = CpuSampler()
    sampler.start()
    try:
        result = run_pretraining(config)
    finally:
        sampler.stop()
    client = MlflowClient(result.tracking_uri)
    steps = sorted(client.get_metric_history(result.mlflow_run_id, "perf/step_time_s"), key=lambda m: m.step)
    waits = sorted(client.get_metric_history(result.mlflow_run_id, "perf/data_wait_s"), key=lambda m: m.step)
    m, n = result.metrics, len(steps)
    out = {
        "steps": n,
        "data_wait_fraction": m["perf/total_data_s"] / m["perf/total_step_s"],
        "data_wait_fraction_median_step": statistics.median(
            w.value / s.value for w, s in zip(waits, steps, strict=True)
        ),
        "loop_s": (m["perf/total_loop_s"] - m["perf/total_validation_s"]) / n,
        **{f"{part}_s": m[f"perf/total_{part}_s"] / n for part in ("step", "data", "mlflow", "checkpoint")},
        "validation_s": m["perf/total_validation_s"] / n,
    }
    # CPU from the end of the first step to the end of the last (MLflow's timestamps of the step metrics)
    window = (steps[0].timestamp / 1000, steps[-1].timestamp / 1000)
    out["cpu"] = {kind: s / (n - 1) for kind, s in sampler.between(*window).items()} if n > 1 else {}
    out.update(retrieval(client, result.mlflow_run_id))
    out["mlflow_run_id"], out["exported_model"] = result.mlflow_run_id, result.exported_model
    return out


def retrieval(client: MlflowClient, run_id: str) -> dict[str, float]:
    """The run's zero-shot retrieval metrics at step 0 and at the end."""
    out = {}
    for name in ("chance_r1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):
        history = client.get_metric_history(run_id, f"val/retrieval/{name}")
        if history:
            history.sort(key=lambda m: m.step)
            out[f"{name}@init"], out[f"{name}@end"] = history[0].value, history[-1].value
    return out


def whole_job_table(config: Config, bare_run: dict[str, list[float]], job: dict) -> str:
    """The whole job against the bare ``torchrun`` run, per step, and where the difference goes. Data
    preparation runs on the same cores: during the data wait the train workers idle, and the rest of its
    CPU time slows their steps, so it is charged max(wait, its CPU seconds / cores) (cores shared evenly)."""
    bare = statistics.fmean(bare_run["times"])
    cores = len(os.sched_getaffinity(0))
    batch = config.data.batch_size * config.train.grad_accum * config.train.num_workers
    prep_cpu = job["cpu"].get("data preparation", 0.0)
    charged = max(job["data_s"], prep_cpu / cores)
    framework = job["loop_s"] - bare - charged
    rows = [
        ("bare torchrun, FSDP2, in-memory batches", bare),
        ("whole job (validation excluded)", job["loop_s"]),
        ("  data wait (rank 0)", job["data_s"]),
        (f"  data preparation CPU / {cores} cores", prep_cpu / cores),
        ("  data preparation, charged", charged),
        ("  MLflow logging (rank 0)", job["mlflow_s"]),
        ("  checkpoints and Ray Train reports", job["checkpoint_s"]),
        ("  step beyond bare, less data wait", job["step_s"] - job["data_s"] - bare),
        (f"  Ray's own processes' CPU / {cores} cores", job["cpu"].get("other Ray processes", 0.0) / cores),
        ("  framework: whole - bare - data charged", framework),
        ("  validation (not in the whole job's time)", job["validation_s"]),
    ]
    lines = [
        f"whole job vs bare torchrun: preset {config.model.preset}, {config.train.num_workers} workers x "
        f"{config.train.cpus_per_worker} thread(s), global batch {batch}, {job['steps']} steps, every step "
        f"timed in both, {cores} cores",
        f"{'':<46}{'s/step':>10}{'samples/s':>11}{'of bare':>9}",
    ]
    for name, seconds in rows:
        rate = f"{batch / seconds:>11.1f}" if not name.startswith(" ") else " " * 11
        lines.append(f"{name:<46}{seconds:>10.4f}{rate}{seconds / bare:>9.1%}")
    lines.append(
        f"whole job / bare: {bare / job['loop_s']:.2f}x the samples/s; "
        f"framework share {framework / bare:.1%} of the bare step (target < 5%)"
    )
    bare_cpu = statistics.fmean(bare_run["cpu"]) * config.train.num_workers
    if job["cpu"]:
        lines.append(
            f"CPU s per step: bare torchrun ranks {bare_cpu:.3f}; whole job over its loop: "
            + ", ".join(f"{k} {v:.3f}" for k, v in job["cpu"].items())
        )
    else:
        lines.append("CPU per process kind: not measured (a single step)")
    return "\n".join(lines)
