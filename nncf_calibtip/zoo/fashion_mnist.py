"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read as numpy arrays.

The data is fetched once by ``scripts/fetch_data.sh`` (``apt-get download``, no hub, no URL) into
``data/fashion-mnist``; nothing here touches the network.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Mean and std of the training pixels after division by 255.
MEAN = 0.2860
STD = 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def data_root() -> Path:
    """Folder holding the gzipped IDX files (``$CALIBTIP_DATA`` or ``./data``)."""
    return Path(os.environ.get("CALIBTIP_DATA", "data")) / "fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the upstream MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", ndim, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


@dataclass(frozen=True)
class FashionMNIST:
    """The four arrays of Fashion-MNIST: uint8 images (N, 28, 28) and uint8 labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load(root: Path | None = None) -> FashionMNIST:
    """Load Fashion-MNIST from ``root`` (default :func:`data_root`).

    :raises FileNotFoundError: with the command that fetches the data when it is missing.
    """
    root = Path(root) if root is not None else data_root()
    names = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).is_file()]
    if missing:
        msg = f"Fashion-MNIST files {missing} not found in {root}. Run `bash scripts/fetch_data.sh` first."
        raise FileNotFoundError(msg)
    return FashionMNIST(**{k: read_idx(root / v) for k, v in names.items()})


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) images -> float32 (N, 1, 28, 28), normalised with the training mean/std."""
    x = images.astype(np.float32)[:, None] / 255.0
    return (x - MEAN) / STD
