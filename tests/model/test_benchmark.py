"""The benchmark's measuring code runs for every row (numbers are printed, never asserted).

At tiny size on CPU, in fp32 with the torch.compile'd row: the code paths of ``jobs/benchmark_model.py``
and ``scripts/gpu-check``'s benchmark, short of the CUDA synchronisation and allocator statistics. bf16 on
CPU takes minutes even at tiny size; ``tests/model/test_device_parity.py`` covers its numbers.
"""

from __future__ import annotations

import math

import pytest

from model.benchmark import COMPILED, BenchConfig, combine, format_table, profile_one, time_all


def test_benchmark_measures_every_row_in_process():
    cfg = BenchConfig(preset="tiny", batch_size=2, text_length=8, steps=1, warmup=1, compile=True)
    assert COMPILED in cfg.implementations
    timing, peak_flops = time_all(cfg)
    results = combine([profile_one(impl, cfg) for impl in cfg.implementations], timing)
    flops = {r["impl"]: r["flops"] for r in results}
    for result in results:
        assert result["flops"] > 0 and result["step_s"] > 0 and math.isfinite(result["loss"])
    assert abs(flops["ours"] / flops["transformers"] - 1) < 0.05
    table = format_table(cfg, results, peak_flops)
    assert "ratio transformers/ours" in table and len(table.splitlines()) == 5 + len(results)


def test_a_bad_benchmark_config_is_refused():
    with pytest.raises(ValueError, match="precision"):
        BenchConfig(precision="fp16")
    with pytest.raises(ValueError, match="device"):
        BenchConfig(device="tpu")
