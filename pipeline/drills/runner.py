"""All drills in table order: ``jobs/fault_drill.py`` and tests/faults run them through here."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.drills.data_faults import altered_shard, cut_checkpoint, skipped_input
from pipeline.drills.flaky_s3 import FlakyS3
from pipeline.drills.harness import Workspace
from pipeline.drills.job_faults import job_stop, secret_env, secrets_kept
from pipeline.drills.judge import DrillResult
from pipeline.drills.node_faults import node_lost_and_joined
from pipeline.drills.nodes import LocalCluster
from pipeline.drills.process_faults import kill_worker, stuck_worker
from pipeline.drills.storage_faults import s3_gone, s3_gone_data, s3_outage
from pipeline.train.launch import failure_summary

LOCAL = {f.__name__: f for f in (kill_worker, stuck_worker, cut_checkpoint, altered_shard, skipped_input)}
ON_S3 = {f.__name__: f for f in (s3_outage, s3_gone, s3_gone_data)}
NODES = ("node_lost", "node_joined")  # one run: a node lost, then one joining (node_lost_and_joined)
SCENARIOS = (*LOCAL, *NODES, *ON_S3, "job_stop", "secrets_kept")


def guarded(name: str, drill: Callable[[], DrillResult]) -> DrillResult:
    """A drill that breaks is a failed row of the table, not the end of the table."""
    started = time.time()
    try:
        result = drill()
    except Exception as e:
        result = DrillResult(name, "(the drill itself)", f"drill error: {failure_summary(e)}", passed=False)
    result.details["wall_s"] = round(time.time() - started, 1)
    print(f"[drill] {name}: {'ok' if result.passed else 'FAILED'} ({result.details['wall_s']} s)", flush=True)
    return result


def run_drills(
    ws: Workspace, cluster: LocalCluster, names: list[str] | tuple[str, ...] = SCENARIOS
) -> list[DrillResult]:
    """Runs the named scenarios in table order on ``cluster`` (the node drills add and kill nodes of it),
    plus their own moto S3 and, for the job-submission ones, their own token-auth head."""
    from pipeline.drills.head import RayHead

    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    results = []
    for name, drill in LOCAL.items():
        if name in names:
            results.append(guarded(name, lambda drill=drill: drill(ws)))
    if set(NODES) & set(names):
        started = time.time()
        try:
            rows = dict(zip(NODES, node_lost_and_joined(ws, cluster), strict=True))
        except Exception as e:
            failed = DrillResult(
                "node drills", "(the drill itself)", f"drill error: {failure_summary(e)}", False
            )
            rows = dict.fromkeys(NODES, failed)
        for name in NODES:
            if name in names:
                rows[name].details["wall_s"] = round(time.time() - started, 1)
                print(f"[drill] {name}: {'ok' if rows[name].passed else 'FAILED'}", flush=True)
                results.append(rows[name])
    s3 = FlakyS3() if {*ON_S3, "job_stop", "secrets_kept"} & set(names) else None
    for name, drill in ON_S3.items():
        if name in names:
            results.append(guarded(name, lambda drill=drill: drill(ws, s3)))
    if {"job_stop", "secrets_kept"} & set(names):
        with RayHead(ws.root / f"ray-home-{ws.tag}", extra_env=secret_env()) as head:
            jobs: list[str] = []
            if "job_stop" in names:
                result = guarded("job_stop", lambda: job_stop(ws, head, s3))
                jobs = result.details.get("jobs", [])
                results.append(result)
            if "secrets_kept" in names:
                results.append(guarded("secrets_kept", lambda: secrets_kept(ws, head, s3, jobs)))
    return results
