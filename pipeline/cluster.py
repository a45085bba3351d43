"""How a job reaches Ray: the cluster named by RAY_ADDRESS (as under ``ray job submit``), else a fresh local
one that belongs to this job alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(min_cpus: int = 1, env_vars: dict[str, str] | None = None) -> None:
    """Connects to RAY_ADDRESS, or starts a local Ray with at least ``min_cpus`` logical CPUs.

    A local cluster is always new (``address="local"``), never another job's that happens to run on the
    machine. Ray Train's placement-group cleaner asks "the" local cluster whether a run's controller lives;
    with other Ray instances on the machine it may ask the wrong one and kill this run's workers, so its
    processes inherit RAY_API_SERVER_ADDRESS naming this cluster's own API server.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    dashboard_port = _free_port()
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{dashboard_port}")
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, min_cpus),
        dashboard_port=dashboard_port,
        # workers import this checkout; ``env_vars`` reach every process of the job (Ray Train's too)
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **(env_vars or {})}},
    )
