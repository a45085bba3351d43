"""Nodes that go and come: a node of an elastic run preempted (its raylet and every process on it killed),
and a node that joins the run later. The run must keep training on what is
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


def node_lost_and_joined(ws: Workspace, cluster: LocalCluster, steps: int = 100) -> list[DrillResult]:
    """Two Train nodes; one is preempted mid-run (raylet and workers SIGKILLed): training must go on with one
    worker without waiting for it. A node then joins (the preempted one replaced, as KubeRay does): the run
    must grow to two workers at its next check and finish at full size. One run, two rows: ``node_lost``
    (2 -> 1) and ``node_joined`` (1 -> 2); together the 2 -> 1 -> 2 run, judged against an unfaulted one."""
    pool = f"drill-nodes-{ws.tag}"
    nodes = [cluster.add_node(cpus=1, resources={pool: 1}) for _ in range(2)]
    config = elastic_config(ws, "nodes", pool, steps)
    try:
        with Background(config) as run:
            wait_for(
                lambda: (
                    run.done
                    or (observe.checkpoint_step(config) >= 4 and observe.last_logged_step(config) >= 6)
                ),
                300,
                "node drills: checkpoint 4 and two more steps",
            )
            if run.done:
                raise RuntimeError(
                    f"node drills: the run ended before the fault ({failure_summary(run.error)})"
                )
            lost_step, lost_at = observe.last_logged_step(config), time.time()
            dead_after_s = cluster.kill(nodes.pop())
            wait_for(lambda: run.done or _trained_at(config, 1, lost_step), 300, "node drills: training at 1")
            joined_step, joined_at = observe.last_logged_step(config), time.time()
            nodes.append(cluster.add_node(cpus=1, resources={pool: 1}))
            result = run.join(300)
        if run.error is not None:
            raise RuntimeError(f"node drills: the run failed: {failure_summary(run.error)}") from run.error
        record = _record(config, result.metrics)
        starts = record.of("train_start")
        lost = judge_recovery(
            "a Train node preempted (raylet + workers SIGKILLed)",
            "trains on at 1 worker without waiting for the node, no sample lost",
            config,
            record,
            lost_at,
            steps,
        )
        lost = judge_resizes(lost, record, [2, 1, 2])
        lost.details.update(lost_step=lost_step, node_dead_after_s=round(dead_after_s, 1))
        joined = judge_recovery(
            "a Train node joins the run of 1 worker",
            "resizes up to 2 workers at the next check and finishes at full size, no sample lost",
            config,
            record,
            joined_at,
            steps,
        )
        joined = judge_resizes(joined, record, [2, 1, 2])
        regrown = [e for e in starts if e["time"] > joined_at and e["world_size"] == 2]
        joined.recover_s = round(regrown[0]["time"] - joined_at, 1) if regrown else None  # join -> at 2
        joined.details.update(
            joined_step=joined_step, resumed_at_step=regrown[0]["step"] if regrown else None
        )
        return [lost, joined]
    finally:
        for node in nodes:
            cluster.kill(node)
