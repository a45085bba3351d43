"""The bare baseline of ``jobs/benchmark_trainer.py``: each ``torchrun`` process trains the job's model
with FSDP2 on batches it holds in memory, and nothing else (no Ray, no data pipeline, no tracking, no
checkpoints): what the whole job is compared with.

``python -m torch.distributed.run --standalone --nproc_per_node N -m pipeline.train.torchrun_baseline
PAYLOAD OUT`` (PAYLOAD: a pickle written by ``benchmark.bare_torchrun``; rank 0 writes its seconds and CPU
seconds per step to OUT as JSON).
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import torch.distributed as dist

from pipeline.config import from_dict
from pipeline.train.benchmark import sharded_step_times


def main(payload_path: str, out_path: str) -> None:
    payload = pickle.loads(Path(payload_path).read_bytes())
    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    try:
        rank, cpu = dist.get_rank(), []
        times = sharded_step_times(
            from_dict(payload["config"]), payload["vocab"], payload["batches"][rank], payload["warmup"], cpu
        )
        if rank == 0:
            Path(out_path).write_text(json.dumps({"times": times, "cpu": cpu}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
