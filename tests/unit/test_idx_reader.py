"""MNIST-format IDX files through `prepare`: written here byte by byte, good and malformed."""

import gzip
import struct

import numpy as np
import pytest

from pipelines.stagekit.dataset import load_prepared
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.readers import read_idx_file, read_idx_folder
from pipelines.supervised.config import PrepareConfig
from pipelines.supervised.prepare import prepare


def write_idx(path, array: np.ndarray, type_byte: int = 0x08) -> None:
    """The IDX layout from the MNIST page: 0, 0, type, ndim, each dimension as a big-endian
    uint32, then the values big-endian."""
    big_endian = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_byte]
    data = struct.pack(">BBBB", 0, 0, type_byte, array.ndim)
    data += struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(big_endian).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(data)


def gzip_bytes(path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data))


def mnist_like(root, counts=(("train", 24), ("t10k", 9)), size=(6, 5), gz=True):
    """Pairs of image/label files named like MNIST's: class k's images have brightness 20k."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, count in counts:
        labels = np.arange(count) % 3 + 1  # classes 1, 2, 3: not starting at 0
        images = np.broadcast_to((labels * 20)[:, None, None], (count, *size))
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root


def test_idx_file_round_trip_big_endian_and_gzip(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1000
    write_idx(tmp_path / "ints.idx", values, 0x0C)
    write_idx(tmp_path / "floats.idx.gz", values / 7, 0x0D)
    np.testing.assert_array_equal(read_idx_file(tmp_path / "ints.idx"), values)
    np.testing.assert_allclose(read_idx_file(tmp_path / "floats.idx.gz"), values / 7, rtol=1e-6)


def test_idx_folder_reads_every_pair_and_names_classes_by_label(tmp_path):
    raw = read_idx_folder(mnist_like(tmp_path / "idx"), (6, 5), grayscale=True)
    assert raw.features.shape == (33, 1, 6, 5) and raw.features.dtype == np.float32
    assert raw.class_names == ("1", "2", "3") and raw.input_kind == "image"
    # t10k sorts before train; each image's brightness says its class.
    np.testing.assert_allclose(raw.features[:, 0, 0, 0], (raw.labels + 1) * 20 / 255)
    resized = read_idx_folder(tmp_path / "idx", (3, 3), grayscale=False)
    assert resized.features.shape == (33, 3, 3, 3)
    # `gunzip -k` leaves both copies: each image is read once.
    mnist_like(tmp_path / "idx", counts=(("train", 24),), gz=False)
    assert len(read_idx_folder(tmp_path / "idx", (6, 5), grayscale=True).labels) == 33


def test_prepare_reads_an_idx_folder(tmp_path):
    root = mnist_like(tmp_path / "idx", gz=False)
    config = PrepareConfig(source=str(root), format="idx", image_size=(6, 5))
    manifest = prepare(config, str(root), str(tmp_path / "out"))
    assert manifest["input_shape"] == [1, 6, 5] and manifest["class_names"] == ["1", "2", "3"]
    data = load_prepared(tmp_path / "out")
    assert sum(len(data.y(split)) for split in ("train", "val", "test")) == 33


def test_idx_is_for_classification():
    with pytest.raises(ValueError, match="idx images are labeled with classes"):
        PrepareConfig(format="idx", task="regression")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "train-labels-idx1-ubyte.gz").unlink(), "labels file .* is missing"),
        (
            lambda r: write_idx(r / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8)),
            "expected 24 integer labels",
        ),
        (
            lambda r: write_idx(r / "t10k-images-idx3-ubyte.gz", np.zeros((9, 4), np.uint8)),
            r"expected 8-bit images \(count, height, width\)",
        ),
        (
            lambda r: (r / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip"),
            "train-images-idx3-ubyte.gz: unreadable",
        ),
        (
            lambda r: gzip_bytes(r / "t10k-images-idx3-ubyte.gz", b"\x00\x00\x08\x03\x00"),
            "IDX header cut short",
        ),
        (
            lambda r: gzip_bytes(r / "t10k-images-idx3-ubyte.gz", b"PK\x03\x04 a zip"),
            "not an IDX file",
        ),
    ],
)
def test_malformed_idx_names_the_file(tmp_path, damage, message):
    root = mnist_like(tmp_path / "idx")
    damage(root)
    with pytest.raises(UserError, match=message):
        read_idx_folder(root, (6, 5), grayscale=True)


def test_truncated_data_and_an_empty_folder(tmp_path):
    root = mnist_like(tmp_path / "idx", gz=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte: \d+ bytes, but its header"):
        read_idx_folder(root, (6, 5), grayscale=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no IDX image files"):
        read_idx_folder(tmp_path / "empty", (6, 5), grayscale=True)
