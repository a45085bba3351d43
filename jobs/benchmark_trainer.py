"""Trainer overhead and data wait: ``python jobs/benchmark_trainer.py --config FILE [key=value ...]``.

Prints (1) the step time of one TorchTrainer worker against the same model and batches in a bare process,
plain and with the same FSDP2 setup (the framework's overhead: target under 10%) and (2) the data-wait
fraction of a pretraining run of the config, with its zero-shot retrieval at initialisation and at the
end (target: under 5%).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import parse_cli  # noqa: E402


def _flags(parser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="timed steps per step-time setup")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--skip-run", action="store_true", help="only the step-time table")


def parse(argv: list[str] | None = None):
    return parse_cli(argv, description=__doc__, add_arguments=_flags)


def main(argv: list[str] | None = None) -> int:
    config, args = parse(argv)
    import ray
    import ray.data

    from pipeline.train.benchmark import data_wait, step_time_table

    if not ray.is_initialized():
        needed = config.train.num_workers * config.train.cpus_per_worker + 1
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            num_cpus=max(os.cpu_count() or 1, needed),
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = step_time_table(config, args.steps, args.warmup)
    base, sharded = rows[0].mean, rows[1].mean
    print(
        f"\nstep time, preset {config.model.preset}, batch {config.data.batch_size}, "
        f"{config.train.cpus_per_worker} thread(s), the same {args.steps} timed steps in every setup"
    )
    print(f"{'setup':<34}{'mean s':>10}{'median s':>10}{'vs bare':>10}{'vs FSDP2':>10}")
    for row in rows:
        print(
            f"{row.setup:<34}{row.mean:>10.4f}{row.median:>10.4f}{row.mean / base - 1:>+10.1%}"
            f"{row.mean / sharded - 1:>+10.1%}"
        )
    if args.skip_run:
        return 0
    wait = data_wait(config)
    print(
        f"\npretraining run ({wait['steps']} steps, {config.train.num_workers} workers): "
        f"MLflow run {wait['mlflow_run_id']}"
    )
    print(f"{'metric':<40}{'value':>12}")
    for key, value in wait.items():
        if key not in ("mlflow_run_id", "exported_model"):
            print(f"{key:<40}{value:>12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
