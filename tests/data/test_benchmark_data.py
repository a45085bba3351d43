"""The input-pipeline benchmarks' code paths at tiny size (their numbers are measured, never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ("--rows", "64", "--image-size", "64", "--rounds", "1", "data.batch_size=8")


def benchmark_data(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "jobs/benchmark_data.py", *TINY, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""},  # its own Ray, not the suite's
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_benchmark_runs_every_path_and_prints_the_ratios():
    stdout = benchmark_data("--epochs-per-round", "2")
    rates = dict(re.findall(r"^(single process|torch DataLoader|Ray Data) .*?(\d+\.\d)\s", stdout, re.M))
    assert set(rates) == {"single process", "torch DataLoader", "Ray Data"}, stdout
    assert all(float(rate) > 0 for rate in rates.values())
    assert re.search(r"Ray Data / DataLoader: \d+\.\d\dx", stdout), stdout


def test_disaggregated_benchmark_feeds_ray_data_from_both_nodes():
    """The trainer node's DataLoader against Ray Data on the trainer node and a CPU-only node (training
    runs left out: two Ray Train start-ups would triple the test's time)."""
    stdout = benchmark_data(
        *("--epochs-per-round", "1", "--workers", "1", "--cpu-only-node-cpus", "1", "--train-steps", "0")
    )
    paths = (
        r"torch DataLoader \(1 workers, trainer node\)|Ray Data \(1 CPUs, trainer node only\)"
        r"|Ray Data \(1\+1 CPUs, 2 nodes\)"
    )
    rates = dict(re.findall(rf"^({paths})\s+(\d+\.\d)$", stdout, re.M))
    assert len(rates) == 3, stdout
    assert all(float(rate) > 0 for rate in rates.values()), stdout
    assert re.search(r"^Ray Data / DataLoader: \d+\.\d\dx .* gain to Ray Data: \d+\.\d\dx$", stdout, re.M), (
        stdout
    )
