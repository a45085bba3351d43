"""The seam between the training job and the input pipeline (pipeline.data): what the driver builds and
what a worker opens. The tokenizer is fixed once per run so that every worker, restart and rerun of the
run name tokenises with the same vocabulary the model's embedding table was sized for."""

from __future__ import annotations

import dataclasses
import logging

from pipeline import storage
from pipeline.config import Config
from pipeline.data.datasets import StreamSpec, TrainData, build_train_data
from pipeline.data.stream import MixedStream, to_torch
from pipeline.data.tokenizer import (
    TOKENIZER_FILE,
    WordPieceTokenizer,
    load_or_train_tokenizer,
    load_tokenizer,
)
from pipeline.data.validation import held_out_batches

log = logging.getLogger(__name__)


def run_tokenizer_uri(config: Config) -> str:
    return storage.join(config.train.storage_path, config.train.run_name, "tokenizer")


def fix_tokenizer(config: Config) -> tuple[Config, WordPieceTokenizer]:
    """``data.tokenizer`` if set; else the one this run trained before (``<run>/tokenizer``); else trains
    it on the train captions and saves it there. The returned config names it for the workers."""
    if config.data.tokenizer:
        return config, load_tokenizer(config.data.tokenizer, config.data.max_text_length, config.storage)
    uri = run_tokenizer_uri(config)
    if storage.exists(storage.join(uri, TOKENIZER_FILE), config.storage):
        tokenizer = load_tokenizer(uri, config.data.max_text_length, config.storage)
    else:
        tokenizer = load_or_train_tokenizer(config, save_to=uri)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=uri)), tokenizer


def build_train_datasets(config: Config, tokenizer: WordPieceTokenizer) -> TrainData:
    return build_train_data(config, tokenizer)


class WorkerData:
    """A worker's view: the mixed train stream and the held-out batches (identical on every rank)."""

    def __init__(self, config: Config, spec: StreamSpec, device):
        self.config = config
        self.spec = spec
        self.device = device
        self.stream = MixedStream(spec)  # rank and world size from Ray Train
        self.text_vocab_size = spec.params.text_vocab_size
        self._val: dict[str, list[dict]] | None = None

    def next_source(self) -> str:
        return self.stream.next_source()

    def next_batch(self, source: str) -> dict:
        return to_torch(self.stream.next_of(source), self.device)

    def skip_counts(self) -> dict[str, float]:
        """Shards and rows left out so far, by source and reason, and totals (pipeline-wide: for rank 0)."""
        counts = {k: v for k, v in self.stream.counters().items() if k.startswith("skipped_")}
        for what in ("skipped_shards", "skipped_rows"):
            counts[f"{what}/total"] = sum(v for k, v in counts.items() if k.startswith(f"{what}/"))
        return counts

    def val_batches(self) -> dict[str, list[dict]]:
        """Read once, kept in memory as torch batches: validation then costs only the forwards."""
        if self._val is None:
            self._val = {
                source: [to_torch(b, self.device) for b in batches]
                for source, batches in held_out_batches(self.config, self.spec.params).items()
            }
        return self._val
