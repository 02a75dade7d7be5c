"""Shakespeare as raw bytes: the byte-level data for the Abstractinator (a hierarchical byte autoencoder).

See DATA.md section 2 and `hf_models.data.text`, which fetches and splits the corpus. The byte splits are the
text splits encoded as UTF-8 (the corpus is pure ASCII, so one byte per character):

- ``train``: 4,551,588 bytes,
- ``valid``: 252,866 bytes,
- ``test``: 252,867 bytes (sha256 checked by `shakespeare_text`).

The Abstractinator's level-0 vocabulary has 259 ids: the byte values 0..255 and three specials, ``BOS_ID = 256``,
``EOS_ID = 257`` and ``PAD_ID = 258`` (the `AbstractinatorConfig` defaults). Byte data sets hold bytes only: windows
of ``seq_len`` bytes taken every ``stride`` bytes (by default ``stride = seq_len``, non-overlapping), the bytes after
the last whole window dropped, and no specials added.

Cache (``$LATENTHEAT_CACHE`` or ``~/.cache/latentheat``), written atomically under a file lock:

- ``shakespeare/bytes/<key>/``: byte windows (``save_to_disk``), key = hash of the source (the corpus, a local file's
  sha256, or a Hub data set's name and configuration), split, seq_len and stride.

```python
from hf_models.data.bytes import BOS_ID, EOS_ID, bytes_to_text, load_byte_windows, shakespeare_bytes, text_to_bytes
data = shakespeare_bytes("test")                            # bytes, 252,867 of them
train = load_byte_windows("train", seq_len=1024)            # datasets.Dataset, column input_ids (1024 ints in 0..255)
valid = load_byte_windows("valid", 1024, stride=512)        # windows overlapping by half
ids = [BOS_ID] + text_to_bytes("Hark!") + [EOS_ID]          # [256, 72, 97, 114, 107, 33, 257]
bytes_to_text(ids)                                          # "Hark!" (stops at EOS, skips BOS / PAD)
# any text data set (a "text" column), or a local .txt file as the whole split
valid = load_byte_windows("valid", 1024, name_or_path="wikitext", config_name="wikitext-2-raw-v1")
```
"""

from __future__ import annotations

import hashlib
import json
import operator
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, List, Value, load_from_disk

from hf_models.data.mnist import ChecksumError
from hf_models.data.text import (
    SHAKESPEARE_CORPUS_SHA256,
    PathLike,
    _cached_folder,
    _check_split,
    _external_text,
    _root,
    shakespeare_text,
)

BYTE_VOCAB_SIZE = 259
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
SPLIT_BYTES = {"train": 4_551_588, "valid": 252_866, "test": 252_867}  # DATA.md section 2

_FEATURE_DTYPE = "int64"  # what embedding layers take; `torch.tensor(ds["input_ids"])` needs no cast


def shakespeare_bytes(split: str, cache_dir: PathLike | None = None) -> bytes:
    """One split of the Shakespeare corpus as raw UTF-8 bytes (`shakespeare_text(split).encode("utf-8")`).

    Args:
        split (`str`): `"train"`, `"valid"` or `"test"`.
        cache_dir (`str` or `Path`, *optional*): see `hf_models.data.text.shakespeare_corpus`.

    Raises:
        `ValueError`: an unknown split.
        `ChecksumError`: the split does not have its DATA.md length (or the test split its sha256).
    """
    _check_split(split)
    data = shakespeare_text(split, cache_dir).encode("utf-8")
    if len(data) != SPLIT_BYTES[split]:
        raise ChecksumError(f"Shakespeare {split} split has {len(data)} bytes; DATA.md records {SPLIT_BYTES[split]}")
    return data


