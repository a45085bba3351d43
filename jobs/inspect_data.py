"""Render what the model sees: ``python jobs/inspect_data.py --config FILE [key=value ...] [--out PNG]``.

Draws a few batches of each kind from the real pipeline (Ray Data + transforms + mixing stream) into one
PNG contact sheet: masked patches shaded, MLM-masked tokens coloured, ITM labels shown.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_cli  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="data_preview.png", help="PNG path to write")
    parser.add_argument("--batches", type=int, default=2, help="batches per kind")
    parser.add_argument("--samples", type=int, default=6, help="samples shown per batch")


def main(argv: list[str] | None = None) -> int:
    config, args = parse_cli(argv, __doc__, add_arguments)
    import ray

    from pipeline.data.preview import collect_batches, render_contact_sheet
    from pipeline.data.tokenizer import load_or_train_tokenizer

    tokenizer = load_or_train_tokenizer(config)
    if args.dry_run:
        print(f"would render {args.batches} batch(es) per kind of {dict(config.data.train)} to {args.out}")
        return 0
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sheet = render_contact_sheet(collect_batches(config, tokenizer, args.batches), tokenizer, args.samples)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
