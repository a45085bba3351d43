"""``parallelize`` makes every transformer layer of every encoder its own FSDP2 unit, and the root one more.

The layers are found by walking the module tree for ``TransformerLayer``, not through the model's own
``transformer_layers()`` list that ``parallelize`` uses, so a layer that list forgot would show up here.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule

from model import build_flava
from model.layers import TransformerLayer
from model.sharding import parallelize


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = build_flava("tiny", text_vocab_size=64, max_position_embeddings=16)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, TransformerLayer)}
        parallelize(model)
        unwrapped = [name for name, m in layers.items() if not isinstance(m, FSDPModule)]
        units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        Path(out).write_text(json.dumps([sorted(layers), unwrapped, units]))
    finally:
        dist.destroy_process_group()


def test_every_transformer_layer_and_the_root_are_fsdp_units(tmp_path):
    out = tmp_path / "units.txt"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=1, join=True)
    layers, unwrapped, units = json.loads(out.read_text())
    prefixes = {name.split(".")[0] for name in layers}
    assert prefixes >= {"image_encoder", "text_encoder", "mm_encoder"}, prefixes
    assert unwrapped == []
    assert sorted(units) == sorted(["", *layers])  # nothing else is a unit: one group per layer + root
