"""Offline datasets shipped as Debian/registry packages (see shared DATA.md).

Numpy only on purpose: the compiler's calibration and evaluation paths must not
pull in torch just to read a few idx files.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from qcompile.errors import DataError

# Debian package `dataset-fashion-mnist` installs the four idx files here.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Per-pixel mean/std of the 60k training images after /255; the committed test
# model (tests/data/fashion_resnet.onnx) was trained on inputs normalised this way.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_dir() -> Path | None:
    """Directory holding the Fashion-MNIST idx files, or None when not installed."""
    if all((FASHION_MNIST_DIR / f"{p}-{k}.gz").is_file()
           for p in _PREFIX.values() for k in ("images-idx3-ubyte", "labels-idx1-ubyte")):
        return FASHION_MNIST_DIR
    return None


def normalize_fashion_mnist(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) or (N,1,28,28) pixels -> normalised float32 (N,1,28,28)."""
    x = pixels.reshape(-1, 1, 28, 28).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a split ("train": 60k, "test": 10k) as normalised float32 (N,1,28,28) images and int64 labels."""
    if split not in _PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    root = fashion_mnist_dir()
    if root is None:
        raise DataError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; "
                        "install it with `apt-get install -y dataset-fashion-mnist`")
    prefix = _PREFIX[split]
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as f:
        # idx3 header: magic, count, rows, cols (4 x int32) = 16 bytes.
        pixels = np.frombuffer(f.read(), np.uint8, offset=16)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)  # idx1 header: 8 bytes
    if pixels.size != labels.size * 28 * 28:
        raise DataError(f"Fashion-MNIST {split}: {pixels.size} pixels for {labels.size} labels; "
                        "files corrupt?")
    return normalize_fashion_mnist(pixels), labels
