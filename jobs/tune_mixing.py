"""Sweep data mixing ratios with Ray Tune: ``python jobs/tune_mixing.py --config FILE [key=value ...]``.

Each trial is a short pretraining run (train.*) with its own ratios (and lr, if tune.lr_choices is set).
Rerunning the same command after an interruption resumes the sweep (same tune.storage_path and tune.name).
Runs on the cluster of ``RAY_ADDRESS`` (as under ``ray job submit``), else starts a local Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.config import ConfigError, dump_config, parse_cli  # noqa: E402


def parse(argv: list[str] | None = None):
    return parse_cli(argv, description=__doc__)


def main(argv: list[str] | None = None) -> int:
    config, args = parse(argv)
    from pipeline.train.launch import InputError
    from pipeline.tune.space import num_trials, param_space
    from pipeline.tune.sweep import resolve_paths, run_sweep, validate_sweep

    try:
        config = resolve_paths(config)
        validate_sweep(config)  # fail fast, before starting Ray
        if args.dry_run:
            print(dump_config(config), end="")
            searched = ", ".join(sorted(param_space(config)))
            print(f"tune_mixing: config valid, {num_trials(config)} trial(s) over {searched}")
            print("tune_mixing: dry run, nothing started")
            return 0
        init_ray()
        outcome = run_sweep(config)
    except (InputError, ConfigError) as e:
        print(f"tune_mixing: bad input: {e}", file=sys.stderr)
        return 2
    if outcome.interrupted:
        return 130
    return 0 if outcome.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
