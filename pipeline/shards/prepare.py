"""Raw sources -> shards + manifest, as one Ray Data pipeline.

Plan (driver, cheap): list the raw records in a deterministic order, split train/val by key hash,
and cut the list into shards of at most ``shard_rows`` records and about ``shard_bytes`` bytes. The
shard a record lands in is therefore a function of the inputs and the config alone, so a rerun plans
the same shards and only computes those whose file is missing or was planned differently.

Execute (Ray Data, streaming): one row per shard flows through
  load + validate + canonicalise (CPU tasks) -> dVAE codes (actor pool, GPU when present)
  -> write the shard atomically (CPU tasks),
so every stage is parallel and a shard is always written by one task. A shard carries its plan
fingerprint and its skip counts in the Parquet footer; that is how a rerun recognises a complete
shard and still reports what it skipped. The manifest is written last, once every shard exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline import storage
from pipeline.config import PrepareConfig, StorageConfig
from pipeline.shards import format as fmt
from pipeline.shards.codebook import ImageCodebook, codebook_identity
from pipeline.shards.sources import (
    CORRUPT_IMAGE,
    IMAGE_TOO_SMALL,
    ZERO_BYTE,
    RawRef,
    kind_of,
    list_refs,
    load_records,
)

PLAN_KEY = b"flava.plan"
SKIPPED_KEY = b"flava.skipped"


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message names the input or setting at fault."""


@dataclass
class ShardTask:
    dataset: str
    kind: str
    index: int
    name: str
    refs: list[RawRef]
    fingerprint: str = ""


@dataclass
class DatasetPlan:
    dataset: str  # output dir or s3:// URI
    kind: str
    source: str
    shards: list[list[RawRef]]
    skipped: Counter = field(default_factory=Counter)  # found while listing
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first input skipped for it


@dataclass
class DatasetSummary:
    dataset: str
    kind: str
    rows: int
    shards: int
    new_shards: int
    bytes: int
    skipped: dict[str, int]
    examples: dict[str, str]


@dataclass
class PrepareReport:
    datasets: list[DatasetSummary]
    rows_computed: int  # rows of the shards written by this run (not the ones reused)
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds else 0.0


def canonical_image(data: bytes | None, prep: PrepareConfig) -> tuple[bytes | None, str]:
    """(encoded canonical image, "") or (None, skip reason).

    Canonical = EXIF-upright RGB (transparency composited on white), shorter side resized to
    ``image_size`` and centre-cropped to a square, encoded losslessly as PNG by default.
    """
    if not data:
        return None, ZERO_BYTE
    size = prep.image_size
    try:
        with Image.open(io.BytesIO(data)) as im:
            if min(im.size) < prep.min_image_size:
                return None, IMAGE_TOO_SMALL
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers size
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None, CORRUPT_IMAGE
    w, h = im.size
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((w2, h2), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    im = im.crop((left, top, left + size, top + size))
    out = io.BytesIO()
    if prep.image_format == "png":
        im.save(out, format="PNG")
    else:
        im.save(out, format="JPEG", quality=prep.jpeg_quality, subsampling=0)
    return out.getvalue(), ""


def _is_val(key: str, fraction: float) -> bool:
    return (
        int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8]) < fraction * 2**64
    )


def _estimated_bytes(ref: RawRef, prep: PrepareConfig, kind: str) -> int:
    """Stored size before decoding: a canonical image is at most its raw pixels, plus two code grids."""
    if kind == "text":
        return ref.size_hint
    grid = prep.image_size // prep.patch_size
    return min(ref.size_hint, 3 * prep.image_size**2) + 4 * grid * grid


