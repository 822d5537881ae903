"""Datasets with stable sample IDs: scikit-learn's bundled digits, MNIST-format IDX files.

Nothing here downloads: the digits ship inside scikit-learn, and IDX files are
read from a directory the user gives.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from updatestore import ConfigError, UpdateStoreError

__all__ = ["Split", "load_digits", "load_idx_dir", "read_idx", "forget_split", "sample_ids", "DataFormatError"]


class DataFormatError(UpdateStoreError, ValueError):
    """A data file is missing or not in the expected format."""


@dataclass(frozen=True)
class Split:
    """Train and test sets, each a ``TensorDataset`` of ``(x, y, id)``."""

    train: TensorDataset
    test: TensorDataset
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.tensors[0].shape[1:])


def _dataset(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64),
                         torch.as_tensor(ids, dtype=torch.int64))


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's 1,797 bundled 8×8 handwritten digits, scaled to [0, 1].

    Sample IDs are the row numbers in scikit-learn's order, so they are stable
    across calls and seeds; the train/test split is stratified and seeded.

    >>> d = load_digits()
    >>> len(d.train) + len(d.test), d.input_shape, d.num_classes
    (1797, (1, 8, 8), 10)
    """
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    bunch = _sk_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    ids = np.arange(len(y), dtype=np.int64)
    tr, te = train_test_split(ids, test_size=test_fraction, random_state=seed, stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    return Split(_dataset(x[tr], y[tr], tr), _dataset(x[te], y[te], te), 10)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped), as in the MNIST distribution."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataFormatError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path} is not an IDX file (bad magic number)")
    codes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in codes:
        raise DataFormatError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(codes[raw[2]])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DataFormatError(f"{path}: header says shape {dims} but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataFormatError(
        f"{directory} has no {stem}[.gz]; expected the four MNIST-format files "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    )


def load_idx_dir(directory: str | os.PathLike, *, limit: int | None = None) -> Split:
    """MNIST-format IDX files from ``directory`` (MNIST, Fashion-MNIST, KMNIST...).

    Train IDs are ``0..N-1``, test IDs continue from ``N``. ``limit`` keeps the
    first ``limit`` training samples (for quick runs).
    """
    d = Path(directory)
    if not d.is_dir():
        raise DataFormatError(f"data directory {d} does not exist")
    xtr = read_idx(_find(d, "train-images-idx3-ubyte"))
    ytr = read_idx(_find(d, "train-labels-idx1-ubyte"))
    xte = read_idx(_find(d, "t10k-images-idx3-ubyte"))
    yte = read_idx(_find(d, "t10k-labels-idx1-ubyte"))
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataFormatError(f"{d}: image and label counts differ")
    if limit is not None:
        xtr, ytr = xtr[:limit], ytr[:limit]
    n = len(ytr)
    scale = 255.0 if xtr.dtype == np.uint8 else 1.0
    x_tr = (xtr.astype(np.float32) / scale)[:, None]
    x_te = (xte.astype(np.float32) / scale)[:, None]
    classes = int(max(ytr.max(), yte.max())) + 1
    return Split(
        _dataset(x_tr, ytr.astype(np.int64), np.arange(n)),
        _dataset(x_te, yte.astype(np.int64), np.arange(n, n + len(yte))),
        classes,
    )


def forget_split(data: TensorDataset, *, fraction: float | None = None, cls: int | None = None,
                 seed: int = 0) -> tuple[Subset, Subset]:
    """Split ``data`` into ``(forget, retain)``: a random ``fraction``, or every sample of class ``cls``.

    >>> forget, retain = forget_split(load_digits().train, fraction=0.01)
    >>> len(forget), len(forget) + len(retain)
    (13, 1347)
    """
    if (fraction is None) == (cls is None):
        raise ConfigError("forget_split needs exactly one of fraction= or cls=")
    y = data.tensors[1].numpy()
    n = len(y)
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ConfigError(f"fraction must be in (0, 1), got {fraction!r}")
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(n, size=max(1, round(fraction * n)), replace=False))
    else:
        chosen = np.flatnonzero(y == cls)
        if chosen.size == 0:
            raise ConfigError(f"class {cls!r} has no samples in this dataset")
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return Subset(data, np.flatnonzero(mask).tolist()), Subset(data, np.flatnonzero(~mask).tolist())


def sample_ids(data: Dataset) -> np.ndarray:
    """The IDs of a ``(x, y, id)`` dataset or a ``Subset`` of one, in order."""
    if isinstance(data, Subset):
        return sample_ids(data.dataset)[np.asarray(data.indices, dtype=np.int64)]
    if isinstance(data, TensorDataset) and len(data.tensors) >= 3:
        return data.tensors[2].numpy()
    raise ConfigError("this dataset carries no sample IDs; use a TensorDataset of (x, y, ids)")
