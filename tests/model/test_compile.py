"""``parallelize(compile=True)`` (the ``model.compile`` switch): the layers really run compiled, with the
eager model's losses and gradients. World 1 on gloo, tiny FLAVA on CPU (inductor's C++ backend); the same
call compiles with Triton on CUDA."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from flava_batches import make_batch

from model import build_flava
from model.sharding import parallelize


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out: str) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(out).parent / "inductor")  # no stale shared cache
    from torch._dynamo.utils import counters

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        eager = build_flava("tiny", text_vocab_size=64, max_position_embeddings=16)
        compiled = parallelize(copy.deepcopy(eager), compile=True)
        eager = parallelize(eager)
        batch = make_batch("image_text", eager.spec, batch_size=4)
        results = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            counters.clear()
            loss = model(batch).loss
            loss.backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            results[name] = {
                "loss": loss.detach(),
                "grads": grads,
                "graphs": counters["stats"]["unique_graphs"],
            }
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_compiled_layers_run_compiled_with_the_eager_numbers(tmp_path):
    out = tmp_path / "results.pt"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=1, join=True)
    results = torch.load(Path(out))
    eager, compiled = results["eager"], results["compiled"]
    assert eager["graphs"] == 0 and compiled["graphs"] > 0
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-5, atol=1e-6)
    assert compiled["grads"].keys() == eager["grads"].keys()
    # inductor fuses and reorders fp32 reductions (a position table's gradient sums over batch and heads):
    # gradients agree to fp32 summation error relative to their size, not elementwise at 1e-4
    errors = {
        name: ((compiled["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        for name, grad in eager["grads"].items()
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])
