"""Faults of what a run reads and writes on its own disk: a checkpoint cut off mid-write, a shard altered
after its manifest, truncated shards and undecodable images."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.drills import observe
from pipeline.drills.harness import Workspace
from pipeline.drills.judge import DrillResult, judge_recovery, sample_accounting
from pipeline.shards import format as shard_format
from pipeline.train import checkpoint as ckpt
from pipeline.train.launch import InputError, failure_summary, resolve_paths, run_dir, run_pretraining


def cut_checkpoint(ws: Workspace) -> DrillResult:
    """The newest checkpoint's write is cut off (a DCP file truncated, as an interrupted upload leaves it):
    a rerun of the run name must resume from the previous complete one, never from the cut one."""
    first = ws.config("cut-checkpoint", "train.steps=8")
    run_pretraining(first)
    fs, path = storage.resolve(run_dir(resolve_paths(first)), first.storage)
    newest = f"{path}/{ckpt.dir_name(8)}"
    shards = [
        i for i in fs.get_file_info(pafs.FileSelector(newest)) if i.base_name.endswith(".distcp") and i.size
    ]
    victim = max(shards, key=lambda i: i.size)
    with fs.open_input_stream(victim.path) as f:
        head = f.read(victim.size // 2)
    with fs.open_output_stream(victim.path) as f:
        f.write(head)
    found = observe.latest_checkpoint(first)
    resumed_from = found.step if found else 0

    second = ws.config("cut-checkpoint", "train.steps=12")
    fault_at = time.time()
    result = run_pretraining(second)
    out = judge_recovery(
        "checkpoint write cut off",
        "the cut step-8 checkpoint is skipped; the rerun resumes from step 4 and reaches step 12",
        second,
        observe.record(second, result.metrics),
        fault_at,
        12,
    )
    out.passed = out.passed and resumed_from == 4 and out.details["resumed_at"] == [4]
    out.observed = f"latest complete checkpoint after the cut: step {resumed_from}; " + out.observed
    out.details.update(truncated=victim.path)
    return out


def altered_shard(ws: Workspace) -> DrillResult:
    """Bytes of a shard changed after its manifest was written, under ``data.on_corrupt_shard=error``:
    a clear error naming the file before any worker starts."""
    data = ws.demo_copy("altered")
    dataset = data / "image_text" / "train"
    entry = shard_format.read_manifest(str(dataset), StorageConfig()).shards[0]
    path = dataset / entry.file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(raw))
    config = ws.config("altered-shard", "train.steps=4", "data.on_corrupt_shard=error", data_root=str(data))
    scenario = "shard altered after its manifest (policy: error)"
    expected = "the run stops before training with an error naming the shard"
    started = time.time()
    try:
        run_pretraining(config)
    except Exception as e:
        named = str(path) in str(e)
        return DrillResult(
            scenario,
            expected,
            f"{failure_summary(e)[:160]}... (names the file: {named})",
            passed=named and isinstance(e, InputError) and not observe.step_log(config),
            recover_s=round(time.time() - started, 1),
            details={"file": str(path), "names_file": named},
        )
    return DrillResult(scenario, expected, "the run trained on the altered shard", passed=False)


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
    data = ws.demo_copy("skipped")
    text = data / "text" / "train"
    entry = shard_format.read_manifest(str(text), StorageConfig()).shards[0]
    raw = (text / entry.file).read_bytes()
    (text / entry.file).write_bytes(raw[: len(raw) // 2])
    # the text kind keeps one good shard: the demo's text set has several
    bad_rows = corrupt_rows(data / "image" / "train", every=4)
    config = ws.config("skipped-input", "train.steps=8", "data.on_corrupt_shard=skip", data_root=str(data))
    result = run_pretraining(config)
    metrics = observe.mlflow_runs(config)[0].data.metrics
    skipped_shards = metrics.get("skipped_shards/text")
    skipped_rows = metrics.get("skipped_rows/image/undecodable_image")
    history = observe.metric_history(config, "skipped_rows/image/undecodable_image")
    lost, _ = sample_accounting(config, result.metrics, 8)
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
