"""Forward+backward time, peak memory and FLOP/s of our FLAVA vs transformers' FlavaForPreTraining.

Same synthetic image-text batch, same dimensions, random weights (the work does not depend on values).
Time: all implementations live in one process and their steps alternate (the order rotating every
round), so that they see the same machine load, which matters on a shared machine; each round also times
a dense matmul of the same dtype on the same device, and the median step and median matmul are reported.
Each step starts from ``zero_grad()`` (gradients set to None), as a training step does.
Peak memory: each implementation runs one step in its own fresh subprocess (after a compiling step for
a compiled row); on CPU the resident set's high-water mark over the step minus the resident set once the
model and inputs exist is what the step adds on top of the weights (activations, gradients, temporaries,
allocator slack), on CUDA the allocator's peak minus what was allocated before the step.
FLOPs of that step are counted with ``torch.utils.flop_counter`` (matmuls, convolutions, attention;
forward and backward) on the eager model (compiling does not change them); achieved FLOP/s divides them
by the median step time. ``precision="bf16"`` runs both implementations under ``torch.autocast`` (bf16
matmuls, fp32 weights), and the matmul reference is then bf16 too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.presets import build_flava
from model.sharding import compile_layers

COMPILED = "ours+compile"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "base"
    batch_size: int = 4
    text_length: int = 32
    steps: int = 2
    warmup: int = 1
    threads: int = 0  # 0: torch's default
    device: str = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # adds a row: ours with its transformer layers torch.compile'd

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}")
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {self.precision!r}")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind not in MATMUL_SIZE:
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")

    @property
    def implementations(self) -> tuple[str, ...]:
        return ("ours", "transformers", *((COMPILED,) if self.compile else ()))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock time measures the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (Linux ``clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of dense matmul FLOP/s (square, ``MATMUL_SIZE``): the practical peak for this workload."""
    size = MATMUL_SIZE[device.type]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
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
    """(step callable returning the loss, the model) for one implementation, on the configured device."""
    device = torch.device(cfg.device)
    with torch.device("meta"):  # the dimensions only: no second model in this process's peak memory
        spec = build_flava(cfg.preset).spec
    batch = image_text_batch(spec, cfg.batch_size, cfg.text_length)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if impl == "transformers":
        from transformers import FlavaConfig, FlavaForPreTraining

        from model.checkpoint import hf_config_from_spec

        hf_config = {k: v for k, v in hf_config_from_spec(spec).items() if k != "architectures"}
        model = FlavaForPreTraining(FlavaConfig(**hf_config)).to(device).train()
        inputs = {k: v for k, v in batch.items() if k != "kind"}

        def forward() -> torch.Tensor:  # a fresh mim_labels per step: the reference edits it in place
            return model(**{**inputs, "mim_labels": inputs["mim_labels"].clone()}).loss
    else:
        model = build_flava(cfg.preset).to(device).train()
        if impl == COMPILED:
            compile_layers(model)

        def forward() -> torch.Tensor:
            return model(batch).loss

    def step() -> torch.Tensor:
        model.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = forward()
        loss.backward()
        return loss

    return step, model


