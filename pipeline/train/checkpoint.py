"""A run's training state: when it is saved, what a complete checkpoint is, what is kept and loaded.

The state is a set of parts: the model and the optimizer, saved with ``torch.distributed.checkpoint``
(sharded, reshardable to another world size), and named stateful parts (the schedule, the data stream,
the training progress, ...) that each give a JSON-serialisable ``state_dict()`` and take it back with
``load_state_dict()``. ``CheckpointManager`` is the only code that knows the layout.

Layout of one checkpoint directory ``<storage>/<run_name>/checkpoint_step<step:08d>/``, assembled by
Ray Train from every rank's upload of its own staging directory:

  .metadata, __<rank>_0.distcp   DCP files of the FSDP2 model and optimizer state
  extra_state.json               rank 0: every named part's state, the run's MLflow id, world size, nonce
  rng-rank<r>.pt                 each rank's torch CPU/CUDA RNG states (dropout), for an exact continuation
  _complete-rank<r>.json         each rank's marker, written last: the save's nonce + its files and sizes

A checkpoint counts only when every rank's marker is there with the nonce of ``extra_state.json`` and
every listed file has its listed size. Uploads of the ranks are independent and may be cut anywhere, so
this rule, not the presence of a directory or of Ray's run snapshot, decides what may be resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pipeline.config import TrainConfig
from pipeline.train import events
from pipeline.train.collectives import barrier, broadcast_from_rank0, rank_world

log = logging.getLogger(__name__)

EXTRA_STATE = "extra_state.json"
FORMAT_VERSION = 1
_DIR_RE = re.compile(r"^checkpoint_step(\d{8})$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def dir_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


def _marker(rank: int) -> str:
    return f"_complete-rank{rank}.json"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def save(
    staging_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict
) -> None:
    """Collective: every rank writes its part of the checkpoint into its own local ``staging_dir``.

    ``extra`` is rank 0's (JSON-serialisable) state of the named parts; other ranks' ``extra`` is ignored.
    """
    rank, world = rank_world()
    staging = Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    nonce = broadcast_from_rank0(uuid.uuid4().hex)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(staging))
    if rank == 0:
        state = {**extra, "format": FORMAT_VERSION, "world_size": world, "nonce": nonce}
        (staging / EXTRA_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save({"cpu": torch.get_rng_state(), "cuda": cuda}, staging / _rng_file(rank))
    files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
    (staging / _marker(rank)).write_text(json.dumps({"nonce": nonce, "rank": rank, "files": files}))


@dataclass
class Found:
    """A complete checkpoint in storage."""

    step: int
    path: str  # path inside ``fs``
    extra: dict


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def incomplete_reason(fs: pafs.FileSystem, path: str) -> tuple[str | None, dict | None]:
    """(None, extra state) for a complete checkpoint, else (why not, None)."""
    extra = _read_json(fs, f"{path}/{EXTRA_STATE}")
    if extra is None:
        return f"{EXTRA_STATE} missing or unreadable", None
    if extra.get("format") != FORMAT_VERSION:
        return f"format {extra.get('format')!r}, this code reads {FORMAT_VERSION}", None
    sizes = {
        info.base_name: info.size
        for info in fs.get_file_info(pafs.FileSelector(path))
        if info.type == pafs.FileType.File
    }
    for rank in range(extra["world_size"]):
        marker = _read_json(fs, f"{path}/{_marker(rank)}")
        if marker is None:
            return f"rank {rank} never finished writing ({_marker(rank)} missing)", None
        if marker.get("nonce") != extra["nonce"]:
            return f"rank {rank}'s marker belongs to another save (nonce differs)", None
        for name, size in marker["files"].items():
            if sizes.get(name) != size:
                return f"{name} is {sizes.get(name)} bytes, rank {rank} wrote {size}", None
    return None, extra


def find_latest(fs: pafs.FileSystem, run_dir: str) -> Found | None:
    """The newest complete checkpoint under ``run_dir``; incomplete newer ones are named in the log."""
    info = fs.get_file_info(run_dir)
    if info.type != pafs.FileType.Directory:
        return None
    candidates = []
    for entry in fs.get_file_info(pafs.FileSelector(run_dir)):
        match = _DIR_RE.match(entry.base_name)
        if entry.type == pafs.FileType.Directory and match:
            candidates.append((int(match.group(1)), entry.path))
    for step, path in sorted(candidates, reverse=True):
        reason, extra = incomplete_reason(fs, path)
        if reason is None:
            return Found(step=step, path=path, extra=extra)
        log.warning("skipping incomplete checkpoint %s: %s", path, reason)
    return None


def load(local_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: restores model and optimizer (any world size) and, where the world size is the one
    that saved, this rank's RNG. Returns the extra state."""
    rank, world = rank_world()
    local = Path(local_dir)
    extra = json.loads((local / EXTRA_STATE).read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(local))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if extra["world_size"] == world:
        rng = torch.load(local / _rng_file(rank), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return extra


def retention(train: TrainConfig):
    """How many reported checkpoints Ray Train keeps (it deletes older ones as new ones arrive)."""
    import ray.train

    return ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)


class CheckpointManager:
    """The checkpoints of one run, seen from a Train worker (collective: every rank calls every method).

    ``parts`` are the named stateful parts besides model and optimizer; ``meta`` is what the driver reads
    back without loading anything (the MLflow run id)."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        run_dir: str,
        *,
        every: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
        meta: dict | None = None,
    ):
        self.fs, self.run_dir, self.every = fs, run_dir, every
        self.model, self.optimizer, self.parts = model, optimizer, parts
        self.meta = dict(meta or {})
        self.rank = rank_world()[0]

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, metrics: dict) -> None:
        """Every rank stages its part locally and reports it; Ray Train uploads each rank's part into the
        same checkpoint directory. Once every rank has uploaded, rank 0 records the ``checkpoint`` event."""
        import ray.train

        extra = {**self.meta, **{name: part.state_dict() for name, part in self.parts.items()}}
        staging = Path(tempfile.mkdtemp(prefix="flava-ckpt-"))
        try:
            save(staging, self.model, self.optimizer, extra)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                checkpoint_dir_name=dir_name(step),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        barrier()
        if self.rank == 0:
            events.record(
                self.fs, self.run_dir, "checkpoint", step=step, path=f"{self.run_dir}/{dir_name(step)}"
            )

    def restore(self) -> Found | None:
        """Loads every part from the newest complete checkpoint (rank 0 picks it: Ray's
        ``get_checkpoint()`` names only the one its snapshot knows, which may be newer than the last
        complete one). Returns it, or None for a fresh start."""
        import ray.train

        found = broadcast_from_rank0(find_latest(self.fs, self.run_dir) if self.rank == 0 else None)
        if found is None:
            latest = ray.train.get_checkpoint()
            if latest is not None:  # e.g. the only checkpoint's upload was cut: start over, say so
                log.warning("checkpoint %s is incomplete: starting from step 0", latest.path)
            return None
        with ray.train.Checkpoint(path=found.path, filesystem=self.fs).as_directory() as local:
            extra = load(local, self.model, self.optimizer)
        for name, part in self.parts.items():
            part.load_state_dict(extra[name])
        return found
