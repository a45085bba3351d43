"""``clip_grad_norm_`` on FSDP2 DTensor gradients clips by the global norm, not a per-shard one."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))


def loss_of(model) -> torch.Tensor:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    return model(x).pow(2).sum()


def _worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    model.set_force_sum_reduction_for_comms(True)  # as model.sharding does on gloo
    loss_of(model).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    clipped = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters()}  # no shared memory
    if rank == 0:
        queue.put((norm.full_tensor().item(), clipped))
    dist.barrier()
    dist.destroy_process_group()


def test_global_norm_and_clipping_match_one_process():
    model = make_model()
    loss_of(model).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    norm, clipped = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert abs(norm - expected_norm) < 1e-4 * expected_norm
    for name, param in model.named_parameters():
        torch.testing.assert_close(torch.tensor(clipped[name]), param.grad, rtol=1e-5, atol=1e-6)
