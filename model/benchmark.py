"""Forward+backward time, peak memory and FLOP/s of our FLAVA vs transformers' FlavaForPreTraining.

Same synthetic image-text batch, same dimensions, random weights (the work does not depend on values).
Time: both models live in one process and their steps alternate (the order swapping every round), so
that both see the same machine load, which matters on a shared machine; the median step is reported.
Peak memory: each implementation runs one step in its own fresh subprocess, and the kernel's
``ru_maxrss`` at the end minus the resident set size once the model and inputs exist is what a training
step adds on top of the weights (activations, gradients, temporaries, allocator slack), measured the
same way for both. FLOPs of that step are counted with ``torch.utils.flop_counter`` (matmuls,
convolutions, attention; forward and backward); achieved FLOP/s divides them by the median step time
and is compared with a dense fp32 matmul measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.presets import build_flava

IMPLEMENTATIONS = ("ours", "transformers")


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "base"
    batch_size: int = 4
    text_length: int = 32
    steps: int = 2
    warmup: int = 1
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """Best-of dense fp32 matmul FLOP/s: the machine's practical peak for this workload."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def image_text_batch(spec, batch_size: int, text_length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = spec.num_patches
    ids = torch.randint(5, spec.text_vocab_size, (batch_size, text_length), generator=g)
    mask = torch.ones_like(ids)
    mask[: batch_size // 2, text_length // 2 :] = 0  # half the captions padded to half length
    labels = torch.full_like(ids, -100)
    labels[:, 1:5] = ids[:, 1:5]
    masked = ids.clone()
    masked[:, 1:5] = 4
    itm = torch.ones(batch_size, dtype=torch.long)
    itm[batch_size // 2 :: 2] = 0
    return {
        "kind": "image_text",
        "pixel_values": torch.randn(batch_size, 3, spec.image_size, spec.image_size, generator=g),
        "bool_masked_pos": torch.rand(batch_size, n, generator=g) < 75 / 196,
        "mim_labels": torch.randint(0, spec.mim_vocab_size, (batch_size, n), generator=g),
        "input_ids": ids,
        "input_ids_masked": masked,
        "attention_mask": mask,
        "mlm_labels": labels,
        "itm_labels": itm,
    }


def _step_function(impl: str, cfg: BenchConfig):
    """(step callable returning the loss, parameter count) for one implementation."""
    with torch.device("meta"):  # the dimensions only: no second model in this process's peak memory
        spec = build_flava(cfg.preset).spec
    batch = image_text_batch(spec, cfg.batch_size, cfg.text_length)
    if impl == "ours":
        model = build_flava(cfg.preset).train()
        return (lambda: model(batch).loss), sum(p.numel() for p in model.parameters())
    from transformers import FlavaConfig, FlavaForPreTraining

    from model.checkpoint import hf_config_from_spec

    hf_config = {k: v for k, v in hf_config_from_spec(spec).items() if k != "architectures"}
    model = FlavaForPreTraining(FlavaConfig(**hf_config)).train()
    inputs = {k: v for k, v in batch.items() if k != "kind"}

    def step() -> torch.Tensor:  # a fresh mim_labels per step: the reference edits it in place
        return model(**{**inputs, "mim_labels": inputs["mim_labels"].clone()}).loss

    return step, sum(p.numel() for p in model.parameters())


def profile_one(impl: str, cfg: BenchConfig) -> dict:
    """One step in this (fresh) process: its peak memory over the model and inputs, and its FLOPs."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    step, params = _step_function(impl, cfg)
    base_rss = rss_mib()
    counter = FlopCounterMode(display=False)
    with counter:
        step().backward()
    return {
        "impl": impl,
        "params": params,
        "peak_mib": max_rss_mib() - base_rss,
        "flops": counter.get_total_flops(),
    }


def time_both(cfg: BenchConfig) -> dict[str, dict]:
    """Median step time of each implementation, their steps interleaved under the same load."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    steps = {impl: _step_function(impl, cfg)[0] for impl in IMPLEMENTATIONS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
    losses: dict[str, float] = {}
    for round_ in range(cfg.warmup + cfg.steps):
        for impl in IMPLEMENTATIONS[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            loss = steps[impl]()
            loss.backward()
            losses[impl] = loss.item()
            if round_ >= cfg.warmup:
                times[impl].append(time.perf_counter() - start)
    return {
        impl: {"step_s": statistics.median(times[impl]), "loss": losses[impl]} for impl in IMPLEMENTATIONS
    }


def run(cfg: BenchConfig, timeout_s: float = 1800) -> tuple[list[dict], float]:
    """Memory and FLOPs in one subprocess per implementation, then the interleaved timing here, then the
    machine's matmul FLOP/s with the same thread count."""
    results = []
    for impl in IMPLEMENTATIONS:
        print(f"profiling {impl} (memory, FLOPs) ...", file=sys.stderr, flush=True)
        args = [
            sys.executable,
            "-m",
            "model.benchmark",
            "--worker",
            impl,
            "--config",
            json.dumps(cfg.__dict__),
        ]
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            cwd=Path(__file__).parents[1],
        )
        if done.returncode:
            raise RuntimeError(f"benchmark of {impl} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("timing both, interleaved ...", file=sys.stderr, flush=True)
    timing = time_both(cfg)
    for result in results:
        result.update(timing[result["impl"]], threads=torch.get_num_threads())
        result["achieved_flops"] = result["flops"] / result["step_s"]
    return results, matmul_flops()


def format_table(cfg: BenchConfig, results: list[dict], peak_flops: float) -> str:
    ours, ref = results
    lines = [
        f"FLAVA {cfg.preset}, image-text batch {cfg.batch_size} (text length {cfg.text_length}), "
        f"forward+backward, fp32 CPU, {ours['threads']} threads, median of {cfg.steps} interleaved steps "
        f"after {cfg.warmup} warm-up",
        f"machine: dense fp32 matmul (2048^3) {peak_flops / 1e9:.1f} GFLOP/s",
        f"{'':14}{'params':>10}{'step s':>10}{'peak MiB':>10}{'GFLOP':>10}{'GFLOP/s':>10}{'of matmul':>11}"
        f"{'loss':>9}",
    ]
    for r in results:
        lines.append(
            f"{r['impl']:14}{r['params'] / 1e6:>9.1f}M{r['step_s']:>10.2f}{r['peak_mib']:>10.0f}"
            f"{r['flops'] / 1e9:>10.0f}{r['achieved_flops'] / 1e9:>10.1f}"
            f"{r['achieved_flops'] / peak_flops:>11.0%}{r['loss']:>9.3f}"
        )
    lines.append(
        f"ratio transformers/ours: time {ref['step_s'] / ours['step_s']:.2f}x, "
        f"peak memory {ref['peak_mib'] / ours['peak_mib']:.2f}x (> 1: ours is faster / smaller)"
    )
    lines.append(
        "peak MiB = max RSS of a fresh process running one step minus its RSS once model and inputs "
        "exist (activations, gradients, temporaries)"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig()
    parser.add_argument("--preset", default=defaults.preset)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--text-length", type=int, default=defaults.text_length)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="0: torch default")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        preset=args.preset,
        batch_size=args.batch_size,
        text_length=args.text_length,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
    )


if __name__ == "__main__":  # the per-implementation subprocess
    worker = argparse.ArgumentParser()
    worker.add_argument("--worker", choices=IMPLEMENTATIONS, required=True)
    worker.add_argument("--config", required=True)
    parsed = worker.parse_args()
    print(json.dumps(profile_one(parsed.worker, BenchConfig(**json.loads(parsed.config)))))
