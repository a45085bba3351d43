"""A Ray cluster of several nodes on one machine: how multi-node behaviour is tested here.

The head is started by ``ray.init`` in this process (as the test session's and the drills' cluster always
was); every further node is its own ``ray start --address=... --block`` process group with its own
raylet, node id and object store, as a machine of a KubeRay worker group is. ``kill`` SIGKILLs the whole
process group, raylet and every worker process it started, as a preempted machine disappears.

Ray's GCS notices a node that stopped answering only through health checks; with Ray's defaults (a check
every 3 s, 5 misses) that takes tens of seconds. ``HEALTH_CHECKS`` (a check every 1 s, 3 misses, 1 s
timeout) makes a lost node dead to Ray within a few seconds: the node drills measure recovery, not Ray's
patience. Real clusters keep the defaults, which avoid declaring a node dead during a long GC pause.

Ray Train's elastic policy sizes a worker group from the reservations of Ray's AutoscalingCoordinator, whose
view of the nodes is refreshed only every 20 s. A run started right after ``add_node`` could see one node of
two and start smaller than the cluster is; so ``add_node`` and ``kill`` return only once the coordinator has
recomputed its view (``refresh_autoscaling_view``), as a real cluster's nodes are long known to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
NODE_LABEL = "flava.io/node"  # every added node carries its own name under this label
HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 1000,
}


@dataclass
class Node:
    name: str
    cpus: int
    resources: dict[str, float]
    process: subprocess.Popen = field(repr=False)

    @property
    def node_id(self) -> str | None:
        """Ray's id of this node while it is alive in the cluster, else None."""
        import ray

        for node in ray.nodes():
            if node["Alive"] and node.get("Labels", {}).get(NODE_LABEL) == self.name:
                return node["NodeID"]
        return None


def refresh_autoscaling_view() -> None:
    """Makes Ray's AutoscalingCoordinator recompute its view of the nodes now (it ticks every 20 s)."""
    import ray
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("flava-drills-view", recompute=True), timeout=60)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, then theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalCluster:
    """``with LocalCluster() as cluster: cluster.add_node(cpus=1, resources={...})``.

    The test bed the test session, ``jobs/fault_drill.py`` and the benchmarks share: a head of
    ``head_cpus`` and one node per entry of ``node_cpus`` (4 logical CPUs in all by default, on two
    nodes; ``head_resources``: custom Ray resources the head offers). Connects this process (``ray.init``)
    as the head; ``env_vars`` reach every Ray process of the
    job (``runtime_env``), and the added nodes inherit this process's environment (credentials)."""

    def __init__(
        self,
        head_cpus: int = 2,
        node_cpus: tuple[int, ...] = (2,),
        env_vars: dict[str, str] | None = None,
        log_dir: Path | None = None,
        head_resources: dict[str, float] | None = None,
    ):
        self.head_cpus, self.node_cpus = head_cpus, node_cpus
        self.head_resources = dict(head_resources or {})
        self.env_vars = dict(env_vars or {})
        self.log_dir = log_dir
        self.nodes: list[Node] = []
        self.gcs_address = ""

    def __enter__(self) -> LocalCluster:
        import ray

        from pipeline.cluster import ROOT

        ray.init(
            address="local",  # always a new cluster, never one a `ray start` on this machine left behind
            num_cpus=self.head_cpus,
            resources=self.head_resources,
            include_dashboard=False,
            _system_config=HEALTH_CHECKS,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **self.env_vars}},
        )
        self.gcs_address = ray.get_runtime_context().gcs_address
        for cpus in self.node_cpus:
            self.add_node(cpus=cpus)
        return self

    def add_node(self, cpus: int = 1, resources: dict[str, float] | None = None, wait_s: float = 60) -> Node:
        """Starts a node (``resources``: custom Ray resources it offers) and waits until Ray counts it
        alive."""
        name = f"node-{uuid.uuid4().hex[:6]}"
        resources = dict(resources or {})
        log = open(self.log_dir / f"{name}.log", "w") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(
            [
                str(RAY),
                "start",
                f"--address={self.gcs_address}",
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                f"--labels={NODE_LABEL}={name}",
                f"--resources={json.dumps(resources)}",
                f"--object-store-memory={150 * 2**20}",
                "--min-worker-port=0",
                "--max-worker-port=0",
                "--disable-usage-stats",
                "--block",
            ],
            env={**os.environ, "PATH": f"{RAY.parent}{os.pathsep}{os.environ['PATH']}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        node = Node(name, cpus, resources, process)
        self.nodes.append(node)
        deadline = time.monotonic() + wait_s
        while node.node_id is None:
            if process.poll() is not None:
                raise RuntimeError(f"ray start of {name} exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not join the cluster within {wait_s:.0f} s")
            time.sleep(0.5)
        refresh_autoscaling_view()
        return node

    def kill(self, node: Node, wait_s: float = 60) -> float:
        """SIGKILL, all at once, of the node's ``ray start`` process, its raylet and every process they
        started (workers included); returns the seconds until Ray counted the node dead (health checks:
        ``HEALTH_CHECKS``)."""
        import ray

        started = time.monotonic()
        node_id = node.node_id
        for pid in [node.process.pid, *descendants(node.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait()
        self.nodes.remove(node)
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            if time.monotonic() - started > wait_s:
                raise TimeoutError(f"Ray still counts {node.name} alive {wait_s:.0f} s after it was killed")
            time.sleep(0.2)
        dead_after_s = time.monotonic() - started
        refresh_autoscaling_view()
        return dead_after_s

    def __exit__(self, *exc) -> None:
        import ray

        for node in list(self.nodes):
            self.kill(node)
        ray.shutdown()