def _positive_int(name: str, value) -> int:
    """`value` as an `int` >= 1, else a `ValueError` naming `name` and `value` (bools are refused)."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
    return number


def _byte_windows(data: bytes, seq_len: int, stride: int, split: str) -> Dataset:
    """Windows `data[i*stride : i*stride + seq_len]` for every `i` whose window fits, as a one-column `Dataset`."""
    if len(data) < seq_len:
        raise ValueError(f"split {split!r} has {len(data)} bytes, too few for one window of seq_len={seq_len}")
    windows = np.lib.stride_tricks.sliding_window_view(np.frombuffer(data, dtype=np.uint8), seq_len)[::stride]
    features = Features({"input_ids": List(Value(_FEATURE_DTYPE), length=seq_len)})
    return Dataset.from_dict({"input_ids": windows.astype(_FEATURE_DTYPE)}, features=features)


def _source_key(split: str, name_or_path: PathLike | None, config_name: str | None) -> dict:
    """What identifies the bytes of a split, for the cache key (checks the split where the source fixes the names)."""
    if name_or_path is None:
        _check_split(split)
        return {"source": "shakespeare", "sha256": SHAKESPEARE_CORPUS_SHA256}
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".txt":  # the test `_external_text` makes: the file is the whole split
        _check_split(split)
        return {"source": "file", "path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"source": str(name_or_path), "config_name": config_name}


def load_byte_windows(
    split: str,
    seq_len: int,
    cache_dir: PathLike | None = None,
    name_or_path: PathLike | None = None,
    config_name: str | None = None,
    stride: int | None = None,
) -> Dataset:
    """Byte windows of one split: a `datasets.Dataset` with one column `input_ids` of `seq_len` ints in 0..255 a row.

    Row `i` is `data[i*stride : i*stride + seq_len]` with `data` the split's UTF-8 bytes; the bytes after the last
    whole window are dropped. No BOS / EOS / PAD is added. Built once and cached in
    `<cache_dir>/shakespeare/bytes/<key>/` (`save_to_disk`), whatever the source.

    Args:
        split (`str`): `"train"`, `"valid"` or `"test"` (for a Hub data set also any split it has; `"valid"` maps to
            `"validation"` when the data set has no `"valid"`).
        seq_len (`int`): bytes per window, >= 1.
        cache_dir (`str` or `Path`, *optional*): see `hf_models.data.text.shakespeare_corpus`.
        name_or_path (`str` or `Path`, *optional*): `None` for the offline Shakespeare corpus (`shakespeare_bytes`);
            a data set for `datasets.load_dataset(name_or_path, config_name)` (online) whose `text` column is joined
            with `"\\n"`; or a local `.txt` file, which is the whole of `split`. As in
            `hf_models.data.text.load_text_tokens`. A local file is keyed by its sha256, a Hub data set by its name
            and configuration only (delete its cache folder to pick up a new revision).
        config_name (`str`, *optional*): the data set's configuration.
        stride (`int`, *optional*, defaults to `seq_len`): bytes between the starts of two windows, >= 1 (smaller than
            `seq_len` for overlapping windows; each window is stored, so `stride=1` stores `seq_len` times the split).

    Raises:
        `ValueError`: `seq_len < 1`, `stride < 1`, an unknown split, or a split shorter than `seq_len` bytes.
    """
    seq_len = _positive_int("seq_len", seq_len)
    stride = seq_len if stride is None else _positive_int("stride", stride)
    key_src = {**_source_key(split, name_or_path, config_name), "split": split, "seq_len": seq_len,
               "stride": stride, "dtype": _FEATURE_DTYPE}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode("utf-8")).hexdigest()[:16]

    def build(staged: str) -> None:
        if name_or_path is None:
            data = shakespeare_bytes(split, cache_dir)
        else:
            data = _external_text(split, name_or_path, config_name, cache_dir).encode("utf-8")
        _byte_windows(data, seq_len, stride, split).save_to_disk(staged)

    bytes_dir = _root(cache_dir) / "bytes"
    bytes_dir.mkdir(exist_ok=True)
    target = bytes_dir / key
    _cached_folder(target, "state.json", build)
    return load_from_disk(str(target))


def text_to_bytes(text: str) -> list[int]:
    """The UTF-8 bytes of `text` as ids in 0..255 (no specials added)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return list(text.encode("utf-8"))


def bytes_to_text(ids) -> str:
    """Decode byte ids (a sequence, NumPy array or 1-D tensor of ints in 0..258) to a `str`.

    Decoding stops at the first EOS; BOS and PAD are skipped; invalid UTF-8 becomes U+FFFD (`errors="replace"`).

    Raises:
        `ValueError`: an id outside 0..258 (anywhere in `ids`, after an EOS too) or one that is not an int.
    """
    if hasattr(ids, "tolist"):  # NumPy arrays and tensors: plain ints in one call
        ids = ids.tolist()
    values = []
    for pos, i in enumerate(ids):
        try:
            value = operator.index(i)
        except TypeError:
            raise ValueError(f"ids[{pos}]={i!r} is not an int") from None
        if not 0 <= value < BYTE_VOCAB_SIZE:
            raise ValueError(f"ids[{pos}]={value} is invalid: expected an int in [0, {BYTE_VOCAB_SIZE}) (bytes 0..255, "
                             f"BOS={BOS_ID}, EOS={EOS_ID}, PAD={PAD_ID})")
        values.append(value)
    if EOS_ID in values:
        values = values[: values.index(EOS_ID)]
    return bytes(v for v in values if v < 256).decode("utf-8", errors="replace")


__all__ = [
    "BOS_ID",
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "PAD_ID",
    "SPLIT_BYTES",
    "bytes_to_text",
    "load_byte_windows",
    "shakespeare_bytes",
    "text_to_bytes",
]
