"""Preprocessing on a CPU-only node: what Ray Data gains over a DataLoader bound to the trainer's CPUs.

A local multi-node cluster (``pipeline.drills.nodes.LocalCluster``): the head is the trainer node, with
``k`` CPUs for data preparation plus the trainer's own (``train.cpus_per_worker``), and a custom resource
``TRAINER_NODE`` that the Train worker asks for (``train.worker_resources``), so it runs there; an added
node of ``m`` CPUs is the CPU-only node. Two measurements:

- input throughput (``pipeline.data.benchmark``'s paths, rounds interleaved): a torch DataLoader with ``k``
  workers (all it could use on the trainer machine) against the training job's own Ray Data reader,
  consumed in this process on the head, with its read tasks on the trainer node only (``k`` CPUs) and on
  both nodes (``k + m`` CPUs); the trainer's CPU is held by a placement group meanwhile, as the Train
  worker holds it;
- the data-wait fraction of a short training run (1 Train worker on the trainer node) on the trainer node
  alone, then with the CPU-only node added.

All nodes run on this machine and share its cores: a CPU-only node adds Ray CPUs, not silicon, so the gain
measured here is bounded by the cores the trainer node's share leaves idle.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

from pipeline.config import Config
from pipeline.data.benchmark import Setup, bench_dataloader, ray_reader_epochs, time_paths
from pipeline.drills.nodes import LocalCluster
from pipeline.train.benchmark import whole_job

TRAINER_NODE = "flava_trainer_node"  # the custom resource only the trainer node offers


def training_config(config: Config, work: Path, name: str, steps: int) -> Config:
    """The benchmark's dataset and batch, trained for ``steps`` by one worker pinned to the trainer node
    (no validation, no export: the data wait of the steps is what is measured)."""
    config = copy.deepcopy(config)
    train = config.train
    train.run_name, train.storage_path, train.steps = name, str(work / "runs"), steps
    train.worker_resources = {TRAINER_NODE: 1}
    train.val_every, train.export_model, train.checkpoint_every, train.log_every = 0, False, steps, 1
    config.mlflow.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    return config


def on_node(node_id: str, epochs_of):
    """A Ray Data path whose read tasks run on one node only (the executions it starts copy the current
    DataContext): what Ray Data feeds without the CPU-only node, timed between the other paths' rounds."""
    from ray.data import DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def epochs(span: range):
        context = DataContext.get_current()
        before = context.scheduling_strategy, context.scheduling_strategy_large_args
        context.scheduling_strategy = context.scheduling_strategy_large_args = NodeAffinitySchedulingStrategy(
            node_id, soft=False
        )
        try:
            return epochs_of(span)
        finally:
            context.scheduling_strategy, context.scheduling_strategy_large_args = before

    return epochs


def run(
    setup: Setup, trainer_cpus: int, cpu_only_cpus: int, rounds: int, epochs_per_round: int, train_steps: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(samples/s per input path, data-wait metrics per training run); ``train_steps=0``: no training runs."""
    import ray
    from ray.util.placement_group import placement_group

    trainer_own = setup.config.train.cpus_per_worker
    print(
        f"{setup.kind}: {setup.rows} rows in {len(setup.paths)} shards, {setup.params.image_size}px, batch "
        f"{setup.batch_size}; trainer node: {trainer_cpus} data CPU(s) + {trainer_own} for the trainer, "
        f"CPU-only node: {cpu_only_cpus} CPU(s); all nodes share this machine's cores"
    )
    loader = f"torch DataLoader ({trainer_cpus} workers, trainer node)"
    paths = {loader: bench_dataloader(setup, trainer_cpus)}
    paths[loader](range(1))  # its workers fork before Ray starts its threads
    work = Path(tempfile.mkdtemp(prefix="flava-disagg-"))
    waits: dict[str, dict[str, float]] = {}

    def train(label: str, run_name: str) -> None:
        if train_steps:
            waits[label] = whole_job(training_config(setup.config, work, run_name, train_steps))

    try:
        with LocalCluster(
            head_cpus=trainer_cpus + trainer_own, node_cpus=(), head_resources={TRAINER_NODE: 1}
        ) as cluster:
            train("trainer node only", "alone")
            cluster.add_node(cpus=cpu_only_cpus)
            train("+ CPU-only node", "with-cpu-only-node")
            trainer = placement_group([{"CPU": trainer_own, TRAINER_NODE: 1}])
            ray.get(trainer.ready(), timeout=60)
            on_trainer_node = on_node(ray.get_runtime_context().get_node_id(), ray_reader_epochs(setup))
            paths[f"Ray Data ({trainer_cpus} CPUs, trainer node only)"] = on_trainer_node
            paths[f"Ray Data ({trainer_cpus}+{cpu_only_cpus} CPUs, 2 nodes)"] = ray_reader_epochs(setup)
            rates = time_paths(paths, rounds, epochs_per_round)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rates, waits


def format_tables(rates: dict[str, float], waits: dict[str, dict[str, float]]) -> str:
    loader, ray_alone, ray_both = list(rates)
    lines = [f"{'input path':<48}{'samples/s':>12}"]
    lines += [f"{name:<48}{sps:>12.1f}" for name, sps in rates.items()]
    lines.append(
        f"Ray Data / DataLoader: {rates[ray_both] / rates[loader]:.2f}x (target > 1.30); "
        f"the CPU-only node's gain to Ray Data: {rates[ray_both] / rates[ray_alone]:.2f}x"
    )
    if not waits:
        return "\n".join(lines)
    lines.append(
        f"\n{'training run (1 worker, trainer node)':<48}{'steps':>6}{'data wait':>11}{'median step':>13}\n"
        f"{'(data wait / step time: whole run; median over steps)':<48}"
    )
    for name, wait in waits.items():
        lines.append(
            f"{name:<48}{wait['steps']:>6.0f}{wait['data_wait_fraction']:>11.1%}"
            f"{wait['data_wait_fraction_median_step']:>13.1%}"
        )
    return "\n".join(lines)
