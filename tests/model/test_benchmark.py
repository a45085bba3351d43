"""The benchmark's measuring code runs for both implementations (numbers are printed, never asserted)."""

from __future__ import annotations

import math

from model.benchmark import BenchConfig, format_table, profile_one, time_both


def test_benchmark_measures_both_implementations_in_process():
    cfg = BenchConfig(preset="tiny", batch_size=2, text_length=8, steps=1, warmup=1)
    timing = time_both(cfg)
    results = [{**profile_one(impl, cfg), **timing[impl], "threads": 1} for impl in ("ours", "transformers")]
    for result in results:
        assert result["flops"] > 0 and result["step_s"] > 0 and math.isfinite(result["loss"])
        result["achieved_flops"] = result["flops"] / result["step_s"]
    assert (
        results[0]["flops"] == results[1]["flops"]
        or abs(results[0]["flops"] / results[1]["flops"] - 1) < 0.05
    )
    table = format_table(cfg, results, peak_flops=1e11)
    assert "ratio transformers/ours" in table
