"""Our FLAVA against transformers' fp32 FlavaForPreTraining on each test device, in fp32 and in bf16.

Devices: ``FLAVA_TEST_DEVICES`` (comma-separated, default ``cpu``; ``scripts/gpu-check`` sets ``cuda``),
so the CUDA check is the code the CPU suite runs. Identical non-trivial weights (as in test_parity); ours
is ``parallelize``d at world size 1 (gloo on CPU, NCCL on CUDA) with a training precision: fp32, or
FSDP2's bf16 (bf16 parameters and matmuls, fp32 LayerNorms and losses). The reference runs fp32 on the
same device, TF32 off. Tolerances are relative errors over all losses, and over all gradients together:
fp32 1e-4; bf16 0.05 (13 bf16 epsilons, the bound test_precision justifies).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from flava_batches import make_batch, perturbed_reference, reference_call
from transformers import FlavaForPreTraining

from model import load_hf_checkpoint
from model.checkpoint import to_hf_state
from model.config import LOSSES_BY_KIND
from model.sharding import parallelize

DEVICES = os.environ.get("FLAVA_TEST_DEVICES", "cpu").split(",")
TOLERANCE = {"fp32": 1e-4, "bf16": 0.05}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert got.keys() == expected.keys()
    a = torch.cat([got[k].double().flatten() for k in expected])
    b = torch.cat([expected[k].double().flatten() for k in expected])
    return float((a - b).norm() / b.norm())


def worker(rank: int, device_name: str, port: int, checkpoint: str, out: str) -> None:
    device = torch.device(device_name)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        hf = FlavaForPreTraining.from_pretrained(checkpoint).to(device).eval()
        spec = load_hf_checkpoint(checkpoint).spec
        batch = make_batch("image_text", spec, batch_size=4, seed=4)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ref = reference_call(hf, batch)
        ref.loss.backward()
        named = hf.named_parameters(remove_duplicate=False)  # tied head biases under their decoder name
        results = {
            "reference": {
                "losses": {k: getattr(ref.loss_info, k).detach().cpu() for k in LOSSES_BY_KIND["image_text"]},
                "grads": {
                    n: p.grad.cpu() for n, p in named if p.grad is not None and not n.endswith("head.bias")
                },
            }
        }
        for precision in TOLERANCE:
            ours = parallelize(load_hf_checkpoint(checkpoint).to(device).eval(), precision=precision)
            output = ours(batch)
            output.loss.backward()
            grads = {n: p.grad.full_tensor().cpu() for n, p in ours.named_parameters() if p.grad is not None}
            results[precision] = {
                "losses": {k: v.detach().float().cpu() for k, v in output.losses.items()},
                "grads": to_hf_state(grads),
            }
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    perturbed_reference().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=DEVICES)
def observed(request, checkpoint, tmp_path_factory) -> dict:
    device = request.param
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"FLAVA_TEST_DEVICES names {device} but torch.cuda.is_available() is False")
    out = tmp_path_factory.mktemp("device") / "results.pt"
    mp.spawn(worker, args=(device, free_port(), str(checkpoint), str(out)), nprocs=1, join=True)
    return torch.load(out)


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_losses_and_gradients_match_the_fp32_reference(observed, precision):
    ours, ref = observed[precision], observed["reference"]
    loss_error = relative_error(ours["losses"], ref["losses"])
    grad_error = relative_error(ours["grads"], ref["grads"])
    print(f"{precision}: loss relative error {loss_error:.2e}, gradient relative error {grad_error:.2e}")
    assert loss_error < TOLERANCE[precision], loss_error
    assert grad_error < TOLERANCE[precision], grad_error
