"""Trainer overhead and data wait: ``python jobs/benchmark_trainer.py --config FILE [key=value ...]``.

Prints (1) the step time of one TorchTrainer worker against the same model and batches in a bare process,
plain and with the same FSDP2 setup (the framework's overhead in the step: target under 10%); (2) the
whole job (the config's pretraining run: Ray Train, Ray Data, mixing, MLflow, checkpoints) against
``train.num_workers`` bare ``torchrun`` FSDP2 processes training the same model on in-memory batches of
the same global batch, with where the difference goes (target: the framework's share under 5% of the bare
step), the run's data-wait fraction and its zero-shot retrieval at initialisation and at the end.
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
    parser.add_argument("--skip-step-table", action="store_true", help="only the whole-job table")


def parse(argv: list[str] | None = None):
    return parse_cli(argv, description=__doc__, add_arguments=_flags)


def main(argv: list[str] | None = None) -> int:
    config, args = parse(argv)
    import ray
    import ray.data

    from pipeline.train.benchmark import bare_torchrun, step_time_table, whole_job, whole_job_table

    bare = None if args.skip_run else bare_torchrun(config, config.train.steps)  # before Ray: cores its own
    if not ray.is_initialized():
        needed = config.train.num_workers * config.train.cpus_per_worker + 1
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            num_cpus=max(os.cpu_count() or 1, needed),
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not args.skip_step_table:
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
    if bare is None:
        return 0
    job = whole_job(config)
    print()
    print(whole_job_table(config, bare, job))
    print(f"\nMLflow run {job['mlflow_run_id']}")
    print(f"{'metric':<40}{'value':>12}")
    print(f"{'data_wait_fraction':<40}{job['data_wait_fraction']:>12.4f}")
    for key, value in job.items():
        if "@" in key:
            print(f"{key:<40}{value:>12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
