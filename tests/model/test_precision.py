"""``parallelize(precision=...)`` decides parameter and compute dtype the same way at every world size.

Observed, not configured: a forward pre-hook records the dtype of a transformer layer's weight as forward
sees it, and a wrapper of ``torch.distributed.reduce_scatter_single`` (what FSDP2 reduces gradients with)
records the dtype of the gradients being reduced; the gradients the optimizer then sees are checked too.
World 1 (a one-rank mesh, no reduce-scatter to observe) and world 2, each precision, on gloo.

The gradients themselves are compared with a single-process fp64 backward over the same global batch of
4 rows, by the relative error over all gradients together, ``|g - g64| / |g64|``: fp32 within 1e-5
(measured 2e-6); bf16 within 0.05, i.e. 13 bf16 epsilons (2**-8), as the inputs of every matmul are
rounded to 8 significant bits: measured 0.014 to 0.032 over 9 batches (3 seeds x 2, 4, 8 rows). Single
tensors are not held to it: a bias whose gradient nearly cancels over the rows (the ITM classifier's)
can be off by 100% in bf16 while its share of the step is nil. A gradient summed instead of averaged
across 2 ranks is off by 100% everywhere.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from flava_batches import make_batch, slice_batch

from model import build_flava
from model.sharding import parallelize

PRECISIONS = ("fp32", "bf16")
GRAD_TOLERANCE = {"fp32": 1e-5, "bf16": 0.05}
GLOBAL_ROWS = 4


def tiny_model():
    torch.manual_seed(0)
    return build_flava("tiny", text_vocab_size=64, max_position_embeddings=16)


def global_batch(spec) -> dict:
    return make_batch("image_text", spec, batch_size=GLOBAL_ROWS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def observe(precision: str) -> dict:
    """One forward/backward of a parallelized tiny FLAVA; the dtypes seen on the way."""
    model = tiny_model()
    layer = model.transformer_layers()[0]
    seen: dict[str, set] = {"forward": set(), "reduce": set()}
    linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_pre_hook(lambda module, args: seen["forward"].add(str(module.weight.dtype)))
    original = dist.reduce_scatter_single

    def recording(output, input, *args, **kwargs):
        seen["reduce"].add(str(input.dtype))
        return original(output, input, *args, **kwargs)

    dist.reduce_scatter_single = recording
    try:
        model = parallelize(model, precision=precision)
        rank, world = dist.get_rank(), dist.get_world_size()
        share = GLOBAL_ROWS // world
        model(slice_batch(global_batch(model.spec), slice(rank * share, (rank + 1) * share))).loss.backward()
    finally:
        dist.reduce_scatter_single = original
    grads = {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
    params = {str(p.dtype) for p in model.parameters()}
    gradients = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    return {
        "forward": seen["forward"],
        "reduce": seen["reduce"],
        "grads": grads,
        "params": params,
        "gradients": gradients,
    }


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {precision: observe(precision) for precision in PRECISIONS}
    if rank == 0:
        torch.save(results, f"{out_dir}/world{world}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("precision")
    for world in (1, 2):
        mp.spawn(worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return {world: torch.load(Path(out) / f"world{world}.pt") for world in (1, 2)}


@pytest.mark.parametrize("world", [1, 2])
def test_fp32_runs_and_reduces_in_fp32_at_every_world_size(observed, world):
    seen = observed[world]["fp32"]
    assert seen["forward"] == {"torch.float32"}
    assert seen["grads"] == seen["params"] == {"torch.float32"}
    assert seen["reduce"] == ({"torch.float32"} if world > 1 else set())  # one rank: nothing to reduce


@pytest.mark.parametrize("world", [1, 2])
def test_bf16_computes_in_bf16_and_reduces_in_fp32_at_every_world_size(observed, world):
    seen = observed[world]["bf16"]
    assert seen["forward"] == {"torch.bfloat16"}  # parameters as forward sees them
    assert seen["params"] == seen["grads"] == {"torch.float32"}  # fp32 master weights and gradients
    assert seen["reduce"] == ({"torch.float32"} if world > 1 else set())


def fp64_gradients() -> dict[str, torch.Tensor]:
    """The reference: the unsharded model in fp64, one process, the whole global batch."""
    model = tiny_model().double()
    batch = global_batch(model.spec)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    model(batch).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("world", [1, 2])
def test_gradients_match_a_single_process_fp64_backward(observed, world):
    reference = fp64_gradients()
    expected = torch.cat([g.flatten() for g in reference.values()])
    for precision, tolerance in GRAD_TOLERANCE.items():
        gradients = observed[world][precision]["gradients"]
        assert gradients.keys() == reference.keys(), precision
        got = torch.cat([gradients[name].double().flatten() for name in reference])
        error = float((got - expected).norm() / expected.norm())
        assert error < tolerance, (precision, error)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        from model.sharding import precision_policy

        precision_policy("fp16")
