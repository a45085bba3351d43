"""Two gloo processes vs one process on the concatenated batch: global contrastive and an FSDP2 step.

Every row of the test batches has the same number of targets, so the data-parallel mean of per-rank
losses is exactly the global-batch loss. Everything runs in float64 so that the only difference left,
float reassociation, stays far below the tolerances (fp32 noise is amplified by the L2 normalisation of
near-zero freshly initialised embeddings).
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

WORLD = 2
CONTRASTIVE_ONLY = {"mim": 0, "mlm": 0, "itm": 0, "mmm_image": 0, "mmm_text": 0}


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def tiny(**overrides):
    torch.manual_seed(0)
    return build_flava("tiny", text_vocab_size=64, max_position_embeddings=16, **overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def local_rows(batch: dict, rank: int) -> dict:
    per_rank = batch["mlm_labels"].shape[0] // WORLD
    return slice_batch(batch, slice(rank * per_rank, (rank + 1) * per_rank))


def pair_batch(spec):
    """One ITM negative per rank (rows 1 and 3) keeps the positive counts balanced."""
    return make_batch("image_text", spec, batch_size=4, seed=7, negatives=(1, 3))


def contrastive_on_rank(rank: int, out: str) -> None:
    model = tiny(loss_weights=CONTRASTIVE_ONLY)
    result = model(local_rows(pair_batch(model.spec), rank))
    result.loss.backward()
    loss = result.loss.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # explicit SUM / world: no reliance on AVG
            grads[name] = p.grad / WORLD
    if rank == 0:
        torch.save({"loss": loss / WORLD, "grads": grads}, out)


def test_global_contrastive_two_ranks_equals_one_process(two_rank_results):
    dist_result = torch.load(two_rank_results / "contrastive.pt")

    model = tiny(loss_weights=CONTRASTIVE_ONLY)
    result = model(pair_batch(model.spec))
    result.loss.backward()
    torch.testing.assert_close(dist_result["loss"], result.loss.detach(), rtol=1e-9, atol=1e-12)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert dist_result["grads"].keys() == grads.keys()
    assert "logit_scale" in grads and "image_encoder.patch_embed.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(
            dist_result["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )


def train_steps(model, rank: int | None) -> None:
    """Two SGD steps (SGD, not Adam: a gradient scaled by the world size must show in the update)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for kind in ("image_text", "text"):
        batch = pair_batch(model.spec) if kind == "image_text" else make_batch("text", model.spec, seed=8)
        model(batch if rank is None else local_rows(batch, rank)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fsdp_on_rank(rank: int, out: str) -> None:
    model = parallelize(tiny(), activation_checkpointing=True)
    train_steps(model, rank)
    state = {name: p.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(state, out)


def bf16_on_rank(rank: int, out: str) -> None:
    """``precision=bf16`` (bf16 compute, fp32 reduction), exercised on CPU: finite and near fp64."""
    batch = local_rows(pair_batch(tiny().spec), rank)
    reference = tiny()(batch).loss.detach()  # fp64, unsharded, same all-gathered contrastive columns
    model = parallelize(tiny(), precision="bf16", reshard_after_forward=False)
    loss = model(batch).loss
    loss.backward()
    grads_finite = all(
        torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters() if p.grad is not None
    )
    if rank == 0:
        torch.save({"loss": loss.detach(), "reference": reference, "grads_finite": grads_finite}, out)


def worker(rank: int, port: int, out_dir: str) -> None:
    """All checks in one spawn: starting two Python+torch processes is most of the cost."""
    init(rank, port)
    contrastive_on_rank(rank, f"{out_dir}/contrastive.pt")
    fsdp_on_rank(rank, f"{out_dir}/fsdp.pt")
    bf16_on_rank(rank, f"{out_dir}/bf16.pt")
    dist.barrier()  # neither rank tears gloo down while the other still uses it (that aborts the process)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return out_dir


def test_fsdp2_step_on_two_ranks_equals_single_process_step(two_rank_results):
    sharded = torch.load(two_rank_results / "fsdp.pt")

    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, None)
    moved = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            sharded[name], p.detach(), rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved += not torch.equal(p, before[name])
    assert moved > len(before) // 2  # the steps really changed the weights being compared


def test_bf16_mixed_precision_policy_runs_and_stays_close(two_rank_results):
    result = torch.load(two_rank_results / "bf16.pt")
    assert result["grads_finite"]
    torch.testing.assert_close(result["loss"].double(), result["reference"], rtol=1e-2, atol=0)
