"""Nodes that go and come: a node of an elastic run preempted (its raylet and every process on it killed)
and back later, and a node that joins a run that started small. The run must keep training on what is
left, grow again when capacity returns (Ray Train V2 elastic mode, ``train.min_workers``), reshard model,
optimizer and data to each new world size, and lose no sample.

The drills' Train workers run only on nodes they add themselves (one CPU each, offering one unit of the
drill's own custom resource, which ``train.worker_resources`` asks for), so that killing one node kills
exactly one worker and the rest of the cluster (the head, Ray Data tasks) stays up.
"""

from __future__ import annotations

import json
import time

from pipeline.config import Config
from pipeline.drills import observe
from pipeline.drills.harness import Background, Workspace, wait_for
from pipeline.drills.judge import DrillResult, RunRecord, judge_recovery
from pipeline.drills.nodes import LocalCluster
from pipeline.train.launch import failure_summary

CHECKPOINT_EVERY = 4


def elastic_config(ws: Workspace, name: str, pool: str, steps: int) -> Config:
    return ws.config(
        name,
        f"train.steps={steps}",
        "train.num_workers=2",
        "train.min_workers=1",
        "train.max_failures=4",
        "train.elastic_resize_monitor_interval_s=2",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        f"train.worker_resources={json.dumps({pool: 1})}",
    )


def world_sizes(run: RunRecord) -> list[int]:
    """The world size of every (re)started worker group, in order."""
    return [e["world_size"] for e in run.of("train_start")]


def judge_resizes(result: DrillResult, run: RunRecord, expected_sizes: list[int]) -> DrillResult:
    """The run must have trained at exactly ``expected_sizes`` in that order, logged each step's world size,
    and redone at most ``checkpoint_every`` steps per restart."""
    sizes = world_sizes(run)
    restarts = max(0, len(sizes) - 1)
    per_step = sorted({int(v) for v in run.final.get("world_sizes_logged", [])})
    result.passed = (
        result.passed
        and sizes == expected_sizes
        and per_step == sorted(set(expected_sizes))
        and (result.steps_redone or 0) <= CHECKPOINT_EVERY * restarts
    )
    result.observed += f"; world sizes {sizes} (per step: {per_step})"
    result.details.update(world_sizes=sizes, world_sizes_per_step=per_step)
    return result


def _record(config: Config, metrics: dict) -> RunRecord:
    record = observe.record(config, dict(metrics))
    record.final["world_sizes_logged"] = [m.value for m in observe.metric_history(config, "sys/world_size")]
    return record


def _trained_at(config: Config, world: int, after_step: int) -> bool:
    """A worker group of ``world`` started and logged a step past ``after_step``."""
    started = any(
        e["event"] == "train_start" and e["world_size"] == world for e in observe.run_events(config)
    )
    return started and observe.last_logged_step(config) > after_step


def node_lost(ws: Workspace, cluster: LocalCluster, steps: int = 100) -> DrillResult:
    """Two Train nodes; one is preempted mid-run: training goes on with one worker without waiting for it,
    and when a node comes back the run grows to two again and finishes."""
    pool = f"drill-lost-{ws.tag}"
    nodes = [cluster.add_node(cpus=1, resources={pool: 1}) for _ in range(2)]
    config = elastic_config(ws, "node-lost", pool, steps)
    try:
        with Background(config) as run:
            wait_for(
                lambda: (
                    run.done
                    or (observe.checkpoint_step(config) >= 4 and observe.last_logged_step(config) >= 6)
                ),
                300,
                "node-lost: checkpoint 4 and two more steps",
            )
            if run.done:
                raise RuntimeError(
                    f"node-lost: the run ended before the fault ({failure_summary(run.error)})"
                )
            fault_step, fault_at = observe.last_logged_step(config), time.time()
            dead_after_s = cluster.kill(nodes.pop())
            wait_for(lambda: run.done or _trained_at(config, 1, fault_step), 300, "node-lost: training at 1")
            back_step, back_at = observe.last_logged_step(config), time.time()
            nodes.append(cluster.add_node(cpus=1, resources={pool: 1}))
            result = run.join(300)
        if run.error is not None:
            raise RuntimeError(f"node-lost: the run failed: {failure_summary(run.error)}") from run.error
        record = _record(config, result.metrics)
        out = judge_recovery(
            "a Train node preempted (raylet + workers SIGKILLed), back later",
            "trains on at 1 worker without waiting, grows back to 2 when the node returns, reaches the "
            "target step with no sample lost",
            config,
            record,
            fault_at,
            steps,
        )
        out = judge_resizes(out, record, [2, 1, 2])
        out.details.update(
            fault_step=fault_step, back_step=back_step, node_dead_after_s=round(dead_after_s, 1)
        )
        out.details["regrow_s"] = next(
            (round(e["time"] - back_at, 1) for e in record.of("train_start") if e["time"] > back_at), None
        )
        return out
    finally:
        for node in nodes:
            cluster.kill(node)


def node_joined(ws: Workspace, cluster: LocalCluster, steps: int = 80) -> DrillResult:
    """A run that starts with one Train node (all there is) and gets a second mid-run: it resizes up at the
    next check and finishes at full size."""
    pool = f"drill-joined-{ws.tag}"
    nodes = [cluster.add_node(cpus=1, resources={pool: 1})]
    config = elastic_config(ws, "node-joined", pool, steps)
    try:
        with Background(config) as run:
            wait_for(
                lambda: (
                    run.done
                    or (observe.checkpoint_step(config) >= 4 and observe.last_logged_step(config) >= 6)
                ),
                300,
                "node-joined: checkpoint 4 and two more steps",
            )
            if run.done:
                raise RuntimeError(f"node-joined: the run ended early ({failure_summary(run.error)})")
            join_step, join_at = observe.last_logged_step(config), time.time()
            nodes.append(cluster.add_node(cpus=1, resources={pool: 1}))
            result = run.join(300)
        if run.error is not None:
            raise RuntimeError(f"node-joined: the run failed: {failure_summary(run.error)}") from run.error
        record = _record(config, result.metrics)
        out = judge_recovery(
            "a Train node joins a run of 1 worker",
            "resizes up to 2 workers at the next check and finishes at full size, no sample lost",
            config,
            record,
            join_at,
            steps,
        )
        out = judge_resizes(out, record, [1, 2])
        grown = [e["time"] for e in record.of("train_start") if e["world_size"] == 2]
        out.recover_s = round(grown[0] - join_at, 1) if grown else None  # the join to training at 2
        out.details.update(join_step=join_step)
        return out
    finally:
        for node in nodes:
            cluster.kill(node)
