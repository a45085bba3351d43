"""Faults of a Train worker process: killed (SIGKILL, as OOM or preemption) or stuck (SIGSTOP, as a hung
collective). Ray Train restarts the worker group, which resumes from the newest complete checkpoint."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from pipeline.config import Config
from pipeline.drills import observe
from pipeline.drills.harness import Background, Workspace, release, train_worker_pids, wait_for
from pipeline.drills.judge import DrillResult, judge_recovery, judge_restart
from pipeline.train.launch import failure_summary


def train_through_fault(
    ws: Workspace,
    name: str,
    inject: Callable[[], None],
    *extra: str,
    steps: int = 12,
    after_checkpoint: int = 4,
    timeout_s: float = 300,
) -> tuple[Config, object, float, int]:
    """Starts a run, injects the fault once the ``after_checkpoint`` checkpoint is complete and two
    more steps were trained, waits for the run to end. Returns (config, result, fault time, step then)."""
    config = ws.config(name, f"train.steps={steps}", *extra)
    with Background(config) as run:
        wait_for(
            lambda: (
                run.done
                or (
                    observe.checkpoint_step(config) >= after_checkpoint
                    and observe.last_logged_step(config) >= after_checkpoint + 2
                )
            ),
            timeout_s,
            f"{name}: checkpoint {after_checkpoint} and two more steps",
        )
        if run.done:
            raise RuntimeError(f"{name}: the run ended before the fault ({failure_summary(run.error)})")
        fault_step, fault_at = observe.last_logged_step(config), time.time()
        inject()
        result = run.join(timeout_s)
    if run.error is not None:
        raise RuntimeError(
            f"{name}: the run failed after the fault: {failure_summary(run.error)}"
        ) from run.error
    return config, result, fault_at, fault_step


def kill_worker(ws: Workspace) -> DrillResult:
    """SIGKILL of one Train worker mid-run: Ray Train restarts the group, which resumes and finishes."""
    victims: list[int] = []

    def inject():
        victims.append(train_worker_pids()[-1])
        os.kill(victims[0], signal.SIGKILL)

    config, result, fault_at, fault_step = train_through_fault(
        ws, "kill-worker", inject, "train.max_failures=2"
    )
    out = judge_restart(
        judge_recovery(
            "1 worker SIGKILLed",
            "worker group restarted, resumes from the last complete checkpoint, reaches the target step",
            config,
            observe.record(config, result.metrics),
            fault_at,
            config.train.steps,
        ),
        after_step=4,
    )
    out.details.update(victim_pid=victims[0], fault_step=fault_step)
    return out


def stuck_worker(ws: Workspace, timeout_s: int = 10) -> DrillResult:
    """SIGSTOP of one Train worker: its peer's next collective times out after ``collective_timeout_s``,
    Ray Train replaces the group (killing the stopped process) and the run resumes and finishes."""
    victims: list[int] = []

    def inject():
        victims.append(train_worker_pids()[-1])
        os.kill(victims[0], signal.SIGSTOP)

    try:
        config, result, fault_at, fault_step = train_through_fault(
            ws, "stuck-worker", inject, "train.max_failures=2", f"train.collective_timeout_s={timeout_s}"
        )
    finally:
        for pid in victims:  # normally Ray already killed it; never leave a stopped process behind
            release(pid)
    out = judge_restart(
        judge_recovery(
            f"1 worker stuck (SIGSTOP), collective timeout {timeout_s} s",
            f"peer's collective times out after {timeout_s} s, group restarted, resumes, reaches the target "
            "step",
            config,
            observe.record(config, result.metrics),
            fault_at,
            config.train.steps,
        ),
        after_step=4,
    )
    # the timeout plus a restart, not an endless hang
    bound = timeout_s + 120
    if out.recover_s is None or out.recover_s > bound:
        out.passed = False
    out.observed += f"; recovered in {out.recover_s} s (bound {bound} s)"
    out.details.update(victim_pid=victims[0], fault_step=fault_step, bound_s=bound)
    return out
