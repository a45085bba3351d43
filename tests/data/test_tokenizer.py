"""WordPiece tokenizer: trained on the shard captions, saved, reloaded (locally and from a real S3 server)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.config import StorageConfig
from pipeline.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer, load_tokenizer, train_tokenizer


def test_trained_tokenizer_layout(tokenizer):
    assert tokenizer.special_ids == (0, 1, 2, 3, 4)  # [PAD]=0, [UNK], [CLS], [SEP], [MASK]
    assert tokenizer.mask_id == 4 and tokenizer.vocab_size <= 300
    ids, mask = tokenizer.encode(["a large red square on a blue background", "", "word " * 100])
    assert ids.shape == mask.shape == (3, 32) and ids.dtype == np.int32
    assert ids[0, 0] == 2 and ids[0, mask[0].sum() - 1] == 3 and (ids[0, mask[0].sum() :] == 0).all()
    assert mask[1].sum() == 2  # an empty caption is just [CLS] [SEP]: the transforms drop it
    assert mask[2].all() and ids[2, -1] == 3  # truncated to the fixed length, still closed by [SEP]


def test_save_load_roundtrip_and_pickle(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tok"), StorageConfig())
    texts = ["a small green bar on a white background", "an unseen zebra"]
    for loaded in (
        load_tokenizer(str(tmp_path / "tok"), 32, StorageConfig()),
        pickle.loads(pickle.dumps(tokenizer)),
    ):
        np.testing.assert_array_equal(loaded.encode(texts)[0], tokenizer.encode(texts)[0])
    # a plain BERT vocab.txt directory (what transformers' BertTokenizerFast saves) loads too
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text((tmp_path / "tok" / "vocab.txt").read_text())
    bert = load_tokenizer(str(tmp_path / "bert"), 32, StorageConfig())
    np.testing.assert_array_equal(bert.encode(texts)[0], tokenizer.encode(texts)[0])


def test_load_from_s3(tokenizer, moto_s3):
    cfg = StorageConfig(s3_endpoint_url=moto_s3)
    tokenizer.save("s3://test-bucket/tokenizers/wp", cfg)
    loaded = load_tokenizer("s3://test-bucket/tokenizers/wp", 16, cfg)
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.encode(["a red bar"])[0].shape == (1, 16)


def test_bad_tokenizer_dirs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenizer dir"):
        load_tokenizer(str(tmp_path), 32, StorageConfig())
    (tmp_path / "vocab.txt").write_text("\n".join(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    with pytest.raises(ValueError, match=r"\[PAD\] has id 1"):
        load_tokenizer(str(tmp_path), 32, StorageConfig())


def test_train_tokenizer_needs_all_special_tokens():
    tok = train_tokenizer(iter(["a b c"] * 10), 100, 8)
    assert isinstance(tok, WordPieceTokenizer)
    assert [tok._tok.id_to_token(i) for i in tok.special_ids] == list(SPECIAL_TOKENS)
