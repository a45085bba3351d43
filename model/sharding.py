"""FSDP2 for FLAVA, applied from outside the model: one communication group per transformer layer + root.

``parallelize`` is the one place where precision, activation checkpointing, compilation and sharding are
decided, and it decides them the same way at every world size, 1 included (one rank is a mesh of one): a
run's numerics do not depend on how many ranks it has, and a checkpoint has the same layout whatever the
world size.

Precision (``precision``): ``fp32`` keeps parameters and compute in their own dtype; ``bf16`` is FSDP2's
mixed precision, bf16 parameters in forward/backward (all-gathered in bf16) with gradients reduced and
kept in fp32 against fp32 master weights; LayerNorms and losses compute in fp32 either way
(``model.layers.LayerNorm``, ``upcast``). bf16 is allowed on CPU too (gloo all-gathers bf16): it is slow
there on CPUs without bf16 units, but it is the way to check the GPU numerics on a laptop.

gloo and FSDP2 gradient averaging (pytorch/pytorch#162338): FSDP2 reduces fp32/bf16 gradients with
``ReduceOp.AVG``, which gloo in older torch releases silently executed as SUM, scaling every gradient by
the world size. torch 2.13's gloo averages correctly (measured: sharded/single-process update ratio
1.0000 with and without the setting below), but on gloo groups we still force SUM collectives with
FSDP's own post-division by the world size (``set_force_sum_reduction_for_comms``): correct on every
gloo build and nearly free on CPU. ``tests/model/test_distributed.py`` checks a sharded SGD step
against a single-process step on the same global batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

Precision = Literal["fp32", "bf16"]
PARAM_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
# entry points besides forward() that run the sharded root's parameters (zero-shot retrieval)
FORWARD_METHODS = ("encode_image", "encode_text")


def precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    if precision not in PARAM_DTYPES:
        raise ValueError(f"precision must be one of {sorted(PARAM_DTYPES)}, got {precision!r}")
    param_dtype = PARAM_DTYPES[precision]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)


def compile_layers(model: nn.Module) -> nn.Module:
    """``torch.compile`` each of ``model.transformer_layers()`` in place (``nn.Module.compile``): parameter
    names, and so checkpoints, stay as they are, and FSDP2's hooks on the layer still run (outside the
    compiled graph). Equal-shaped layers share one compiled graph; each new sequence length compiles once
    more. CPU (inductor's C++ backend) and CUDA (Triton) alike."""
    for layer in model.transformer_layers():
        layer.compile()
    return model


def parallelize(
    model: nn.Module,
    *,
    precision: Precision = "fp32",
    activation_checkpointing: bool = False,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    compile: bool = False,
) -> nn.Module:
    """Shards ``model`` in place over the process group (it must expose ``transformer_layers()``) and
    returns it: activation checkpointing per layer, ``compile_layers`` if asked, then ``fully_shard`` per
    layer and root with the precision's policy, then the extra forward methods registered so that they
    unshard the root too."""
    if not dist.is_initialized():
        raise RuntimeError(
            "parallelize needs an initialised torch.distributed process group (world 1 is fine)"
        )
    device_type = next(model.parameters()).device.type
    if mesh is None:
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = precision_policy(precision)
    layers = model.transformer_layers()
    for layer in layers:
        if activation_checkpointing:
            checkpoint(layer)
    if compile:
        compile_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    if dist.get_backend(mesh.get_group()) == "gloo":
        for module in (*layers, model):
            assert isinstance(module, FSDPModule)
            module.set_force_sum_reduction_for_comms(True)
    return model