def assign_shards(refs: list[RawRef], prep: PrepareConfig, kind: str) -> list[list[RawRef]]:
    """Cuts the ordered records into consecutive shards bounded by shard_rows and shard_bytes."""
    shards: list[list[RawRef]] = []
    current: list[RawRef] = []
    size = 0
    for ref in refs:
        nbytes = _estimated_bytes(ref, prep, kind)
        if current and (len(current) >= prep.shard_rows or size + nbytes > prep.shard_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(ref)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def plan(prep: PrepareConfig, storage_cfg: StorageConfig) -> list[DatasetPlan]:
    """Lists the source and plans its dataset (or its train and val datasets when val_fraction > 0)."""
    kind = kind_of(prep.source)
    if not prep.output:
        raise PrepareError("prepare.output is empty: give a directory or s3:// URI for the shards")
    refs = list_refs(prep.source, prep.inputs, prep.captions, storage_cfg)
    bad = [r for r in refs if r.skip]
    if prep.strict and bad:
        raise PrepareError(f"{bad[0].origin}: {bad[0].skip} (strict mode stops at the first bad input)")
    good = [r for r in refs if not r.skip]
    if prep.val_fraction > 0:
        splits = {
            storage.join(prep.output, "train"): [r for r in good if not _is_val(r.key, prep.val_fraction)],
            storage.join(prep.output, "val"): [r for r in good if _is_val(r.key, prep.val_fraction)],
        }
    else:
        splits = {prep.output: good}
    plans = []
    for dataset, split_refs in splits.items():
        # listing-time skips are reported once, with the training split (they belong to no key's split)
        listed = bad if dataset == next(iter(splits)) else []
        plans.append(
            DatasetPlan(
                dataset=dataset,
                kind=kind,
                source=f"{prep.source}: {', '.join(prep.inputs)}",
                shards=assign_shards(split_refs, prep, kind),
                skipped=Counter(r.skip for r in listed),
                examples={r.skip: r.origin for r in reversed(listed)},
            )
        )
    return plans


def _fingerprint(task: ShardTask, prep: PrepareConfig, identity: fmt.CodebookIdentity | None) -> str:
    """Everything that determines a shard's content: a reused shard must match it exactly."""
    settings = {
        "schema_version": fmt.SCHEMA_VERSION,
        "kind": task.kind,
        "refs": [dataclasses.asdict(r) for r in task.refs],
    }
    if task.kind != "text":
        settings.update(
            image_size=prep.image_size,
            patch_size=prep.patch_size,
            min_image_size=prep.min_image_size,
            image_format=prep.image_format,
            jpeg_quality=prep.jpeg_quality if prep.image_format == "jpeg" else None,
            codebook=dataclasses.asdict(identity) if identity else None,
        )
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def load_shard(row: dict, prep: PrepareConfig, storage_cfg: StorageConfig) -> dict:
    """Stage 1: raw bytes -> validated records (``skip_reason`` "" for good ones) as an Arrow payload."""
    task: ShardTask = pickle.loads(row["task"])
    keys, origins, images, texts, reasons = [], [], [], [], []
    for rec in load_records(task.refs, storage_cfg):
        image, skip = None, rec.skip
        if not skip and task.kind != "text":
            image, skip = canonical_image(rec.image, prep)
        keys.append(rec.key)
        origins.append(rec.origin)
        images.append(image)
        texts.append(rec.text if not skip else None)
        reasons.append(skip)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "origin": pa.array(origins, pa.string()),
            "image": pa.array(images, pa.binary()),
            "text": pa.array(texts, pa.string()),
            "skip_reason": pa.array(reasons, pa.string()),
        }
    )
    return {"task": row["task"], "records": _to_ipc(table)}


class CodesStage:
    """Stage 2, a ``map_batches`` callable class: one codebook per actor, reused for every shard."""

    def __init__(self, prep: PrepareConfig, storage_cfg: StorageConfig):
        self.codebook = ImageCodebook(prep, storage_cfg)
        self.cells = self.codebook.grid**2

    def _with_codes(self, task: ShardTask, payload: bytes) -> bytes:
        table = _from_ipc(payload)
        if task.kind == "text":
            return payload
        ok = np.asarray(pc.equal(table["skip_reason"], "").to_numpy(zero_copy_only=False), dtype=bool)
        images = table["image"].to_pylist()
        codes, flipped = self.codebook.codes([images[i] for i in np.flatnonzero(ok)])
        for name, values in (("dvae_codes", codes), ("dvae_codes_flipped", flipped)):
            full = np.zeros((len(ok), self.cells), dtype=np.int16)
            full[ok] = values
            column = pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), self.cells, mask=pa.array(~ok))
            table = table.append_column(name, column)
        return _to_ipc(table)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = [
            self._with_codes(pickle.loads(t), p) for t, p in zip(batch["task"], batch["records"], strict=True)
        ]
        return {"task": batch["task"], "records": np.array(payloads, dtype=object)}


