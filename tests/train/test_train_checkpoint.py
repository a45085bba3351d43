"""Sharded checkpoints on one process (a world-size-1 gloo group): exact restore and the completion rule."""

from __future__ import annotations

import json
import shutil
import socket

import pyarrow.fs as pafs
import pytest
import torch
import torch.distributed as dist

from model import build_flava
from model.sharding import parallelize
from pipeline.config import TrainConfig
from pipeline.train import checkpoint as ckpt
from pipeline.train.optim import build_optimizer, build_scheduler
from tests.model.flava_batches import make_batch

TRAIN = TrainConfig(lr=1e-3, warmup_steps=2, steps=10)


@pytest.fixture(scope="module")
def process_group():
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make_trainer():
    torch.manual_seed(0)
    model = parallelize(build_flava("tiny", text_vocab_size=64, dropout=0.1))
    optimizer = build_optimizer(model, TRAIN)
    return model, optimizer, build_scheduler(optimizer, TRAIN)


def train_steps(model, optimizer, scheduler, steps: range):
    for step in steps:
        kind = ("image_text", "image", "text")[step % 3]
        out = model(make_batch(kind, model.spec, seed=step))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def full_params(model) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
        for k, v in model.state_dict().items()
    }


def save_to_run(run_dir, step, model, optimizer, scheduler):
    staging = run_dir / f"staging-{step}"
    ckpt.save(staging, model, optimizer, {"step": step, "scheduler": scheduler.state_dict()})
    shutil.copytree(staging, run_dir / ckpt.dir_name(step))  # what Ray's upload does
    shutil.rmtree(staging)
    return run_dir / ckpt.dir_name(step)


def test_restore_continues_exactly(process_group, tmp_path):
    """Model, AdamW moments, schedule and the dropout RNG all come back: 2+2 steps == 4 steps, bitwise."""
    model, optimizer, scheduler = make_trainer()
    train_steps(model, optimizer, scheduler, range(2))
    save_to_run(tmp_path, 2, model, optimizer, scheduler)
    train_steps(model, optimizer, scheduler, range(2, 4))
    uninterrupted = full_params(model)

    model, optimizer, scheduler = make_trainer()
    found = ckpt.find_latest(pafs.LocalFileSystem(), str(tmp_path))
    assert found.step == 2
    extra = ckpt.load(found.path, model, optimizer)
    scheduler.load_state_dict(extra["scheduler"])
    train_steps(model, optimizer, scheduler, range(2, 4))
    resumed = full_params(model)
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize("damage", ["marker", "truncate", "nonce", "extra"])
def test_incomplete_checkpoint_is_never_chosen(process_group, tmp_path, damage):
    model, optimizer, scheduler = make_trainer()
    save_to_run(tmp_path, 1, model, optimizer, scheduler)
    newer = save_to_run(tmp_path, 2, model, optimizer, scheduler)
    if damage == "marker":  # the upload was cut before the rank's marker
        (newer / "_complete-rank0.json").unlink()
    elif damage == "truncate":
        shard = next(newer.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "nonce":  # a stale marker of an earlier save to the same directory
        marker = newer / "_complete-rank0.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "nonce": "old"}))
    else:
        (newer / ckpt.EXTRA_STATE).unlink()
    reason, _ = ckpt.incomplete_reason(pafs.LocalFileSystem(), str(newer))
    assert reason
    found = ckpt.find_latest(pafs.LocalFileSystem(), str(tmp_path))
    assert found.step == 1


def test_no_checkpoint(tmp_path):
    assert ckpt.find_latest(pafs.LocalFileSystem(), str(tmp_path / "absent")) is None
    (tmp_path / "checkpoint_step00000003").mkdir()
    assert ckpt.find_latest(pafs.LocalFileSystem(), str(tmp_path)) is None