def profile_one(impl: str, cfg: BenchConfig) -> dict:
    """One step in this (fresh) process: its peak memory over the model and inputs, and its FLOPs."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    step, model = _step_function(impl, cfg)
    params = sum(p.numel() for p in model.parameters())
    if impl == COMPILED:
        step()  # compiles; the FLOPs are those of the eager "ours" row
        model.zero_grad()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = rss_mib()
        if not reset_peak_rss() and impl == COMPILED:
            raise RuntimeError("cannot reset the peak RSS after compiling (/proc/self/clear_refs refused)")
    counter = FlopCounterMode(display=False)
    with counter if impl != COMPILED else contextlib.nullcontext():
        step()
    synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - base
    else:
        peak = peak_rss_mib() - base
    return {
        "impl": impl,
        "params": params,
        "peak_mib": peak,
        "flops": counter.get_total_flops() if impl != COMPILED else None,
    }


def time_all(cfg: BenchConfig) -> tuple[dict[str, dict], float]:
    """Median step time of each implementation, their steps interleaved under the same load, and the
    median over rounds of the matmul FLOP/s measured between them."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(cfg.device), DTYPES[cfg.precision]
    impls = cfg.implementations
    steps = {impl: _step_function(impl, cfg)[0] for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    losses: dict[str, float] = {}
    matmul: list[float] = []
    for round_ in range(cfg.warmup + cfg.steps):
        shift = round_ % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            synchronize(device)
            start = time.perf_counter()
            loss = steps[impl]()
            synchronize(device)
            if round_ >= cfg.warmup:
                times[impl].append(time.perf_counter() - start)
            losses[impl] = loss.item()
        if round_ >= cfg.warmup:
            matmul.append(matmul_flops(device, dtype))
    timing = {impl: {"step_s": statistics.median(times[impl]), "loss": losses[impl]} for impl in impls}
    return timing, statistics.median(matmul)


def run(cfg: BenchConfig, timeout_s: float = 1800) -> tuple[list[dict], float]:
    """Memory and FLOPs in one subprocess per implementation, then the interleaved timing here."""
    results = []
    for impl in cfg.implementations:
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
    print("timing all, interleaved ...", file=sys.stderr, flush=True)
    timing, peak_flops = time_all(cfg)
    return combine(results, timing), peak_flops


def combine(results: list[dict], timing: dict[str, dict]) -> list[dict]:
    """Profiles plus timing; a compiled row counts the FLOPs of the eager model."""
    flops = {r["impl"]: r["flops"] for r in results}
    for result in results:
        result.update(timing[result["impl"]], threads=torch.get_num_threads())
        if result["flops"] is None:
            result["flops"] = flops["ours"]
        result["achieved_flops"] = result["flops"] / result["step_s"]
    return results


def format_table(cfg: BenchConfig, results: list[dict], peak_flops: float) -> str:
    by_impl = {r["impl"]: r for r in results}
    ref = by_impl["transformers"]
    where = "CPU, {} threads".format(results[0]["threads"]) if cfg.device == "cpu" else cfg.device
    precision = "fp32" if cfg.precision == "fp32" else "bf16 autocast"
    size = MATMUL_SIZE[torch.device(cfg.device).type]
    lines = [
        f"FLAVA {cfg.preset}, image-text batch {cfg.batch_size} (text length {cfg.text_length}), "
        f"forward+backward, {precision}, {where}, median of {cfg.steps} interleaved steps "
        f"after {cfg.warmup} warm-up",
        f"machine: dense {cfg.precision} matmul ({size}^3) {peak_flops / 1e9:.1f} GFLOP/s, median over the "
        "rounds (measured between the steps)",
        f"{'':14}{'params':>10}{'step s':>10}{'peak MiB':>10}{'GFLOP':>10}{'GFLOP/s':>10}{'of matmul':>11}"
        f"{'loss':>9}{'ref/this':>10}",
    ]
    for r in results:
        lines.append(
            f"{r['impl']:14}{r['params'] / 1e6:>9.1f}M{r['step_s']:>10.3f}{r['peak_mib']:>10.0f}"
            f"{r['flops'] / 1e9:>10.1f}{r['achieved_flops'] / 1e9:>10.1f}"
            f"{r['achieved_flops'] / peak_flops:>11.0%}{r['loss']:>9.3f}{ref['step_s'] / r['step_s']:>9.2f}x"
        )
    ours = by_impl["ours"]
    # a tiny model's step may not raise the resident-set high-water mark at all
    memory = f"{ref['peak_mib'] / ours['peak_mib']:.2f}x" if ours["peak_mib"] > 0 else "n/a"
    lines.append(
        f"ratio transformers/ours: time {ref['step_s'] / ours['step_s']:.2f}x, "
        f"peak memory {memory} (> 1: ours is faster / smaller)"
    )
    lines.append(
        "ref/this = transformers' step time / this row's; peak MiB = what one step adds on top of the model "
        "and inputs (CPU: resident-set high-water mark; CUDA: allocator peak)"
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
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    parser.add_argument("--precision", choices=sorted(DTYPES), default=defaults.precision)
    parser.add_argument("--compile", action="store_true", help="add a row: ours, layers torch.compile'd")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        preset=args.preset,
        batch_size=args.batch_size,
        text_length=args.text_length,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
    )


if __name__ == "__main__":  # the per-implementation subprocess
    worker = argparse.ArgumentParser()
    worker.add_argument("--worker", required=True)
    worker.add_argument("--config", required=True)
    parsed = worker.parse_args()
    print(json.dumps(profile_one(parsed.worker, BenchConfig(**json.loads(parsed.config)))))
