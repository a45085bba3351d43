"""The seam between the training job and the input pipeline (pipeline.data): what the driver builds and
what a worker opens. The tokenizer is fixed once per run so that every worker, restart and rerun of the
run name tokenises with the same vocabulary the model's embedding table was sized for."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np

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
from pipeline.data.transforms import augment_batch, batch_rng, prepare_rows
from pipeline.shards.format import read_manifest, read_shard

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
        self.stream = MixedStream(spec)
        self.text_vocab_size = spec.params.text_vocab_size
        self._val: dict[str, list[dict]] | None = None

    def next_kind(self) -> str:
        return self.stream.next_kind()

    def next_batch(self, kind: str) -> dict:
        return to_torch(self.stream.next_of(kind), self.device)

    def val_batches(self) -> dict[str, list[dict]]:
        """Read once, kept in memory as torch batches: validation then costs only the forwards."""
        if self._val is None:
            self._val = {
                kind: [to_torch(b, self.device) for b in batches]
                for kind, batches in fixed_batches(
                    self.config, self.spec.params, self.config.data.val, self.config.train.val_batches
                ).items()
            }
        return self._val


def fixed_batches(config: Config, params, datasets: dict[str, str], per_kind: int) -> dict[str, list[dict]]:
    """Up to ``per_kind`` batches per kind from the first rows of ``datasets`` (kind -> dataset), read in
    process, with masks and ITM negatives from a fixed seed: the same batches on every rank and call
    (held-out validation; benchmarks that must feed identical batches to two setups)."""
    data = config.data
    tokenizer = load_tokenizer(data.tokenizer, data.max_text_length, config.storage)
    out = {}
    for kind_index, (kind, uri) in enumerate(sorted(datasets.items())):
        rows: dict[str, list] = {}
        skipped: Counter = Counter()
        wanted = data.batch_size * per_kind
        for entry in read_manifest(uri, config.storage).shards:
            table = read_shard(uri, entry, config.storage)
            columns = {name: table.column(name).to_pylist() for name in table.column_names if name != "key"}
            prepared, dropped = prepare_rows(kind, columns, params, tokenizer if kind != "image" else None)
            skipped.update(dropped)
            for name, values in prepared.items():
                rows.setdefault(name, []).append(values)
            if sum(len(v) for v in rows[next(iter(rows))]) >= wanted:
                break
        merged = {name: np.concatenate(parts)[:wanted] for name, parts in rows.items()}
        n = len(next(iter(merged.values())))
        if skipped:
            log.warning("%s (%s): skipped unusable rows %s", kind, uri, dict(skipped))
        if n == 0:
            raise ValueError(f"{kind} dataset {uri}: no usable row to make a batch of")
        out[kind] = [
            augment_batch(
                kind,
                {k: v[i : i + data.batch_size] for k, v in merged.items()},
                params,
                batch_rng(data.seed, 10**6, kind_index, i),
            )
            for i in range(0, n, data.batch_size)
        ]
    return out
