"""The project's optimizer step (``pipeline.train.loop.optimizer_step``) on 2 FSDP2 ranks over gloo, with
gradient accumulation (sync on the last micro-batch only) and clipping at the configured norm, against
the single-process step on the whole batch: the oracle for what data parallelism must not change.

``text`` (MLM) is linear in the batch (a mean over masked targets, every row with the same count), so the
2 ranks x 2 micro-batches of a quarter each must give the whole batch's gradient; the clip threshold is
set below the gradient's norm, so the gradients AdamW is handed (read in an optimizer pre-hook) show
whether clipping was global (one norm over both ranks' shards) and at the configured value. The
pre-clip norm is compared too.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import build_flava
from model.sharding import parallelize
from pipeline.config import TrainConfig
from pipeline.train.loop import optimizer_step
from pipeline.train.optim import build_optimizer, build_scheduler
from tests.model.flava_batches import make_batch, slice_batch

TRAIN = TrainConfig(lr=1e-3, warmup_steps=2, steps=10)
BATCH = 8
CLIP = 0.05  # below the gradient norm of this batch (asserted), so clipping acts


def initial_model():
    torch.manual_seed(0)
    return build_flava("tiny", text_vocab_size=64, dropout=0.0)


def step(model, micro_batches: list[dict], clip: float) -> tuple[float, dict[str, list]]:
    """One optimizer_step; (pre-clip norm, the full gradients the optimizer was handed)."""
    model.train()
    optimizer = build_optimizer(model, TRAIN)
    scheduler = build_scheduler(optimizer, TRAIN)
    grads: dict[str, list] = {}

    def capture(opt, args, kwargs):  # every rank: full_tensor() is a collective
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()

    optimizer.register_step_pre_hook(capture)
    expected = model.spec.losses_for("text")
    _, norm, _, _ = optimizer_step(
        model, optimizer, scheduler, iter(micro_batches), len(micro_batches), clip, expected
    )
    return norm, grads


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = parallelize(initial_model())
        full = make_batch("text", model.spec, batch_size=BATCH, seed=3)
        mine = slice_batch(full, slice(rank * BATCH // 2, (rank + 1) * BATCH // 2))  # this rank's half
        quarter = BATCH // 4
        micro = [slice_batch(mine, slice(0, quarter)), slice_batch(mine, slice(quarter, 2 * quarter))]
        norm, grads = step(model, micro, CLIP)
        if rank == 0:
            Path(out).write_text(json.dumps({"norm": norm, "grads": grads}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("step") / "rank0.json"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def test_two_ranks_with_accumulation_and_clipping_take_the_single_process_step(two_ranks):
    model = initial_model()
    full = make_batch("text", model.spec, batch_size=BATCH, seed=3)
    norm, grads = step(model, [full], CLIP)
    assert norm > 4 * CLIP  # the premise: clipping changes this step
    assert two_ranks["norm"] == pytest.approx(norm, rel=1e-5)
    assert two_ranks["grads"].keys() == grads.keys() and grads
    clipped = torch.cat([torch.tensor(g).flatten() for g in two_ranks["grads"].values()]).norm()
    assert clipped.item() == pytest.approx(CLIP, rel=1e-4)  # clipped to the configured global norm
    for name, value in grads.items():
        torch.testing.assert_close(
            torch.tensor(two_ranks["grads"][name]), torch.tensor(value), rtol=1e-4, atol=1e-7, msg=name
        )
