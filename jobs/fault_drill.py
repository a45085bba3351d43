"""Fault drills: ``python jobs/fault_drill.py [--only NAME,NAME] [--work DIR]``.

Each scenario injects one real fault into a real pretraining run on a local Ray cluster of several nodes
(a Train worker killed or stopped, a node preempted or joining, a checkpoint cut off, a shard damaged, S3
going away, ``ray job stop``) and the table says what had to happen, what did, the steps redone, the
samples lost and the time to recover.
Exits 1 if any scenario did not end as it must.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.drills.harness import FAST_RESTART_ENV, prepare_workspace  # noqa: E402
from pipeline.drills.judge import format_table  # noqa: E402
from pipeline.drills.nodes import LocalCluster  # noqa: E402
from pipeline.drills.runner import SCENARIOS, run_drills  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated, of: {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--work", default="", help="scratch directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="flava-drills-")).resolve()
    # the drills' S3 is a local moto server: dummy credentials, set before Ray starts so workers inherit them
    os.environ.update(
        AWS_ACCESS_KEY_ID="drill", AWS_SECRET_ACCESS_KEY="drill", AWS_DEFAULT_REGION="us-east-1"
    )
    with LocalCluster(env_vars=FAST_RESTART_ENV, log_dir=work) as cluster:
        results = run_drills(prepare_workspace(work), cluster, names)
    print(format_table(results))
    print(f"fault_drill: scratch (runs, MLflow store, logs) in {work}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
