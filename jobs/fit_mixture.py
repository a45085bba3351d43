"""The mixture a regression over a finished sweep predicts best:
``python jobs/fit_mixture.py SWEEP_DIR [--model quadratic|gbm] [--config FILE] [key=value ...]``.

SWEEP_DIR is the sweep's ``tune.storage_path/tune.name`` (local or s3://). Writes ``SWEEP_DIR/mixture_fit/``
(mixture_fit.json, predicted_vs_actual.png, predicted_objective.png, recommended_config.yaml) and logs it
to the sweep's MLflow parent run. ``--config`` and overrides give the storage settings (S3 endpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_cli, redact_uri  # noqa: E402


def _flags(parser) -> None:
    from pipeline.tune.mixture_fit import MODELS

    parser.add_argument("sweep_dir", help="the sweep's tune.storage_path/tune.name")
    parser.add_argument("--model", default="quadratic", choices=MODELS, help="the regressor")
    parser.add_argument("--candidates", type=int, default=100_000, help="mixtures scored on the simplex")
    parser.add_argument("--top-k", type=int, default=100, help="best candidates averaged into the answer")


def main(argv: list[str] | None = None) -> int:
    config, args = parse_cli(argv, description=__doc__, add_arguments=_flags)
    from pipeline.tune.mixture_fit import TrialsError, format_fit, run_fit

    if args.dry_run:
        print(f"would fit the sweep at {args.sweep_dir} with the {args.model} model")
        return 0
    try:
        fit, where = run_fit(
            args.sweep_dir, config.storage, args.model, args.candidates, args.top_k, config.data.seed
        )
    except TrialsError as e:
        print(f"fit_mixture: {e}", file=sys.stderr)
        return 2
    print(format_fit(fit))
    for what, uri in where.items():
        print(f"fit_mixture: {what}: {redact_uri(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
