"""Benchmark our FLAVA against transformers' FlavaForPreTraining (time, peak memory, FLOP/s) in one run.

``python jobs/benchmark_model.py [--preset base] [--batch-size 4] [--text-length 32] [--steps 2]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.benchmark import add_arguments, config_from_args, format_table, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    results, peak_flops = run(cfg)
    print(format_table(cfg, results, peak_flops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
