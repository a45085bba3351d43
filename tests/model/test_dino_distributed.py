"""Two gloo processes with the FSDP2-sharded DINO model vs one process on the concatenated batch.

Both take two SGD steps with the EMA teacher update after each: the student, the teacher (sharded like the
student, updated shard by shard) and the center (EMA of all ranks' teacher outputs) must end equal. In
float64, as the other distributed tests, so that only float reassociation is left.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import WORLD, free_port, init
from test_two_phase import crops, dino_model

from model.sharding import parallelize


def train_steps(model, rank: int | None) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        batch = crops(batch_size=4, seed=step)
        if rank is not None:
            batch = {k: v if k == "kind" else v[:, rank * 2 : (rank + 1) * 2] for k, v in batch.items()}
        model.set_progress(step, 4)
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.after_optimizer_step_()


def full_state(model) -> dict[str, torch.Tensor]:
    return {
        name: t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()
        for name, t in model.state_dict().items()
    }


def worker(rank: int, port: int, out: str) -> None:
    init(rank, port)
    model = parallelize(dino_model())
    train_steps(model, rank)
    state = full_state(model)
    if rank == 0:
        torch.save(state, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_a_sharded_dino_step_on_two_ranks_equals_the_single_process_step(tmp_path: Path, float64):
    out = tmp_path / "dino.pt"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    sharded = torch.load(out)

    model = dino_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, None)
    state = model.state_dict()
    assert sharded.keys() == state.keys()
    for name, value in state.items():
        torch.testing.assert_close(
            sharded[name], value, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )
    teacher_moved = [
        k for k in state if k.startswith("dino.teacher") and not torch.equal(state[k], before[k])
    ]
    assert len(teacher_moved) > 10 and not torch.equal(state["dino.center"], before["dino.center"])
