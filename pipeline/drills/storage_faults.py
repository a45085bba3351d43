"""S3 that goes away: for a while (calls are retried, the run goes on) or for good (the run ends with an
error naming the storage, in bounded time)."""

from __future__ import annotations

import re
import time

from pipeline.drills import observe
from pipeline.drills.flaky_s3 import FlakyS3, s3_config
from pipeline.drills.harness import Background, Workspace, wait_for
from pipeline.drills.judge import DrillResult, judge_recovery
from pipeline.train.launch import failure_summary


def s3_outage(ws: Workspace, s3: FlakyS3, outage_s: float = 6.0) -> DrillResult:
    """The S3 endpoint (data and checkpoints) goes away for ``outage_s`` mid-run and comes back: calls are
    retried with backoff, the run goes on without a restart and finishes. The run must have met the
    outage: S3 connections were tried (and failed) while it lasted."""
    config = s3_config(ws, s3, "s3-outage", "train.steps=12", "train.max_failures=0")
    with Background(config) as run:
        wait_for(
            lambda: run.done or observe.checkpoint_step(config) >= 4,
            300,
            "s3-outage: the first checkpoint on S3",
        )
        fault_at, fault_step = time.time(), observe.last_logged_step(config)
        rejected = s3.rejected
        s3.stop()
        time.sleep(outage_s)
        s3.start()
        rejected = s3.rejected - rejected
        run.join(300)
    if run.error is not None:
        return DrillResult(
            f"S3 away for {outage_s:.0f} s",
            "retried with backoff; the run goes on and finishes",
            f"the run failed: {failure_summary(run.error)}",
            passed=False,
        )
    out = judge_recovery(
        f"S3 away for {outage_s:.0f} s (data + checkpoints)",
        "calls retried with backoff; the run goes on without a restart and finishes",
        config,
        observe.record(config, run.result.metrics),
        fault_at,
        config.train.steps,
    )
    out.passed = out.passed and out.steps_redone == 0 and out.details["worker_groups"] == 1 and rejected > 0
    out.observed += (
        f"; {rejected} S3 connections failed during the outage; no restart (steps redone "
        f"{out.steps_redone}), training resumed {out.recover_s} s after"
    )
    out.details.update(fault_step=fault_step, s3_connections_failed=rejected)
    return out


def s3_gone(
    ws: Workspace,
    s3: FlakyS3,
    attempts: int = 4,
    stall_timeout_s: float = 20,
    bound_s: float = 180,
    checkpoints_on_s3: bool = True,
) -> DrillResult:
    """The S3 endpoint goes away for good mid-run: the run ends with an error naming the storage, within
    a time bounded by ``storage.s3_max_attempts`` (checkpoint and metadata calls), ``data.stall_timeout_s``
    (a data read that Ray Data keeps retrying) and ``train.max_failures`` (restarts that fail again).
    With ``checkpoints_on_s3`` False only the data is there: nothing but the stall timeout can end it."""
    name = "s3-gone" if checkpoints_on_s3 else "s3-gone-data"
    local = () if checkpoints_on_s3 else (f"train.storage_path={ws.root / 'runs'}",)
    config = s3_config(
        ws,
        s3,
        name,
        *local,
        "train.steps=400",
        "train.max_failures=1",
        f"storage.s3_max_attempts={attempts}",
        f"data.stall_timeout_s={stall_timeout_s:g}",
    )
    with Background(config) as run:
        wait_for(
            lambda: run.done or observe.checkpoint_step(config) >= 4, 300, f"{name}: the first checkpoint"
        )
        fault_at = time.time()
        s3.stop()
        try:
            run.join(bound_s + 120)
        finally:
            s3.start()
    took = round(time.time() - fault_at, 1)
    message = failure_summary(run.error) if run.error is not None else "the run finished"
    names_storage = bool(re.search(r"S3|AWS|s3://|NETWORK_CONNECTION", message))
    where = "data + checkpoints" if checkpoints_on_s3 else "data only, checkpoints local"
    return DrillResult(
        f"S3 away for good, {where} (storage.s3_max_attempts={attempts}, "
        f"data.stall_timeout_s={stall_timeout_s:g})",
        f"the run ends with an error naming the storage within {bound_s:.0f} s",
        f"ended after {took} s: {message[:200]}",
        passed=run.error is not None and names_storage and took <= bound_s,
        recover_s=took,
        details={"message": message},
    )


def s3_gone_data(ws: Workspace, s3: FlakyS3) -> DrillResult:
    return s3_gone(ws, s3, checkpoints_on_s3=False)
