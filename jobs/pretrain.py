"""Pretrain FLAVA on the ratio-mixed shard stream: ``python jobs/pretrain.py --config FILE [key=value ...]``.

Runs on the cluster of ``RAY_ADDRESS`` (as under ``ray job submit``), else starts a local Ray.
"""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.config import ConfigError, dump_config, parse_cli, redact_uri  # noqa: E402


def parse(argv: list[str] | None = None):
    return parse_cli(argv, description=__doc__)


def _terminate(signum, frame):
    """SIGTERM (``ray job stop``, a pod's shutdown) ends the job like Ctrl+C: the MLflow run is closed as
    KILLED and the last complete checkpoint stays the one a resubmission resumes from."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    config, args = parse(argv)
    from pipeline.train.launch import (
        InputError,
        failure_summary,
        resolve_paths,
        run_pretraining,
        validate_inputs,
    )

    try:
        config = resolve_paths(config)
        validate_inputs(config)  # fail fast, before starting Ray
        if args.dry_run:
            print(dump_config(config), end="")
            print("pretrain: inputs valid (dry run, nothing started)")
            return 0
        import ray.data

        init_ray(min_cpus=config.train.num_workers * config.train.cpus_per_worker + 1)
        ray.data.DataContext.get_current().enable_progress_bars = False  # the trainer prints progress
        result = run_pretraining(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"pretrain: bad input: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Ray has logged the workers' tracebacks; the cause goes last, on one line
        traceback.print_exc()
        print(f"pretrain: training failed: {failure_summary(e)}", file=sys.stderr)
        return 1
    print(
        f"pretrain: done, {result.metrics.get('step', '?')} steps; MLflow run {result.mlflow_run_id} at "
        f"{redact_uri(result.tracking_uri)}"
    )
    print(f"pretrain: checkpoints under {result.run_dir}")
    print(f"pretrain: exported model (transformers layout): {result.exported_model or 'not exported'}")
    for key in sorted(k for k in result.metrics if k.startswith("val/")):
        print(f"  {key} = {result.metrics[key]:.4f}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
