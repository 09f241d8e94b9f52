"""What a run writes next to its results: atomic files, arrays without pickle, versions.

Every file is written to a temporary name in its folder, flushed to disk and renamed over the
target (``os.replace``), so a run killed at any moment leaves either the old or the new file,
never a torn one. Arrays go to ``.npz`` and are read back with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder, flushed to disk, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not err.filename:  # name the file (disk full ...)
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_savez(path: str | os.PathLike, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


class NpzError(ValueError):
    """An ``.npz`` file that is missing, truncated, corrupt or holds pickled objects."""


def load_npz(path: str | os.PathLike, fix: str = "replace it with a good copy") -> dict:
    """All arrays of an ``.npz`` file, loaded without pickle. A file that cannot be read is an
    NpzError naming the file and ``fix`` (never numpy's hint to load pickles)."""
    import zipfile
    import zlib

    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{path} does not exist; {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        reason = f"truncated or damaged zip archive: {err}"
    except ValueError as err:
        if "pickle" not in str(err):
            reason = str(err)
        elif path.read_bytes()[:1] == b"\x80":
            reason = "it holds a pickle, which this package never loads"
        else:
            reason = "not a zip archive of arrays"
    except OSError as err:
        reason = err.strerror or str(err)
    raise NpzError(f"{path}: corrupt or not an npz file ({reason}); {fix}")


def versions() -> dict:
    """Versions of Python, the numerical stack, Brian2 and this package, the platform, and the
    git commit of the source that ran (``+dirty`` with uncommitted changes; None outside git)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("numpy", "scipy", "brian2", "numba", "lee2018-snn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if out["lee2018-snn"] is None:  # run from a checkout that is not pip-installed
        out["lee2018-snn"] = source_version()
    out["git_commit"] = source_commit()
    return out


def source_version() -> str | None:
    """The version in the ``setup.cfg`` beside this package (None when there is none)."""
    import configparser

    parser = configparser.ConfigParser()
    try:
        parser.read(Path(__file__).resolve().parents[1] / "setup.cfg")
        return parser.get("metadata", "version")
    except (OSError, configparser.Error):
        return None


def source_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this package, ``+dirty`` when tracked
    files differ from it; None when the package is not in a git checkout or git is missing."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
