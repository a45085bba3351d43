"""The multi-source example's data: ``python jobs/prepare_sources.py CORPUS [--max-images N] [--max-texts N]
[--config FILE] [key=value ...]``.

CORPUS is the output of ``../shared/data/real_corpus.py``. Splits it into six named sources of three kinds
(``pipeline/shards/real_sources.py``) and prepares each into ``<demo.root>/<source>/{train,val}`` with the
config's ``prepare`` settings (default: jobs/configs/multi-source.yaml's). Then
``jobs/tune_mixing.py --config jobs/configs/multi-source.yaml`` sweeps their mixture.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_cli  # noqa: E402


def _flags(parser) -> None:
    parser.add_argument("corpus", help="the output folder of ../shared/data/real_corpus.py")
    parser.add_argument("--max-images", type=int, default=2000, help="Open Clip Art images to use")
    parser.add_argument("--max-texts", type=int, default=6000, help="glosses per text source")


def main(argv: list[str] | None = None) -> int:
    config, args = parse_cli(argv, description=__doc__, add_arguments=_flags)
    from pipeline.cluster import init_ray
    from pipeline.paths import DEMO, absolute_paths
    from pipeline.shards.prepare import execute, format_report, plan
    from pipeline.shards.real_sources import SOURCES, split_real_corpus

    corpus = Path(args.corpus)
    if not (corpus / "DONE").exists():
        print(f"prepare_sources: {corpus} is not a built real corpus (run ../shared/data/real_corpus.py)")
        return 2
    config = absolute_paths(config, DEMO)
    root = Path(config.demo.root)
    inputs = split_real_corpus(corpus, root / "raw", args.max_images, args.max_texts)
    plans = []
    for name, (_, source) in SOURCES.items():
        prep = dataclasses.replace(
            config.prepare, source=source, inputs=[str(inputs[name])], output=str(root / name), captions=""
        )
        plans.append((prep, plan(prep, config.storage)))
    if args.dry_run:
        for prep, p in plans:
            print(f"{prep.output}: {sum(len(s) for d in p for s in d.shards)} records")
        return 0
    init_ray()
    for prep, p in plans:
        print(format_report(execute(p, prep, config.storage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
