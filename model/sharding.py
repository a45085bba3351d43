"""FSDP2 for FLAVA, applied from outside the model: one communication group per transformer layer + root.

gloo and FSDP2 gradient averaging (pytorch/pytorch#162338): FSDP2 reduces fp32/bf16 gradients with
``ReduceOp.AVG``, which gloo in older torch releases silently executed as SUM, scaling every gradient by
the world size. torch 2.13's gloo averages correctly (measured: sharded/single-process update ratio
1.0000 with and without the setting below), but on gloo groups we still force SUM collectives with
FSDP's own post-division by the world size (``set_force_sum_reduction_for_comms``): correct on every
gloo build and nearly free on CPU. ``tests/model/test_distributed.py`` checks a sharded SGD step
against a single-process step on the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def shard_model(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    mixed_precision: bool | None = None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` in place (it must expose ``transformer_layers()``) and return it.

    mixed_precision: bf16 parameters/compute with fp32 gradient reduction; default on for CUDA, off
    (pure fp32) on CPU. LayerNorms compute in fp32 regardless (see ``model.layers.LayerNorm``).
    activation_checkpointing: recompute each transformer layer's activations in backward.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised torch.distributed process group")
    device_type = next(model.parameters()).device.type
    if mesh is None:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mixed_precision is None:
        mixed_precision = device_type == "cuda"
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    layers = model.transformer_layers()
    for layer in layers:
        if activation_checkpointing:
            checkpoint(layer)
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if dist.get_backend(mesh.get_group()) == "gloo":
        for module in (*layers, model):
            assert isinstance(module, FSDPModule)
            module.set_force_sum_reduction_for_comms(True)
    return model
