"""What every drill needs around the run it injects a fault into: a workspace of demo shards and one MLflow
store, the run in the background, bounded waits, and the processes of a Ray Train run to hit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.config import KINDS, Config, load_config
from pipeline.drills.nodes import descendants
from pipeline.shards import format as shard_format
from pipeline.train.launch import run_pretraining

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "jobs/configs/tiny-test.yaml"
EXPERIMENT = "fault-drills"
# Restart timeouts of Ray Train that the drills, and a cluster that would rather restart sooner, set lower
# in the job's env: how long it waits for a hung rank's process group to shut down before it kills the rank
# (30 s by default), and how long a new worker group may take to start (60 s by default). The second is
# what an elastic run pays after a node is lost: Ray Train sees the dead worker at once but counts the
# node's resources for up to 20 s more (its resource view is refreshed every 20 s), so it first tries the
# old size and waits this long before starting with what is left.
FAST_RESTART_ENV = {
    "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
}


@dataclass
class Workspace:
    """Where the drills run: prepared demo shards (``<kind>/{train,val}``), scratch, one MLflow store."""

    root: Path
    demo: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])  # run names never meet an earlier drill's

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def overrides(self, run_name: str, data_root: str | None = None) -> list[str]:
        data = data_root or str(self.demo)
        splits = {s: {k: storage.join(data, k, s) for k in KINDS} for s in ("train", "val")}
        return [
            f"data.train={json.dumps(splits['train'])}",
            f"data.val={json.dumps(splits['val'])}",
            f"train.storage_path={self.root / 'runs'}",
            f"train.run_name={run_name}-{self.tag}",
            f"mlflow.tracking_uri={self.tracking_uri}",
            f"mlflow.experiment={EXPERIMENT}",
            "train.val_every=0",
            "train.export_model=false",
            "train.log_every=1",
            "train.checkpoint_every=4",
        ]

    def config(self, run_name: str, *extra: str, data_root: str | None = None) -> Config:
        return load_config(TINY_CONFIG, [*self.overrides(run_name, data_root), *extra])

    def demo_copy(self, name: str) -> Path:
        """A private copy of the demo shards that a scenario may damage."""
        root = self.root / "data" / name
        for kind in KINDS:
            for split in ("train", "val"):
                shutil.copytree(self.demo / kind / split, root / kind / split, dirs_exist_ok=True)
        return root


def prepare_workspace(root: Path) -> Workspace:
    """Demo shards for seconds-long runs, 8 rows a shard so that a skipped shard leaves others of its kind."""
    from pipeline.shards.demo import prepare_demo

    demo = root / "demo"
    manifests = [demo / k / s / shard_format.MANIFEST_NAME for k in KINDS for s in ("train", "val")]
    if not all(m.is_file() for m in manifests):
        sizes = ["demo.pairs=48", "demo.images=48", "demo.texts=48", "demo.val_fraction=0.25"]
        overrides = [f"demo.root={demo}", *sizes, "prepare.shard_rows=8", "prepare.row_group_rows=8"]
        prepare_demo(load_config(ROOT / "jobs/configs/demo.yaml", overrides))
    return Workspace(root, demo)


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


class Background:
    """``run_pretraining`` in a thread, so that the fault can be injected while it trains."""

    def __init__(self, config: Config):
        self.result = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self._thread.start()

    def _run(self, config: Config) -> None:
        try:
            self.result = run_pretraining(config)
        except BaseException as e:  # handed to the scenario, which judges it
            self.error = e

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout_s: float):
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the run did not end within {timeout_s:.0f} s")
        return self.result

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        """A run still going when the scenario ends (a wait that timed out) is killed, so that it cannot
        hold the cluster, its workers and its storage for the next drill."""
        if self._thread.is_alive():
            kill_train_controllers()
            self._thread.join(60)


def kill_train_controllers() -> None:
    """SIGKILL of every live Ray Train controller of this process's clusters; their workers die with them."""
    for pid in ray_process_pids("TrainController"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def ray_process_pids(name: str) -> list[int]:
    """PIDs of the live Ray actor processes of class ``name`` (titled ``ray::<name>``) of the clusters this
    process started (every node and head of the drills is a descendant of it): never those of another
    cluster on a shared machine."""
    ours = set(descendants(os.getpid()))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) not in ours:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline.startswith(f"ray::{name}".encode()) and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return sorted(pids)


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of this process's clusters."""
    return ray_process_pids("RayTrainWorker")


def release(pid: int) -> None:
    """A stopped process continued and killed (never left behind)."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
