"""Shakespeare as raw bytes for the Abstractinator: splits checked against DATA.md, byte windows, the byte codec."""

import hashlib
import shutil

import numpy as np
import pytest
import torch

from hf_models.data import bytes as byte_data
from hf_models.data import text
from hf_models.data.bytes import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    bytes_to_text,
    load_byte_windows,
    shakespeare_bytes,
    text_to_bytes,
)

# DATA.md section 2
SPLIT_BYTES = {"train": 4_551_588, "valid": 252_866, "test": 252_867}
CORPUS_SHA256 = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
TEST_SHA256 = "19ee082cf579b6e9202915bcb83a7e3614afbf68fa10c9e3b57b38809d6da81e"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding only the real corpus, copied from the user cache (downloaded there once, if missing)."""
    text.shakespeare_corpus()
    root = tmp_path_factory.mktemp("cache")
    (root / "shakespeare").mkdir()
    shutil.copy(text.default_cache_dir() / "shakespeare" / "corpus.txt", root / "shakespeare" / "corpus.txt")
    return root


@pytest.fixture(scope="module")
def test_bytes(cache):
    return shakespeare_bytes("test", cache)


def _no_rebuild(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("the cached windows should be loaded, not built again")

    for name in ("shakespeare_bytes", "_external_text", "_byte_windows"):
        monkeypatch.setattr(byte_data, name, fail)


def _flat(ds) -> bytes:
    return bytes(np.asarray(ds.with_format("numpy")[:]["input_ids"]).reshape(-1).tolist())


def test_vocabulary_matches_abstractinator_config():
    from hf_models.abstractinator.configuration_abstractinator import AbstractinatorConfig

    config = AbstractinatorConfig()
    assert (BYTE_VOCAB_SIZE, BOS_ID, EOS_ID, PAD_ID) == (259, 256, 257, 258)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (259, 256, 257, 258)


def test_splits_match_data_md(cache, test_bytes):
    splits = {s: shakespeare_bytes(s, cache) for s in ("train", "valid")} | {"test": test_bytes}
    assert {s: len(b) for s, b in splits.items()} == SPLIT_BYTES
    assert all(isinstance(b, bytes) for b in splits.values())
    assert hashlib.sha256(test_bytes).hexdigest() == TEST_SHA256
    corpus = splits["train"] + splits["valid"] + splits["test"]
    assert hashlib.sha256(corpus).hexdigest() == CORPUS_SHA256
    assert test_bytes == text.shakespeare_text("test", cache).encode("utf-8")


def test_split_length_is_checked(cache, monkeypatch):
    monkeypatch.setattr(byte_data, "shakespeare_text", lambda split, cache_dir=None: "x" * 1000)
    with pytest.raises(byte_data.ChecksumError, match=r"valid.*1000 bytes.*252866"):
        shakespeare_bytes("valid", cache)


def test_load_byte_windows(cache, test_bytes, monkeypatch):
    seq_len = 1000
    ds = load_byte_windows("test", seq_len, cache_dir=cache)
    assert ds.column_names == ["input_ids"]
    assert len(ds) == SPLIT_BYTES["test"] // seq_len == 252
    ids = ds.with_format("numpy")[:]["input_ids"]
    assert ids.shape == (252, seq_len) and ids.dtype == np.int64
    assert 0 <= ids.min() and ids.max() <= 255
    for i in (0, 1, 137, 251):
        assert bytes(ds[i]["input_ids"]) == test_bytes[i * seq_len : (i + 1) * seq_len]
    assert _flat(ds) == test_bytes[: 252 * seq_len]
    entries = list((cache / "shakespeare" / "bytes").glob("*/state.json"))
    assert len(entries) == 1

    _no_rebuild(monkeypatch)
    again = load_byte_windows("test", seq_len, cache_dir=cache)
    assert again[:]["input_ids"] == ds[:]["input_ids"]
    assert list((cache / "shakespeare" / "bytes").glob("*/state.json")) == entries


def test_stride(cache, test_bytes):
    n = SPLIT_BYTES["test"]
    overlapping = load_byte_windows("test", 1000, cache_dir=cache, stride=500)
    assert len(overlapping) == (n - 1000) // 500 + 1 == 504
    rows = overlapping[:]["input_ids"]
    for i in (0, 1, 2, 503):
        assert bytes(rows[i]) == test_bytes[500 * i : 500 * i + 1000]
    assert rows[0][500:] == rows[1][:500]

    sparse = load_byte_windows("test", 1000, cache_dir=cache, stride=2000)
    assert len(sparse) == (n - 1000) // 2000 + 1 == 126
    assert bytes(sparse[125]["input_ids"]) == test_bytes[250_000:251_000]

    same = load_byte_windows("test", 1000, cache_dir=cache, stride=1000)  # the default, cached once
    assert same[:]["input_ids"] == load_byte_windows("test", 1000, cache_dir=cache)[:]["input_ids"]
    keys = {p.parent.name for p in (cache / "shakespeare" / "bytes").glob("*/state.json")}
    assert len(keys) >= 3  # default, stride 500 and stride 2000 in three folders


def test_local_txt_file(tmp_path, monkeypatch):
    path = tmp_path / "sonnet.txt"
    sonnet = "Shall I compare thee to a summer's day?\nThou art more lovely, caf\u00e9 \u2603, and more temperate.\n" * 20
    path.write_text(sonnet, encoding="utf-8")
    data = sonnet.encode("utf-8")
    assert len(data) > len(sonnet)  # multi-byte characters are split into their bytes
    cache = tmp_path / "cache"
    ds = load_byte_windows("valid", 64, cache_dir=cache, name_or_path=path)
    assert len(ds) == len(data) // 64 > 0
    assert _flat(ds) == data[: len(ds) * 64]
    assert len(list((cache / "shakespeare" / "bytes").glob("*/state.json"))) == 1

    path.write_text(sonnet.upper(), encoding="utf-8")  # new content, new cache entry
    upper = load_byte_windows("valid", 64, cache_dir=cache, name_or_path=str(path))
    assert _flat(upper) == sonnet.upper().encode("utf-8")[: len(upper) * 64]
    assert len(list((cache / "shakespeare" / "bytes").glob("*/state.json"))) == 2

    _no_rebuild(monkeypatch)
    assert load_byte_windows("valid", 64, cache_dir=cache, name_or_path=path)[:] == upper[:]
    with pytest.raises(ValueError, match=r"'dev'.*\['train', 'valid', 'test'\]"):
        load_byte_windows("dev", 64, cache_dir=cache, name_or_path=path)


def test_local_txt_file_too_short(tmp_path):
    path = tmp_path / "line.txt"
    path.write_text("To be, or not to be\n")
    with pytest.raises(ValueError, match=r"'train' has 20 bytes.*seq_len=21"):
        load_byte_windows("train", 21, cache_dir=tmp_path / "cache", name_or_path=path)
    assert len(load_byte_windows("train", 20, cache_dir=tmp_path / "cache", name_or_path=path)) == 1


def test_errors(cache, tmp_path):
    for bad in (0, -3, "8", 2.0, True, None):
        with pytest.raises(ValueError, match=rf"seq_len={bad!r} is invalid: expected an int >= 1"):
            load_byte_windows("test", bad, cache_dir=tmp_path)
    for bad in (0, -1, "4"):
        with pytest.raises(ValueError, match=rf"stride={bad!r} is invalid: expected an int >= 1"):
            load_byte_windows("test", 8, cache_dir=tmp_path, stride=bad)
    with pytest.raises(ValueError, match=r"split='dev' is not one of \['train', 'valid', 'test'\]"):
        load_byte_windows("dev", 8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"split='dev' is not one of"):
        shakespeare_bytes("dev", cache)
    assert not (tmp_path / "shakespeare").exists()  # refused before anything is written
    entries = set((cache / "shakespeare").glob("bytes/*/state.json"))
    with pytest.raises(ValueError, match=r"split 'test' has 252867 bytes, too few for one window of seq_len=300000"):
        load_byte_windows("test", 300_000, cache_dir=cache)
    assert set((cache / "shakespeare").glob("bytes/*/state.json")) == entries  # nothing cached


def test_text_to_bytes():
    assert text_to_bytes("Hark!") == [72, 97, 114, 107, 33]
    assert text_to_bytes("caf\u00e9 \u2603") == [99, 97, 102, 0xC3, 0xA9, 32, 0xE2, 0x98, 0x83]
    assert text_to_bytes("") == []
    with pytest.raises(TypeError, match="str"):
        text_to_bytes(b"Hark!")


def test_bytes_to_text_round_trip_and_specials():
    for s in ("", "Hark!", "O Romeo, Romeo!\n\n\nwherefore", "caf\u00e9 \u2603 \U0001f3ad", "\x00\x7f"):
        ids = text_to_bytes(s)
        assert bytes_to_text(ids) == s
        assert bytes_to_text([BOS_ID] + ids + [EOS_ID] + [PAD_ID] * 3) == s
    assert bytes_to_text([BOS_ID, 72, PAD_ID, 105, EOS_ID, 33, 33]) == "Hi"  # stops at EOS, skips BOS and PAD
    assert bytes_to_text([EOS_ID, 72]) == ""
    assert bytes_to_text([PAD_ID, PAD_ID]) == ""
    assert bytes_to_text(np.array([BOS_ID, 72, 105, EOS_ID])) == "Hi"
    assert bytes_to_text(torch.tensor([72, 105, PAD_ID])) == "Hi"
    assert bytes_to_text(b"Hi") == "Hi"


def test_bytes_to_text_invalid_utf8():
    assert bytes_to_text([0xFF, 72, 105]) == "\ufffdHi"
    assert bytes_to_text([72, 0xC3]) == "H\ufffd"  # a truncated two-byte character
    assert bytes_to_text([0xE2, 0x98, EOS_ID, 0x83]) == "\ufffd"  # EOS cuts the snowman short
    assert bytes_to_text([0xC3, PAD_ID, 0xA9]) == "\u00e9"  # PAD is skipped, not a break


def test_bytes_to_text_bad_ids():
    for bad in (-1, 259, 1000):
        with pytest.raises(ValueError, match=rf"ids\[1\]={bad} is invalid.*\[0, 259\)"):
            bytes_to_text([72, bad, 105])
    with pytest.raises(ValueError, match=r"ids\[2\]=300 is invalid"):  # after EOS too
        bytes_to_text([72, EOS_ID, 300])
    with pytest.raises(ValueError, match=r"ids\[0\]=1.5 is not an int"):
        bytes_to_text([1.5])
    with pytest.raises(ValueError, match=r"ids\[0\]='H' is not an int"):
        bytes_to_text("Hi")
