"""BERT WordPiece tokenisation to fixed-length numpy arrays.

A tokenizer comes from a local directory or s3:// URI (``tokenizer.json`` of the ``tokenizers`` library,
or a BERT ``vocab.txt``), or is trained here on the captions of the train shards and saved, so that a
run without a pretrained vocabulary still records (and can reuse) exactly the vocabulary it trained with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import BertWordPieceTokenizer, Tokenizer, processors

from pipeline import storage
from pipeline.config import Config, StorageConfig
from pipeline.shards import format as shard_format

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"


class WordPieceTokenizer:
    """A ``tokenizers.Tokenizer`` padded/truncated to ``max_length``; pickles as its JSON form."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, source: str = ""):
        self.source = source
        self.max_length = max_length
        self._tok = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer {source or '(in memory)'} lacks special tokens {missing}")
        if self.pad_id != 0:
            raise ValueError(
                f"tokenizer {source or '(in memory)'}: [PAD] has id {self.pad_id}, the batch contract needs 0"
            )
        # trained from scratch, BertWordPieceTokenizer has no post-processor: set it, so every source
        # gives the contract's [CLS] ... [SEP] layout
        tokenizer.post_processor = processors.BertProcessing(
            ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]"))
        )
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")

    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "max_length": self.max_length, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), state["max_length"], state["source"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id("[PAD]")

    @property
    def mask_id(self) -> int:
        return self._tok.token_to_id("[MASK]")

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(self._tok.token_to_id(t) for t in SPECIAL_TOKENS)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32, attention_mask int8), both (n, max_length): ``[CLS] ... [SEP] [PAD]...``."""
        encodings = self._tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(texts), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int8).reshape(ids.shape)
        return ids, mask

    def decode_tokens(self, ids: np.ndarray) -> list[str]:
        return [self._tok.id_to_token(int(i)) or "?" for i in ids]

    def save(self, uri: str, storage_cfg: StorageConfig) -> None:
        """Writes ``tokenizer.json`` and a BERT ``vocab.txt`` (for transformers' BertTokenizerFast)."""
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        files = {
            TOKENIZER_FILE: self._tok.to_str().encode(),
            VOCAB_FILE: "".join(f"{token}\n" for token, _ in vocab).encode(),
        }
        for name, data in files.items():
            storage.write_bytes_atomic(storage.join(uri, name), data, storage_cfg)


def load_tokenizer(uri: str, max_length: int, storage_cfg: StorageConfig) -> WordPieceTokenizer:
    local = Path(storage.localize_dir(uri, storage_cfg))
    if (local / TOKENIZER_FILE).is_file():
        return WordPieceTokenizer(Tokenizer.from_file(str(local / TOKENIZER_FILE)), max_length, uri)
    if (local / VOCAB_FILE).is_file():
        lowercase = True
        config_file = local / "tokenizer_config.json"
        if config_file.is_file():
            lowercase = bool(json.loads(config_file.read_text()).get("do_lower_case", True))
        bert = BertWordPieceTokenizer(str(local / VOCAB_FILE), lowercase=lowercase)
        return WordPieceTokenizer(Tokenizer.from_str(bert.to_str()), max_length, uri)
    raise FileNotFoundError(f"{uri}: neither {TOKENIZER_FILE} nor {VOCAB_FILE} found (not a tokenizer dir)")


def train_tokenizer(texts: Iterator[str], vocab_size: int, max_length: int) -> WordPieceTokenizer:
    bert = BertWordPieceTokenizer(lowercase=True)
    bert.train_from_iterator(
        texts, vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    return WordPieceTokenizer(Tokenizer.from_str(bert.to_str()), max_length, "trained")


def _text_column(dataset: str, entry: shard_format.ShardEntry, config: Config) -> list[str]:
    """One shard's captions, reading only that column; its size is checked against the manifest (the
    checksum of the whole shard is the dataset builder's job: reading images here would cost too much)."""
    shard_format.check_shard_size(dataset, entry, config.storage)
    uri = storage.join(dataset, entry.file)
    fs, path = storage.resolve(uri, config.storage)
    try:
        return pq.read_table(path, columns=["text"], filesystem=fs).column("text").to_pylist()
    except pa.ArrowException as e:
        raise shard_format.ShardIntegrityError(f"{uri}: unreadable ({e})") from e


def shard_texts(config: Config, max_texts: int) -> Iterator[str]:
    """Captions of the train datasets that have text, text sources first (only the text column is read)."""
    produced = 0
    sources = config.data.named_sources().values()
    for dataset in [
        s.train for kind in ("text", "image_text") for s in sources if s.kind == kind and s.train
    ]:
        manifest = shard_format.read_manifest(dataset, config.storage)
        for entry in manifest.shards:
            try:
                texts = _text_column(dataset, entry, config)
            except shard_format.ShardIntegrityError as e:
                if config.data.on_corrupt_shard != "skip":
                    raise
                log.warning("tokenizer training skips a corrupt shard: %s", e)
                continue
            for text in texts:
                if text and text.strip():
                    yield text
                    produced += 1
                    if produced >= max_texts:
                        return


def has_text_train_data(config: Config) -> bool:
    """Some train source has captions to train a tokenizer on."""
    return any(s.train and s.kind != "image" for s in config.data.named_sources().values())


def load_or_train_tokenizer(
    config: Config, save_to: str | None = None, max_texts: int = 1_000_000
) -> WordPieceTokenizer:
    """``data.tokenizer`` when set; otherwise trained on the train captions and saved to ``save_to``."""
    data = config.data
    if data.tokenizer:
        return load_tokenizer(data.tokenizer, data.max_text_length, config.storage)
    if not has_text_train_data(config):
        raise ValueError("data.tokenizer is empty and no text or image_text train dataset to train one on")
    tok = train_tokenizer(shard_texts(config, max_texts), data.vocab_size, data.max_text_length)
    if save_to:
        tok.save(save_to, config.storage)
        tok.source = save_to
        log.info("trained a WordPiece tokenizer (vocab %d) and saved it to %s", tok.vocab_size, save_to)
    return tok