def write_shard_task(row: dict, prep: PrepareConfig, storage_cfg: StorageConfig) -> dict:
    """Stage 3: keep the good records, write the shard (with plan and skips in its footer)."""
    task: ShardTask = pickle.loads(row["task"])
    table = _from_ipc(row["records"])
    reasons = table["skip_reason"].to_pylist()
    origins = table["origin"].to_pylist()
    skipped = Counter(r for r in reasons if r)
    examples: dict[str, str] = {}
    for reason, origin in zip(reasons, origins, strict=True):
        if reason:
            examples.setdefault(reason, origin)
    result = {
        "dataset": task.dataset,
        "index": task.index,
        "entry": "",
        "skipped": json.dumps(skipped),
        "examples": json.dumps(examples),
        "reused": False,
    }
    if prep.strict and skipped:
        return result  # the driver fails naming the input; nothing half-valid gets written
    schema = fmt.schema_for(task.kind, prep.image_size // prep.patch_size)
    good = table.filter(pc.equal(table["skip_reason"], ""))
    shard = pa.Table.from_arrays([good[name] for name in schema.names], schema=schema)
    footer = {PLAN_KEY: task.fingerprint, SKIPPED_KEY: json.dumps({"skipped": skipped, "examples": examples})}
    entry = fmt.write_shard(
        task.dataset, task.name, shard.replace_schema_metadata(footer), prep.row_group_rows, storage_cfg
    )
    result["entry"] = json.dumps(dataclasses.asdict(entry))
    return result


def _reusable(task: ShardTask, storage_cfg: StorageConfig) -> dict | None:
    """The result of an earlier run's shard when its file is complete and planned identically."""
    uri = storage.join(task.dataset, task.name)
    if storage.file_size(uri, storage_cfg) is None:
        return None
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            footer = pq.read_metadata(f)
        meta = footer.metadata or {}
        info = json.loads(meta[SKIPPED_KEY])
    except (pa.ArrowException, OSError, KeyError, ValueError):
        return None  # unreadable or not ours: recompute and overwrite
    if meta.get(PLAN_KEY) != task.fingerprint.encode():
        return None
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    entry = fmt.ShardEntry(task.name, footer.num_rows, size, digest.hexdigest())
    return {
        "dataset": task.dataset,
        "index": task.index,
        "entry": json.dumps(dataclasses.asdict(entry)),
        "skipped": json.dumps(info["skipped"]),
        "examples": json.dumps(info["examples"]),
        "reused": True,
    }


def _remove_stale_temporaries(dataset: str) -> None:
    """Temporaries of an interrupted local write (``*.tmp-*``) are never valid shards."""
    if storage.is_s3(dataset) or not Path(dataset).is_dir():
        return
    for tmp in Path(dataset).glob("*.parquet.tmp-*"):
        tmp.unlink(missing_ok=True)


def _run_pipeline(tasks: list[ShardTask], prep: PrepareConfig, storage_cfg: StorageConfig):
    import ray

    kwargs = {"prep": prep, "storage_cfg": storage_cfg}
    # tasks travel pickled: they are our own dataclasses, not columns worth an Arrow type
    ds = ray.data.from_items([{"task": pickle.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map(load_shard, fn_kwargs=kwargs, num_cpus=1)
    if any(t.kind != "text" for t in tasks):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        # one GPU per actor where the cluster has GPUs (never more actors than GPUs: they would wait
        # forever); else CPU actors, which Ray Data fuses with the decode stage
        ds = ds.map_batches(
            CodesStage,
            fn_constructor_kwargs=kwargs,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=min(prep.codebook_actors, gpus) if gpus else prep.codebook_actors
            ),
            num_gpus=1 if gpus else None,
            num_cpus=None if gpus else 1,
        )
    ds = ds.map(write_shard_task, fn_kwargs=kwargs, num_cpus=1)
    yield from ds.iter_rows()


def _check_strict(row: dict, prep: PrepareConfig) -> None:
    examples = json.loads(row["examples"])
    if prep.strict and examples:
        reason, origin = next(iter(examples.items()))
        raise PrepareError(f"{origin}: {reason} (strict mode stops at the first bad input)")


def execute(plans: list[DatasetPlan], prep: PrepareConfig, storage_cfg: StorageConfig) -> PrepareReport:
    """Computes the missing shards of every plan in one Ray Data run, then writes each manifest last."""
    start = time.perf_counter()
    needs_codes = any(p.kind != "text" for p in plans)
    identity = codebook_identity(prep, storage_cfg) if needs_codes else None
    tasks = []
    for p in plans:
        _remove_stale_temporaries(p.dataset)
        for index, refs in enumerate(p.shards):
            task = ShardTask(p.dataset, p.kind, index, fmt.shard_name(prep.shard_prefix, index), refs)
            task.fingerprint = _fingerprint(task, prep, identity)
            tasks.append(task)
    with ThreadPoolExecutor(max_workers=8) as pool:
        reused = list(pool.map(lambda t: _reusable(t, storage_cfg), tasks))
    results = {(r["dataset"], r["index"]): r for r in reused if r is not None}
    todo = [t for t, r in zip(tasks, reused, strict=True) if r is None]
    for dataset in {t.dataset for t in todo}:
        # the dataset is about to change: until its new manifest is written it must not look complete
        manifest = storage.join(dataset, fmt.MANIFEST_NAME)
        if storage.exists(manifest, storage_cfg):
            storage.delete_file(manifest, storage_cfg)
    print(
        f"prepare: {len(tasks)} shards planned in {len(plans)} dataset(s); {len(results)} complete from an "
        f"earlier run, {len(todo)} to compute"
    )
    for row in results.values():
        _check_strict(row, prep)
    rows_computed = 0
    if todo:
        for row in _run_pipeline(todo, prep, storage_cfg):
            _check_strict(row, prep)
            results[(row["dataset"], row["index"])] = row
            rows_computed += json.loads(row["entry"])["rows"]
    summaries = [_finish(p, results, prep, identity, storage_cfg) for p in plans]
    return PrepareReport(summaries, rows_computed, time.perf_counter() - start)


def _finish(
    p: DatasetPlan,
    results: dict,
    prep: PrepareConfig,
    identity: fmt.CodebookIdentity | None,
    storage_cfg: StorageConfig,
) -> DatasetSummary:
    skipped, examples, entries, new = Counter(p.skipped), dict(p.examples), [], 0
    for index in range(len(p.shards)):
        row = results[(p.dataset, index)]
        new += not row["reused"]
        skipped.update(json.loads(row["skipped"]))
        for reason, origin in json.loads(row["examples"]).items():
            examples.setdefault(reason, origin)
        entry = fmt.ShardEntry(**json.loads(row["entry"]))
        if entry.rows:  # an all-skipped shard stays on disk for resuming but is not part of the data
            entries.append(entry)
    if not entries:
        raise PrepareError(
            f"{p.dataset}: no valid records from {p.source} (skipped: {dict(skipped) or 'none listed'})"
        )
    manifest = fmt.Manifest(
        kind=p.kind,
        shards=entries,
        skipped=dict(sorted(skipped.items())),
        codebook=identity if p.kind != "text" else None,
        image_size=prep.image_size if p.kind != "text" else 0,
        patch_size=prep.patch_size if p.kind != "text" else 0,
        source=p.source,
    )
    fmt.write_manifest(p.dataset, manifest, storage_cfg)
    return DatasetSummary(
        dataset=p.dataset,
        kind=p.kind,
        rows=manifest.rows,
        shards=len(entries),
        new_shards=new,
        bytes=manifest.bytes,
        skipped=manifest.skipped,
        examples=examples,
    )


def prepare(prep: PrepareConfig, storage_cfg: StorageConfig) -> PrepareReport:
    """Plans and prepares ``prep``'s source; see the module docstring. Needs Ray initialised."""
    start = time.perf_counter()
    report = execute(plan(prep, storage_cfg), prep, storage_cfg)
    report.seconds = time.perf_counter() - start
    return report


def format_report(report: PrepareReport) -> str:
    """The summary table printed at the end of prepare_data."""
    header = f"{'dataset':<44} {'kind':<10} {'rows':>8} {'skipped':>8} {'shards':>7} {'new':>5} {'MiB':>8}"
    lines = [header, "-" * len(header)]
    for s in report.datasets:
        name = s.dataset if len(s.dataset) <= 44 else "..." + s.dataset[-41:]
        lines.append(
            f"{name:<44} {s.kind:<10} {s.rows:>8} {sum(s.skipped.values()):>8} {s.shards:>7} "
            f"{s.new_shards:>5} {s.bytes / 2**20:>8.2f}"
        )
    skipped = Counter()
    examples: dict[str, str] = {}
    for s in report.datasets:
        skipped.update(s.skipped)
        for reason, origin in s.examples.items():
            examples.setdefault(reason, origin)
    lines.append("-" * len(header))
    if skipped:
        lines.append("skipped inputs by reason:")
        lines += [
            f"  {reason:<18} {n:>8}   e.g. {examples.get(reason, '?')}"
            for reason, n in sorted(skipped.items())
        ]
    else:
        lines.append("skipped inputs: none")
    lines.append(
        f"rows computed this run: {report.rows_computed} in {report.seconds:.1f} s "
        f"= {report.rows_per_second:.1f} rows/s (shards reused from an earlier run are not counted)"
    )
    return "\n".join(lines)
