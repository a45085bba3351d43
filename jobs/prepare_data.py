"""Convert raw data into shards: ``python jobs/prepare_data.py --config FILE [--strict] [--demo] [k=v ...]``.

``--demo`` generates the demo corpus and prepares ``<demo.root>/<kind>/{train,val}``; otherwise the
``prepare`` section names one source and its output. Works locally (starts its own Ray) and under
``ray job submit`` (connects to the cluster in RAY_ADDRESS).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cluster import init_ray  # noqa: E402
from pipeline.config import ConfigError, dump_config, parse_cli  # noqa: E402
from pipeline.paths import DEMO, PREPARE, absolute_paths  # noqa: E402
from pipeline.shards.format import ShardIntegrityError  # noqa: E402
from pipeline.shards.prepare import PrepareError, execute, format_report, plan  # noqa: E402
from pipeline.shards.sources import SourceError  # noqa: E402


def _flags(parser) -> None:
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first bad input instead of skipping"
    )
    parser.add_argument("--demo", action="store_true", help="generate and prepare the demo corpus (demo.*)")


def parse(argv: list[str] | None = None):
    config, args = parse_cli(argv, description=__doc__, add_arguments=_flags)
    if args.strict:
        config.prepare = dataclasses.replace(config.prepare, strict=True)
    return config, args


def main(argv: list[str] | None = None) -> int:
    config, args = parse(argv)
    start = time.perf_counter()
    try:
        config = absolute_paths(config, DEMO if args.demo else PREPARE)
        # listing first: a bad path fails in a second, before any Ray process starts
        plans = None if args.demo else plan(config.prepare, config.storage)
        if args.dry_run:
            print(dump_config(config))
            for p in plans or []:
                print(f"{p.dataset}: {sum(len(s) for s in p.shards)} records in {len(p.shards)} shards")
            return 0

        from pipeline.shards.demo import prepare_demo

        init_ray()
        report = prepare_demo(config) if args.demo else execute(plans, config.prepare, config.storage)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (SourceError, PrepareError, ShardIntegrityError, FileNotFoundError) as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    what = "listing and demo generation" if args.demo else "listing"
    print(f"total wall time including {what}: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
