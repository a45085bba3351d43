"""Held-out batches in a fixed order, identical on every rank and at every validation.

Read straight from the val shards with pyarrow (verified against the manifest), not through Ray Data:
validation needs a handful of batches, always the same ones, and no barrier between ranks. Masks and ITM
negatives come from a fixed seed and there is no flip, so validation losses are comparable across steps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np

from pipeline.config import Config
from pipeline.data.mixing import seed_index
from pipeline.data.tokenizer import WordPieceTokenizer, load_tokenizer
from pipeline.data.transforms import TransformParams, augment_batch, batch_rng, normalize, prepare_rows
from pipeline.shards import format as shard_format

log = logging.getLogger(__name__)

TEXT = ("input_ids", "attention_mask")
VAL_STREAM = 1 << 20  # keeps validation seeds apart from the train ranks' seeds


def held_out_rows(
    config: Config,
    kind: str,
    params: TransformParams,
    tokenizer: WordPieceTokenizer | None,
    wanted: int,
    uri: str,
) -> tuple[dict[str, np.ndarray], Counter]:
    """The first ``wanted`` usable rows of the ``kind`` dataset at ``uri`` in manifest order, prepared;
    skips counted."""
    parts: dict[str, list[np.ndarray]] = {}
    skipped: Counter = Counter()
    have = 0
    for entry in shard_format.read_manifest(uri, config.storage).shards:
        table = shard_format.read_shard(uri, entry, config.storage)
        columns = {
            name: np.stack(table.column(name).to_numpy(zero_copy_only=False))
            if name.startswith("dvae_codes")
            else table.column(name).to_pylist()
            for name in table.column_names
            if name != "key"
        }
        rows, bad = prepare_rows(kind, columns, params, tokenizer if kind != "image" else None)
        skipped.update(bad)
        for name, values in rows.items():
            parts.setdefault(name, []).append(values)
        have += len(next(iter(rows.values())))
        if have >= wanted:
            break
    return {name: np.concatenate(values)[:wanted] for name, values in parts.items()}, skipped


def held_out_sets(config: Config) -> dict[str, tuple[str, str]]:
    """The held-out split of every source that has one: name -> (kind, URI)."""
    return {name: (s.kind, s.val) for name, s in config.data.named_sources().items() if s.val}


def _resolve(config: Config, params: TransformParams, tokenizer: WordPieceTokenizer | None, kinds):
    if tokenizer is None and any(k != "image" for k in kinds):
        tokenizer = load_tokenizer(config.data.tokenizer, config.data.max_text_length, config.storage)
    return dataclasses.replace(params, flip_probability=0.0), tokenizer


def held_out_batches(
    config: Config,
    params: TransformParams,
    tokenizer: WordPieceTokenizer | None = None,
    max_batches: int | None = None,
    datasets: dict[str, tuple[str, str]] | None = None,
) -> dict[str, list[dict]]:
    """Up to ``max_batches`` (default ``train.val_batches``) batches per source of ``datasets`` (name ->
    (kind, URI); default ``held_out_sets``: every source's val split). Benchmarks pass train datasets to
    feed identical batches to two setups."""
    datasets = held_out_sets(config) if datasets is None else datasets
    params, tokenizer = _resolve(config, params, tokenizer, [kind for kind, _ in datasets.values()])
    size = config.data.batch_size
    max_batches = config.train.val_batches if max_batches is None else max_batches
    out = {}
    for name, (kind, uri) in datasets.items():
        rows, skipped = held_out_rows(config, kind, params, tokenizer, size * max_batches, uri)
        if skipped:
            log.warning("%s (%s): skipped unusable held-out rows %s", name, uri, dict(skipped))
        n = len(next(iter(rows.values())))
        out[name] = [
            augment_batch(
                kind,
                {k: v[i : i + size] for k, v in rows.items()},
                params,
                batch_rng(config.data.seed, VAL_STREAM, seed_index(name), i // size),
            )
            for i in range(0, n, size)
        ]
    return out


def retrieval_pairs(
    config: Config, params: TransformParams, tokenizer: WordPieceTokenizer | None = None, max_pairs: int = 256
) -> dict[str, np.ndarray]:
    """Matching held-out image-caption pairs (no negatives, no masks) for zero-shot retrieval, an equal
    share from each image-text source's val split: ``pixel_values`` (n,3,H,W) float32, ``input_ids`` and
    ``attention_mask`` (n,L) int64; pair i matches i."""
    uris = [uri for kind, uri in held_out_sets(config).values() if kind == "image_text"]
    if not uris:
        raise ValueError(
            "retrieval needs held-out image-caption pairs (an image_text source with a val split)"
        )
    params, tokenizer = _resolve(config, params, tokenizer, ["image_text"])
    share = -(-max_pairs // len(uris))
    parts = [held_out_rows(config, "image_text", params, tokenizer, share, uri)[0] for uri in uris]
    pairs = {name: np.concatenate([p[name] for p in parts])[:max_pairs] for name in ("pixels", *TEXT)}
    return {
        "pixel_values": normalize(pairs["pixels"]),
        **{name: pairs[name].astype(np.int64) for name in TEXT},
    }
