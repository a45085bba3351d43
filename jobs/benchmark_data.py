"""Input-pipeline throughput: ``python jobs/benchmark_data.py [--config FILE] [key=value ...] [--workers W]``.

Runs the same shards (synthetic ones unless --dataset is given) and transforms through a single process
(the per-core bound), a torch DataLoader with W workers and Ray Data on W CPUs, and prints samples/s with
ratios. Targets: Ray Data >= DataLoader, and >= 70% of the per-core bound per CPU it uses.

With ``--cpu-only-node-cpus M``: the disaggregated benchmark (``pipeline.data.disaggregated``) on a local
cluster of a trainer node (W data CPUs) and a CPU-only node (M CPUs): a DataLoader with W workers against
Ray Data on the trainer node only and on both nodes (target > 1.3x), and the data-wait fraction of a short
training run without and with the CPU-only node.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_cli  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--kind", default="image_text", choices=["image_text", "image", "text"])
    parser.add_argument(
        "--dataset", default="", help="prepared dataset dir or s3:// URI (default: synthetic)"
    )
    parser.add_argument("--rows", type=int, default=1024, help="rows of the synthetic dataset")
    parser.add_argument("--image-size", type=int, default=224, help="image size of the synthetic dataset")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray CPUs")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path, interleaved")
    parser.add_argument("--epochs-per-round", type=int, default=2, help="consecutive epochs of a round")
    parser.add_argument("--prepare-rows", type=int, default=64, help="rows per prepare (map_batches) call")
    parser.add_argument(
        "--cpu-only-node-cpus", type=int, default=0, help="M > 0: the disaggregated benchmark, M CPUs"
    )
    parser.add_argument("--train-steps", type=int, default=20, help="steps of its training runs (0: none)")


def main(argv: list[str] | None = None) -> int:
    config, args = parse_cli(argv, __doc__, add_arguments)
    from pipeline.data import benchmark

    if args.dry_run:
        print(f"would benchmark {args.kind} ({args.dataset or 'synthetic'}) with {args.workers} workers")
        return 0
    with benchmark.benchmark_setup(
        config, args.kind, args.dataset, args.rows, args.image_size, args.prepare_rows
    ) as setup:
        if args.cpu_only_node_cpus:
            from pipeline.data import disaggregated

            rates, waits = disaggregated.run(
                setup,
                args.workers,
                args.cpu_only_node_cpus,
                args.rounds,
                args.epochs_per_round,
                args.train_steps,
            )
            print(disaggregated.format_tables(rates, waits))
        else:
            results = benchmark.run(setup, args.workers, args.rounds, args.epochs_per_round)
            print(benchmark.format_table(results, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
