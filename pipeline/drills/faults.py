"""Fault drills: one real fault injected, from outside, into a real pretraining run, judged by its outcome.

Each scenario runs the real job (``run_pretraining`` on the connected Ray cluster, or ``ray job submit``
to a token-auth head), injects the fault the way it happens in production (SIGKILL or SIGSTOP of a Ray
Train worker process, a checkpoint cut off mid-write, shard bytes changed after the manifest, the S3
endpoint going away, ``ray job stop``) and returns a ``DrillResult``: what had to happen, what did, the
steps redone, the samples lost (from the rank-identical kind sequence: what an unfaulted run consumes)
and the time to recover. ``jobs/fault_drill.py`` prints them as a table; tests/faults asserts them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import KINDS, Config, StorageConfig, load_config
from pipeline.data.mixing import KindSampler, validate_ratios
from pipeline.shards import format as shard_format
from pipeline.train import checkpoint as ckpt
from pipeline.train.launch import InputError, failure_summary, run_dir, run_pretraining
from pipeline.train.tracking import RUN_KEY_TAG

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "jobs/configs/tiny-test.yaml"
EXPERIMENT = "fault-drills"
STEP_METRIC = "train/lr"  # logged by rank 0 at every step: the run's step axis


@dataclass
class DrillResult:
    scenario: str
    expected: str
    observed: str
    passed: bool
    steps_redone: int | None = None
    samples_lost: int | None = None  # consumed by an unfaulted run but not by this one (must be 0)
    recover_s: float | None = None
    details: dict = field(default_factory=dict)


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


# --- observing a run ----------------------------------------------------------------------------------


def expected_samples(config: Config, steps: int) -> dict[str, int]:
    """Samples per kind that ``steps`` unfaulted steps consume: the kind sequence is a pure function of
    the ratios and ``data.seed`` (``KindSampler``, identical on every rank and across restarts)."""
    ratios = validate_ratios(config.data.ratios, [k for k, v in config.data.train.items() if v])
    sampler = KindSampler(ratios, config.data.seed)
    counts = Counter(next(sampler) for _ in range(steps))
    per_step = config.data.batch_size * config.train.grad_accum * config.train.num_workers
    return {kind: counts[kind] * per_step for kind in KINDS}


def sample_accounting(config: Config, metrics: dict, steps: int) -> tuple[int, int]:
    """(samples lost, samples counted twice) of a finished run against the unfaulted sequence."""
    expected = expected_samples(config, steps)
    observed = {kind: int(metrics.get(f"samples/{kind}", 0)) for kind in KINDS}
    lost = sum(max(0, expected[k] - observed[k]) for k in KINDS)
    doubled = sum(max(0, observed[k] - expected[k]) for k in KINDS)
    return lost, doubled


def mlflow_runs(config: Config) -> list:
    """The MLflow runs of this run name (a resumed run must have continued the one run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(config.mlflow.experiment)
    if exp is None:
        return []
    key = run_dir(_resolved(config)).replace("'", "\\'")
    return client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")


def step_log(config: Config) -> list[tuple[int, float]]:
    """(step, wall time) of every step the run logged, in logging order; redone steps appear twice."""
    from mlflow.tracking import MlflowClient

    runs = mlflow_runs(config)
    if not runs:
        return []
    history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(runs[0].info.run_id, STEP_METRIC)
    return [(m.step, m.timestamp / 1000) for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def last_logged_step(config: Config) -> int:
    log = step_log(config)
    return max((s for s, _ in log), default=0)


def redone_steps(log: list[tuple[int, float]]) -> int:
    return sum(n - 1 for n in Counter(s for s, _ in log).values())


def recovery_time(log: list[tuple[int, float]], fault_at: float) -> float | None:
    """Seconds from the fault to the first step logged after it (training going again)."""
    after = [t for _, t in log if t > fault_at]
    return round(min(after) - fault_at, 1) if after else None


def latest_checkpoint(config: Config) -> ckpt.Found | None:
    fs, path = storage.resolve(run_dir(_resolved(config)), config.storage)
    return ckpt.find_latest(fs, path)


def checkpoint_step(config: Config) -> int:
    """Step of the run's newest complete checkpoint (0 before the first)."""
    found = latest_checkpoint(config)
    return found.step if found else 0


def _resolved(config: Config) -> Config:
    from pipeline.train.launch import resolve_paths

    return resolve_paths(config)


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
    """SIGKILL of every live Ray Train controller of the connected cluster; their workers die with them."""
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
    for actor in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(actor.pid, signal.SIGKILL)


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers on this machine (Ray titles their processes ray::RayTrainWorker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker") and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return sorted(pids)


# --- scenarios ----------------------------------------------------------------------------------------


def _train_through_fault(
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
                    checkpoint_step(config) >= after_checkpoint
                    and last_logged_step(config) >= after_checkpoint + 2
                )
            ),
            timeout_s,
            f"{name}: checkpoint {after_checkpoint} and two more steps",
        )
        if run.done:
            raise RuntimeError(f"{name}: the run ended before the fault ({failure_summary(run.error)})")
        fault_step, fault_at = last_logged_step(config), time.time()
        inject()
        result = run.join(timeout_s)
    if run.error is not None:
        raise RuntimeError(
            f"{name}: the run failed after the fault: {failure_summary(run.error)}"
        ) from run.error
    return config, result, fault_at, fault_step


def _judge_recovery(scenario: str, expected: str, config: Config, metrics: dict, fault_at: float, steps: int):
    """``metrics``: the run's final ones (``step`` and ``samples/<kind>``)."""
    log = step_log(config)
    logged = sorted({s for s, _ in log})
    lost, doubled = sample_accounting(config, metrics, steps)
    runs = mlflow_runs(config)
    passed = (
        metrics.get("step") == steps
        and logged == list(range(1, steps + 1))
        and len(runs) == 1
        and lost == 0
        and doubled == 0
    )
    observed = (
        f"reached step {metrics.get('step')}/{steps}; {len(runs)} MLflow run, steps "
        f"{logged[0] if logged else '-'}..{logged[-1] if logged else '-'} continuous: "
        f"{logged == list(range(1, steps + 1))}; samples double-counted {doubled}"
    )
    return DrillResult(
        scenario,
        expected,
        observed,
        passed,
        steps_redone=redone_steps(log),
        samples_lost=lost,
        recover_s=recovery_time(log, fault_at),
        details={"mlflow_runs": len(runs), "doubled": doubled},
    )


def kill_worker(ws: Workspace) -> DrillResult:
    """SIGKILL of one Train worker mid-run: Ray Train restarts the group, which resumes and finishes."""
    victims: list[int] = []

    def inject():
        victims.append(train_worker_pids()[-1])
        os.kill(victims[0], signal.SIGKILL)

    config, result, fault_at, fault_step = _train_through_fault(
        ws, "kill-worker", inject, "train.max_failures=2"
    )
    out = _judge_recovery(
        "1 worker SIGKILLed",
        "worker group restarted, resumes from the last complete checkpoint, reaches the target step",
        config,
        result.metrics,
        fault_at,
        config.train.steps,
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
        config, result, fault_at, fault_step = _train_through_fault(
            ws, "stuck-worker", inject, "train.max_failures=2", f"train.collective_timeout_s={timeout_s}"
        )
    finally:
        for pid in victims:  # normally Ray already killed it; never leave a stopped process behind
            _release(pid)
    out = _judge_recovery(
        f"1 worker stuck (SIGSTOP), collective timeout {timeout_s} s",
        f"peer's collective times out after {timeout_s} s, group restarted, resumes, reaches the target step",
        config,
        result.metrics,
        fault_at,
        config.train.steps,
    )
    # the timeout plus a restart, not an endless hang
    bound = timeout_s + 120
    if out.recover_s is None or out.recover_s > bound:
        out.passed = False
    out.observed += f"; recovered in {out.recover_s} s (bound {bound} s)"
    out.details.update(victim_pid=victims[0], fault_step=fault_step, bound_s=bound)
    return out


# Ray Train waits this long for a hung rank's process group to shut down before it kills the rank (30 s by
# default); the drills, and a cluster that would rather restart sooner, set it lower in the job's env
FAST_RESTART_ENV = {"TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"}


def _release(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def cut_checkpoint(ws: Workspace) -> DrillResult:
    """The newest checkpoint's write is cut off (a DCP file truncated, as an interrupted upload leaves it):
    a rerun of the run name must resume from the previous complete one, never from the cut one."""
    first = ws.config("cut-checkpoint", "train.steps=8")
    run_pretraining(first)
    fs, path = storage.resolve(run_dir(_resolved(first)), first.storage)
    newest = f"{path}/{ckpt.dir_name(8)}"
    shards = [
        i for i in fs.get_file_info(pafs.FileSelector(newest)) if i.base_name.endswith(".distcp") and i.size
    ]
    victim = max(shards, key=lambda i: i.size)
    with fs.open_input_stream(victim.path) as f:
        head = f.read(victim.size // 2)
    with fs.open_output_stream(victim.path) as f:
        f.write(head)
    found = latest_checkpoint(first)
    resumed_from = found.step if found else 0

    second = ws.config("cut-checkpoint", "train.steps=12")
    fault_at = time.time()
    result = run_pretraining(second)
    out = _judge_recovery(
        "checkpoint write cut off",
        "the cut step-8 checkpoint is skipped; the rerun resumes from step 4 and reaches step 12",
        second,
        result.metrics,
        fault_at,
        12,
    )
    out.passed = out.passed and resumed_from == 4
    out.observed = f"latest complete checkpoint after the cut: step {resumed_from}; " + out.observed
    out.details.update(truncated=victim.path)
    return out


def _demo_copy(ws: Workspace, name: str) -> Path:
    """A private copy of the demo shards that a scenario may damage."""
    root = ws.root / "data" / name
    for kind in KINDS:
        for split in ("train", "val"):
            shutil.copytree(ws.demo / kind / split, root / kind / split, dirs_exist_ok=True)
    return root


def altered_shard(ws: Workspace) -> DrillResult:
    """Bytes of a shard changed after its manifest was written, under ``data.on_corrupt_shard=error``:
    a clear error naming the file before any worker starts."""
    data = _demo_copy(ws, "altered")
    dataset = data / "image_text" / "train"
    entry = shard_format.read_manifest(str(dataset), StorageConfig()).shards[0]
    path = dataset / entry.file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(raw))
    config = ws.config("altered-shard", "train.steps=4", "data.on_corrupt_shard=error", data_root=str(data))
    started = time.time()
    try:
        run_pretraining(config)
    except Exception as e:
        message = failure_summary(e)
        named = str(path) in str(e)
        return DrillResult(
            "shard altered after its manifest (policy: error)",
            "the run stops before training with an error naming the shard",
            f"{message[:160]}... (names the file: {named})",
            passed=named and isinstance(e, InputError) and not step_log(config),
            recover_s=round(time.time() - started, 1),
            details={"file": str(path)},
        )
    return DrillResult(
        "shard altered after its manifest (policy: error)",
        "the run stops before training with an error naming the shard",
        "the run trained on the altered shard",
        passed=False,
    )


def corrupt_rows(dataset: Path, every: int) -> int:
    """Rewrites the dataset's first shard with every ``every``-th image cut short (its manifest updated:
    the shard itself is valid). Returns the number of damaged rows."""
    manifest = shard_format.read_manifest(str(dataset), StorageConfig())
    entry = manifest.shards[0]
    table = pq.read_table(dataset / entry.file)
    images = table.column("image").to_pylist()
    damaged = list(range(0, len(images), every))
    for i in damaged:
        images[i] = images[i][:20]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    new = shard_format.write_shard(str(dataset), entry.file, table, 64, StorageConfig())
    manifest.shards[0] = new
    shard_format.write_manifest(str(dataset), manifest, StorageConfig())
    return len(damaged)


def skipped_input(ws: Workspace) -> DrillResult:
    """A truncated shard under ``data.on_corrupt_shard=skip`` and undecodable images inside a valid shard:
    the run trains on, and both are counted in its step metrics (never a crash, never a silent drop)."""
    data = _demo_copy(ws, "skipped")
    text = data / "text" / "train"
    entry = shard_format.read_manifest(str(text), StorageConfig()).shards[0]
    raw = (text / entry.file).read_bytes()
    (text / entry.file).write_bytes(raw[: len(raw) // 2])
    # the text kind keeps one good shard: the demo's text set has several
    bad_rows = corrupt_rows(data / "image" / "train", every=4)
    config = ws.config("skipped-input", "train.steps=8", "data.on_corrupt_shard=skip", data_root=str(data))
    result = run_pretraining(config)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.mlflow.tracking_uri)
    run = mlflow_runs(config)[0]
    metrics = run.data.metrics
    skipped_shards = metrics.get("skipped_shards/text")
    skipped_rows = metrics.get("skipped_rows/image/undecodable_image")
    history = client.get_metric_history(run.info.run_id, "skipped_rows/image/undecodable_image")
    lost, doubled = sample_accounting(config, result.metrics, 8)
    passed = (
        result.metrics.get("step") == 8
        and skipped_shards == 1
        and skipped_rows is not None
        and skipped_rows >= bad_rows
        and skipped_rows % bad_rows == 0  # once per epoch of the image kind
        and lost == 0
    )
    return DrillResult(
        "truncated shard + corrupt images (policy: skip)",
        f"trains to step 8; 1 shard and {bad_rows} rows per epoch skipped, counted in the step metrics",
        f"step {result.metrics.get('step')}; metrics skipped_shards/text={skipped_shards}, "
        f"skipped_rows/image/undecodable_image={skipped_rows} ({len(history)} logged points)",
        passed,
        samples_lost=lost,
        details={"bad_rows_per_epoch": bad_rows},
    )


# --- S3 that goes away ---------------------------------------------------------------------------------


class FlakyS3:
    """A moto S3 server behind a link that can be cut (``stop``) and restored (``start``): clients see
    their open connections reset and new ones refused, and afterwards the same objects (the server
    itself never stops)."""

    BUCKET = "drills"

    def __init__(self):
        from moto.server import ThreadedMotoServer

        from pipeline.drills.head import free_ports
        from pipeline.drills.netcut import CuttableLink, port_outside_ephemeral_range

        self.port, server_port = port_outside_ephemeral_range(), free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=server_port, verbose=False)
        self._server.start()
        self._link = CuttableLink(self.port, server_port)
        self.start()
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")
        if self.BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=self.BUCKET)

    @property
    def storage(self) -> StorageConfig:
        return StorageConfig(s3_endpoint_url=self.url)

    def start(self) -> None:
        self._link.restore()

    def stop(self) -> None:
        self._link.cut()

    def upload(self, local: Path, key: str) -> str:
        fs = storage.s3_filesystem(self.storage)
        pafs.copy_files(str(local), f"{self.BUCKET}/{key}", destination_filesystem=fs)
        return f"s3://{self.BUCKET}/{key}"


def s3_overrides(ws: Workspace, s3: FlakyS3, name: str) -> list[str]:
    """A drill run whose data and checkpoints live on the flaky S3 (the demo shards uploaded once)."""
    data = f"s3://{FlakyS3.BUCKET}/demo"
    if not storage.exists(storage.join(data, "text", "train", shard_format.MANIFEST_NAME), s3.storage):
        s3.upload(ws.demo, "demo")
    return [
        *ws.overrides(name, data),
        f"storage.s3_endpoint_url={s3.url}",
        f"train.storage_path=s3://{FlakyS3.BUCKET}/runs",
    ]


def _s3_config(ws: Workspace, s3: FlakyS3, name: str, *extra: str) -> Config:
    return load_config(TINY_CONFIG, [*s3_overrides(ws, s3, name), *extra])


def s3_outage(ws: Workspace, s3: FlakyS3, outage_s: float = 6.0) -> DrillResult:
    """The S3 endpoint (data and checkpoints) goes away for ``outage_s`` mid-run and comes back: calls are
    retried with backoff, the run goes on without a restart and finishes."""
    config = _s3_config(ws, s3, "s3-outage", "train.steps=12", "train.max_failures=0")
    with Background(config) as run:
        wait_for(
            lambda: run.done or checkpoint_step(config) >= 4,
            300,
            "s3-outage: the first checkpoint on S3",
        )
        fault_at, fault_step = time.time(), last_logged_step(config)
        s3.stop()
        time.sleep(outage_s)
        s3.start()
        run.join(300)
    if run.error is not None:
        return DrillResult(
            f"S3 away for {outage_s:.0f} s",
            "retried with backoff; the run goes on and finishes",
            f"the run failed: {failure_summary(run.error)}",
            passed=False,
        )
    out = _judge_recovery(
        f"S3 away for {outage_s:.0f} s (data + checkpoints)",
        "calls retried with backoff; the run goes on without a restart and finishes",
        config,
        run.result.metrics,
        fault_at,
        config.train.steps,
    )
    out.passed = out.passed and out.steps_redone == 0
    out.observed += (
        f"; no restart (steps redone {out.steps_redone}), training resumed {out.recover_s} s after"
    )
    out.details.update(fault_step=fault_step)
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
    config = _s3_config(
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
        wait_for(lambda: run.done or checkpoint_step(config) >= 4, 300, f"{name}: the first checkpoint")
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


# --- ray job submit: stop and resubmit; secrets -------------------------------------------------------


def _submit(head, job_id: str, overrides: list[str], wait: bool, env_vars: dict[str, str] | None = None):
    """``ray job submit`` of jobs/pretrain.py with this checkout as the working dir."""
    args = [
        "job",
        "submit",
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        *(("--runtime-env-json", json.dumps({"env_vars": env_vars})) if env_vars else ()),
        *(() if wait else ("--no-wait",)),
    ]
    entry = ["--", "python", "jobs/pretrain.py", "--config", "jobs/configs/tiny-test.yaml", *overrides]
    done = head.ray(*args, *entry, timeout=600)
    if done.returncode and wait:
        raise RuntimeError(f"job {job_id} failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return done


def _job_status(head, job_id: str) -> str:
    """SUCCEEDED, STOPPED, FAILED, or what ``ray job status`` prints for a job still going."""
    out = head.ray("job", "status", job_id)
    text = out.stdout + out.stderr
    for status, said in (("SUCCEEDED", "succeeded"), ("STOPPED", "was stopped"), ("FAILED", "failed")):
        if f"job '{job_id}' {said}" in text.lower():
            return status
    match = re.search(r"Status for job '[^']+': (\w+)", text)
    return match.group(1) if match else "UNKNOWN"


def _final_metrics(config: Config) -> dict:
    """``step`` and ``samples/<kind>`` of the run as MLflow holds them (for a run in another process)."""
    run = mlflow_runs(config)[0]
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("samples/")}
    metrics["step"] = last_logged_step(config)
    return metrics


def job_stop(ws: Workspace, head, s3: FlakyS3) -> DrillResult:
    """``ray job stop`` on a running pretraining job (checkpoints on S3): the last complete checkpoint stays
    intact, and submitting the same run name again resumes from it (one MLflow run, continuous steps),
    finishes, exports the model beside its checkpoints and closes the MLflow run FINISHED. The commit comes
    with the runtime env (the uploaded working dir has no .git) and must reach MLflow's params."""
    name, steps = "job-stop", 32
    overrides = [*s3_overrides(ws, s3, name), f"train.steps={steps}", "train.export_model=true"]
    config = load_config(TINY_CONFIG, overrides)
    commit = {"FLAVA_GIT_COMMIT": f"drill-commit-{ws.tag}"}
    first = f"drill-stop-{ws.tag}-1"
    _submit(head, first, overrides, wait=False, env_vars=commit)
    wait_for(
        lambda: (
            _job_status(head, first) in ("FAILED", "SUCCEEDED")
            or (checkpoint_step(config) >= 8 and last_logged_step(config) >= 10)
        ),
        400,
        "job-stop: checkpoint 8 of the submitted job",
    )
    before = latest_checkpoint(config).step
    stop_at, stop_step = time.time(), last_logged_step(config)
    head.ray("job", "stop", first)
    stopped = wait_for(lambda: _job_status(head, first) == "STOPPED" and "STOPPED", 60, "job-stop: STOPPED")
    wait_for(lambda: not train_worker_pids(), 60, "job-stop: the stopped job's Train workers gone")
    after = latest_checkpoint(config)
    intact = after is not None and after.step >= before
    run_status = mlflow_runs(config)[0].info.status

    second, resubmitted_at = f"drill-stop-{ws.tag}-2", time.time()
    _submit(head, second, overrides, wait=True, env_vars=commit)
    logs = head.ray("job", "logs", second).stdout
    match = re.search(r"resumed from \S+ at step (\d+)", logs)
    resumed_at = int(match.group(1)) if match else None
    final_run = mlflow_runs(config)[0]
    exported = storage.exists(
        storage.join(run_dir(_resolved(config)), "hf_model", "config.json"), config.storage
    )
    commit_logged = final_run.data.params.get("git.commit") == commit["FLAVA_GIT_COMMIT"]
    out = _judge_recovery(
        "ray job stop, then the same run submitted again",
        "the last complete checkpoint stays intact; the resubmitted job resumes from it and finishes",
        config,
        _final_metrics(config),
        stop_at,
        steps,
    )
    out.passed = (
        out.passed
        and stopped == "STOPPED"
        and intact
        and resumed_at == (after.step if after else None)
        and final_run.info.status == "FINISHED"
        and exported
        and commit_logged
    )
    # the stopped job's workers log a step or two after the stop: recovery is the resubmission's first step
    first_step = recovery_time(step_log(config), resubmitted_at)
    out.recover_s = None if first_step is None else round(first_step + resubmitted_at - stop_at, 1)
    out.observed = (
        f"stopped at step {stop_step} ({stopped}; MLflow run {run_status}); latest complete checkpoint "
        f"step {after.step if after else None} (was {before}); resubmission resumed at step {resumed_at}, "
        f"exported the model: {exported}, MLflow run {final_run.info.status}, git.commit from the runtime "
        f"env: {commit_logged}; " + out.observed
    )
    out.details.update(
        jobs=[first, second],
        checkpoint_on_s3=after is not None,
        exported=exported,
        final_status=final_run.info.status,
        git_commit=final_run.data.params.get("git.commit"),
        logs_say_finished=f"[train] step {steps}/{steps}" in logs,
        logs_say_exported="pretrain: exported model (transformers layout):" in logs,
    )
    return out


def _text_files(root: Path, limit: int = 16 * 2**20):
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.stat().st_size <= limit:
            yield path, path.read_bytes()


def _mlflow_texts(tracking_uri: str, experiment: str, scratch: Path):
    """(where, bytes) of everything MLflow holds for an experiment: params, tags, metric names, artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    for run in client.search_runs([exp.experiment_id]):
        rid = run.info.run_id
        yield f"mlflow:{rid}:params", json.dumps(run.data.params).encode()
        yield f"mlflow:{rid}:tags", json.dumps(run.data.tags).encode()
        yield f"mlflow:{rid}:metrics", json.dumps(sorted(run.data.metrics)).encode()
        local = Path(client.download_artifacts(rid, "", str(scratch / rid)))
        for path, data in _text_files(local):
            yield f"mlflow:{rid}:artifact:{path.relative_to(local)}", data


def _storage_texts(uri: str, storage_cfg: StorageConfig):
    """(where, bytes) of the small files of a run's storage (checkpoint metadata, Ray's snapshots)."""
    fs, root = storage.resolve(uri, storage_cfg)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File and not info.base_name.endswith(".distcp") and info.size < 2**20:
            with fs.open_input_stream(info.path) as f:
                yield f"storage:{info.path}", f.read()


def leaked(secrets: dict[str, str], sources) -> list[str]:
    """``"<secret name> in <where>"`` for every secret value found in any of ``sources`` ((where, bytes))."""
    found = []
    for where, data in sources:
        for name, value in secrets.items():
            if value.encode() in data:
                found.append(f"{name} in {where}")
    return found


def secret_env() -> dict[str, str]:
    """Credentials for a drill's cluster: unique values, so that any copy of them is unmistakable."""
    mark = uuid.uuid4().hex
    return {
        "AWS_ACCESS_KEY_ID": f"AKDRILL{mark[:12].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"drill-aws-secret-{mark}",
        "MLFLOW_TRACKING_USERNAME": "drill",
        "MLFLOW_TRACKING_PASSWORD": f"drill-mlflow-password-{mark}",
    }


def secrets_kept(ws: Workspace, head, s3: FlakyS3, jobs: list[str]) -> DrillResult:
    """Jobs submitted with token auth and S3 credentials in the cluster's environment (as KubeRay pods get
    them from Secrets; ``head.extra_env``), checkpointing to S3: no secret value may appear in the jobs'
    logs, Ray's logs, MLflow params, tags or artifacts, or the runs' storage. ``jobs``: the ids of jobs
    already run on ``head`` (e.g. by ``job_stop``); with none, a short one is submitted first."""
    if not jobs:
        jobs = [f"drill-secrets-{ws.tag}"]
        _submit(head, jobs[0], [*s3_overrides(ws, s3, "secrets"), "train.steps=4"], wait=True)
    secrets = {k: v for k, v in head.extra_env.items() if k != "MLFLOW_TRACKING_USERNAME"}
    secrets["RAY_AUTH_TOKEN"] = head.token
    job_logs = "\n".join(head.ray("job", "logs", job).stdout for job in jobs)
    runs = f"s3://{FlakyS3.BUCKET}/runs"
    sources = [
        ("ray job logs", job_logs.encode()),
        *((f"ray log {p.relative_to(head.logs_dir)}", data) for p, data in _text_files(head.logs_dir)),
        *_mlflow_texts(ws.tracking_uri, EXPERIMENT, ws.root / f"mlflow-scan-{uuid.uuid4().hex[:6]}"),
        *_storage_texts(runs, s3.storage),
    ]
    found = leaked(secrets, sources)
    used = any(where.startswith("storage:") and "checkpoint_step" in where for where, _ in sources)
    return DrillResult(
        "secrets: S3 keys, Ray token, MLflow password",
        "no secret value in job or Ray logs, MLflow params/tags/artifacts, or the runs' storage",
        f"{len(sources)} sources scanned ({len(jobs)} jobs; checkpoints on S3: {used}); "
        + (f"LEAKED: {'; '.join(found[:5])}" if found else "no secret value found"),
        passed=used and bool(job_logs.strip()) and not found,
        details={"leaks": found, "sources": len(sources)},
    )


# --- all of them --------------------------------------------------------------------------------------

SCENARIOS = (
    "kill_worker",
    "stuck_worker",
    "cut_checkpoint",
    "altered_shard",
    "skipped_input",
    "s3_outage",
    "s3_gone",
    "s3_gone_data",
    "job_stop",
    "secrets_kept",
)


def _guarded(name: str, drill: Callable[[], DrillResult]) -> DrillResult:
    """A drill that breaks is a failed row of the table, not the end of the table."""
    started = time.time()
    try:
        result = drill()
    except Exception as e:
        result = DrillResult(name, "(the drill itself)", f"drill error: {failure_summary(e)}", passed=False)
    result.details["wall_s"] = round(time.time() - started, 1)
    print(f"[drill] {name}: {'ok' if result.passed else 'FAILED'} ({result.details['wall_s']} s)", flush=True)
    return result


def run_drills(ws: Workspace, names: list[str] | tuple[str, ...] = SCENARIOS) -> list[DrillResult]:
    """Runs the named scenarios in table order on the connected Ray cluster (plus their own moto S3 and,
    for the job-submission ones, their own token-auth head)."""
    from pipeline.drills.head import RayHead

    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    results = []
    local = {f.__name__: f for f in (kill_worker, stuck_worker, cut_checkpoint, altered_shard, skipped_input)}
    for name, drill in local.items():
        if name in names:
            results.append(_guarded(name, lambda drill=drill: drill(ws)))
    on_s3 = {"s3_outage": s3_outage, "s3_gone": s3_gone, "s3_gone_data": s3_gone_data}
    s3 = FlakyS3() if {*on_s3, "job_stop", "secrets_kept"} & set(names) else None
    for name, drill in on_s3.items():
        if name in names:
            results.append(_guarded(name, lambda drill=drill: drill(ws, s3)))
    if {"job_stop", "secrets_kept"} & set(names):
        with RayHead(ws.root / f"ray-home-{ws.tag}", extra_env=secret_env()) as head:
            jobs: list[str] = []
            if "job_stop" in names:
                result = _guarded("job_stop", lambda: job_stop(ws, head, s3))
                jobs = result.details.get("jobs", [])
                results.append(result)
            if "secrets_kept" in names:
                results.append(_guarded("secrets_kept", lambda: secrets_kept(ws, head, s3, jobs)))
    return results


def format_table(results: list[DrillResult]) -> str:
    """The drill table (Markdown, so that it pastes into a note as is)."""

    def cell(value) -> str:
        return "-" if value is None else str(value).replace("|", "/")

    lines = [
        "| scenario | expected | observed | steps redone | samples lost | recover s | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = [r.scenario, r.expected, r.observed, r.steps_redone, r.samples_lost, r.recover_s]
        lines.append("| " + " | ".join(cell(v) for v in row) + f" | {'yes' if r.passed else 'NO'} |")
    passed = sum(r.passed for r in results)
    lines.append(f"\n{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)
