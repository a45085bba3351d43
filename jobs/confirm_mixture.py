"""Confirm a fitted mixture by training it: ``python jobs/confirm_mixture.py SWEEP_DIR [--steps N]
[--online] [--config FILE] [key=value ...]``.

Trains, with the same steps, seed and settings, the mixture ``jobs/fit_mixture.py`` recommended, the
sweep's best sampled trial's mixture and the natural (size-proportional) one (with ``--online`` also
``data.mixing=doremi``, the natural run as its reference, and ``bandit``, both starting from the natural
mixture), then prints one table of their ``val/objective`` and its terms (also written to
``SWEEP_DIR/mixture_fit/confirmation.txt``). ``--config`` and overrides give the storage settings (S3
endpoint). Runs on the cluster of ``RAY_ADDRESS`` (as under ``ray job submit``), else starts a local Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_cli  # noqa: E402


def _flags(parser) -> None:
    parser.add_argument("sweep_dir", help="the sweep's tune.storage_path/tune.name, fitted by fit_mixture.py")
    parser.add_argument("--steps", type=int, default=0, help="train.steps of each run (default: the sweep's)")
    parser.add_argument(
        "--online", action="store_true", help="also data.mixing=doremi and bandit, from the natural mixture"
    )


def main(argv: list[str] | None = None) -> int:
    config, args = parse_cli(argv, description=__doc__, add_arguments=_flags)
    from pipeline.cluster import init_ray
    from pipeline.config import ConfigError
    from pipeline.train.launch import InputError
    from pipeline.tune.confirm import confirmation_configs, run_confirmation
    from pipeline.tune.mixture_fit import TrialsError

    try:
        configs = confirmation_configs(args.sweep_dir, config.storage)
        if args.dry_run:
            for which, c in configs.items():
                print(f"would train {which}: {c.train.run_name} with ratios {c.data.ratios}")
            return 0
        init_ray()
        table, _ = run_confirmation(args.sweep_dir, config.storage, args.steps, args.online)
    except (TrialsError, InputError, ConfigError) as e:
        print(f"confirm_mixture: bad input: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
