"""The few collectives the training code needs besides FSDP's own, as no-ops without a process group
(one process, a unit test)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(obj):
    """Rank 0's value on every rank (any picklable object)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_across_ranks_mod(value: int, modulus: int, device: torch.device) -> int:
    """The sum of every rank's non-negative ``value`` modulo ``modulus`` (< 2**55), exactly (int64)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value % modulus
    packed = torch.tensor([value % modulus], dtype=torch.int64, device=device)
    dist.all_reduce(packed)  # at most world x modulus: far from overflowing for any real world size
    return int(packed.item()) % modulus


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """One all-reduce for a dict of scalars (every rank has the same keys: same kind, same losses)."""
    names = sorted(values)
    packed = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
        packed /= dist.get_world_size()
    return dict(zip(names, packed.tolist(), strict=True))


def spread_across_ranks(values: list[float], device: torch.device) -> float:
    """The largest difference between ranks of any of ``values`` (0 when every rank holds the same)."""
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    high, low = packed.clone(), packed.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max().item())
