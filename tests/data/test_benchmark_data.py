"""The input-pipeline benchmark's code paths at tiny size (its numbers are measured, never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_runs_every_path_and_prints_the_ratios():
    done = subprocess.run(
        [
            sys.executable,
            "jobs/benchmark_data.py",
            *("--rows", "64", "--image-size", "64", "--rounds", "1", "--epochs-per-round", "2"),
            "data.batch_size=8",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""},  # its own Ray, not the suite's
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rates = dict(re.findall(r"^(single process|torch DataLoader|Ray Data) .*?(\d+\.\d)\s", done.stdout, re.M))
    assert set(rates) == {"single process", "torch DataLoader", "Ray Data"}, done.stdout
    assert all(float(rate) > 0 for rate in rates.values())
    assert re.search(r"Ray Data / DataLoader: \d+\.\d\dx", done.stdout), done.stdout
