"""Look at what the model sees: ``python jobs/inspect_data.py --config FILE [key=value ...] [--out PNG]``.

Draws a few batches of each kind from the real pipeline (Ray Data + transforms + mixing stream) into one
PNG contact sheet: masked patches shaded, MLM-masked tokens coloured, ITM labels shown.

``--keys STEP [--steps K]`` instead prints the row keys that steps STEP..STEP+K-1 of a run of the config
train (their kind, epoch and global batch): the rows behind a loss spike at a step, the same whatever the
number of workers or restarts. It reads only the shards' key column and starts no Ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_cli  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="data_preview.png", help="PNG path to write")
    parser.add_argument("--batches", type=int, default=2, help="batches per source")
    parser.add_argument("--samples", type=int, default=6, help="samples shown per batch")
    parser.add_argument("--keys", type=int, default=0, metavar="STEP", help="print the row keys of this step")
    parser.add_argument("--steps", type=int, default=1, help="with --keys: this many steps from STEP")


def main(argv: list[str] | None = None) -> int:
    config, args = parse_cli(argv, __doc__, add_arguments)
    if args.keys:
        from pipeline.data.datasets import data_order, step_rows

        for rows in step_rows(config, data_order(config)[0], args.keys, args.steps):
            for (epoch, batch), keys in zip(rows.batches, rows.keys, strict=True):
                print(f"step {rows.step} {rows.source} epoch {epoch} batch {batch}: {' '.join(keys)}")
        return 0
    import ray

    from pipeline.data.preview import collect_batches, render_contact_sheet
    from pipeline.data.tokenizer import load_or_train_tokenizer

    tokenizer = load_or_train_tokenizer(config)
    if args.dry_run:
        names = [n for n, s in config.data.named_sources().items() if s.train]
        print(f"would render {args.batches} batch(es) per source of {names} to {args.out}")
        return 0
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sheet = render_contact_sheet(collect_batches(config, tokenizer, args.batches), tokenizer, args.samples)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
