"""Readers for users' raw data: an image folder, a CSV table or MNIST-format IDX files.

Each reader returns a `RawDataset` or raises a UserError naming the file, row or column
that is wrong; nothing is written here, so a bad input never leaves partial output.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipelines.stagekit.cells import csv_rows, number_cell
from pipelines.stagekit.errors import UserError
from serving.preprocess import image_to_array

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class RawDataset:
    features: np.ndarray
    """float32, (N, C, H, W) for images or (N, F) for tables."""
    labels: np.ndarray
    """int64 class indices (classification) or float32 values (regression)."""
    class_names: tuple[str, ...] | None
    """Class of each label index; None for regression."""
    feature_names: tuple[str, ...] | None
    """Column of each feature for tables; None for images."""
    input_kind: Literal["image", "tabular"]


def read_image_folder(root: str | Path, size: tuple[int, int], grayscale: bool) -> RawDataset:
    """Read `<root>/<class>/*.png|jpg`; the class names are the sub-folder names, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise UserError(
            f"{root}: expected one sub-folder per class (at least 2), found {len(class_dirs)}"
        )
    listing: list[tuple[int, Path]] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise UserError(f"{class_dir}: class folder has no .png/.jpg images")
        listing.extend((index, file) for file in files)
    # A bar on terminals only (disable=None): large folders take a while, logs stay clean.
    progress = tqdm(listing, desc=f"reading {root}", unit="img", disable=None, leave=False)
    arrays = [_read_image(file, size, grayscale) for _, file in progress]
    labels = [index for index, _ in listing]
    log.info("read %d images in %d classes from %s", len(labels), len(class_dirs), root)
    return RawDataset(
        features=np.stack(arrays),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=tuple(d.name for d in class_dirs),
        feature_names=None,
        input_kind="image",
    )


def _read_image(file: Path, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    try:
        with Image.open(file) as image:
            image.load()
            return image_to_array(image, size, grayscale)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise UserError(f"{file}: unreadable image ({exc})") from None


# IDX's type byte -> numpy dtype; the format stores every number big-endian.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_file(path: str | Path) -> np.ndarray:
    """One IDX file (the format of MNIST and Fashion-MNIST; gzip-compressed when its name
    ends in .gz): the array in the shape its header gives."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: unreadable ({exc})") from None
    # Magic number: two zero bytes, the element type, the number of dimensions.
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES or data[3] == 0:
        raise UserError(f"{path}: not an IDX file (no IDX magic number at its start)")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise UserError(f"{path}: IDX header cut short")
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise UserError(
            f"{path}: {len(data)} bytes, but its header (shape {list(shape)}, {dtype.name}) "
            f"needs {expected}"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def read_idx_folder(root: str | Path, size: tuple[int, int], grayscale: bool) -> RawDataset:
    """Every pair of IDX files in `root` named like MNIST's (`train-images-idx3-ubyte` with
    `train-labels-idx1-ubyte`, `t10k-...`; `.gz` or not), concatenated: `prepare` makes its
    own split. Images are resized like an image folder's; class names are the label values."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: IDX folder not found")
    names = {p.name for p in root.iterdir() if p.is_file()}
    # A file unpacked beside its .gz (`gunzip -k`) is read once, from the unpacked copy.
    image_files = sorted(
        root / name
        for name in names
        if "images" in name and "idx3" in name and name.removesuffix(".gz") not in names - {name}
    )
    if not image_files:
        raise UserError(f"{root}: no IDX image files (named like train-images-idx3-ubyte[.gz])")
    images, values = [], []
    for image_file in image_files:
        label_file = image_file.with_name(
            image_file.name.replace("images", "labels").replace("idx3", "idx1")
        )
        if not label_file.is_file():
            raise UserError(f"{image_file}: its labels file {label_file.name} is missing")
        pixels, labels = read_idx_file(image_file), read_idx_file(label_file)
        if pixels.ndim != 3 or pixels.dtype != np.uint8:
            raise UserError(
                f"{image_file}: expected 8-bit images (count, height, width), found "
                f"{pixels.dtype.name} of shape {list(pixels.shape)}"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(pixels):
            raise UserError(
                f"{label_file}: expected {len(pixels)} integer labels (one per image in "
                f"{image_file.name}), found {labels.dtype.name} of shape {list(labels.shape)}"
            )
        images.append(pixels)
        values.append(labels.astype(np.int64))
    # Through PIL like an image folder's files, so both formats give the same arrays.
    pixels = np.concatenate(images)
    progress = tqdm(pixels, desc=f"reading {root}", unit="img", disable=None, leave=False)
    features = np.stack([image_to_array(Image.fromarray(p), size, grayscale) for p in progress])
    classes, labels = np.unique(np.concatenate(values), return_inverse=True)
    log.info("read %d images in %d classes from %s", len(labels), len(classes), root)
    return RawDataset(
        features=features,
        labels=labels.astype(np.int64),
        class_names=tuple(str(c) for c in classes),
        feature_names=None,
        input_kind="image",
    )


def read_csv_table(
    path: str | Path,
    label_column: str,
    feature_columns: tuple[str, ...],
    task: Literal["classification", "regression"],
) -> RawDataset:
    """Read a CSV with a header; features must be numbers, the label a class name or a number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found")
    with csv_rows(path) as reader:
        rows, raw_labels, columns = _read_rows(path, reader, label_column, feature_columns)
    if not rows:
        raise UserError(f"{path}: no data rows after the header")
    features = np.asarray(rows, dtype=np.float32)
    feature_names = tuple(name for name, _ in columns)
    if task == "regression":
        values = [number_cell(path, line_no, label_column, v) for line_no, v in raw_labels]
        return RawDataset(
            features, np.asarray(values, dtype=np.float32), None, feature_names, "tabular"
        )
    for line_no, value in raw_labels:
        if value == "":
            raise UserError(f"{path}: row {line_no}, column {label_column!r}: empty label")
    class_names = tuple(sorted({v for _, v in raw_labels}, key=natural_key))
    if len(class_names) < 2:
        raise UserError(f"{path}: column {label_column!r} has a single class; need at least 2")
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray([index[v] for _, v in raw_labels], dtype=np.int64)
    return RawDataset(features, labels, class_names, feature_names, "tabular")


def _read_rows(
    path: Path, reader, label_column: str, feature_columns: tuple[str, ...]
) -> tuple[list[list[float]], list[tuple[int, str]], list[tuple[str, int]]]:
    """Feature rows, (line number, raw label) pairs and the chosen (column, index) pairs."""
    header = next(reader, None)
    if not header:
        raise UserError(f"{path}: empty file (expected a header row)")
    header = [h.strip() for h in header]
    columns = _pick_columns(path, header, label_column, feature_columns)
    label_at = header.index(label_column)
    rows: list[list[float]] = []
    labels: list[tuple[int, str]] = []
    for line_no, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            raise UserError(
                f"{path}: row {line_no} has {len(row)} fields, the header has {len(header)}"
            )
        rows.append([number_cell(path, line_no, name, row[at]) for name, at in columns])
        labels.append((line_no, row[label_at].strip()))
    return rows, labels, columns


def _pick_columns(
    path: Path, header: list[str], label_column: str, feature_columns: tuple[str, ...]
) -> list[tuple[str, int]]:
    if label_column not in header:
        raise UserError(
            f"{path}: label column {label_column!r} not found; columns are: {', '.join(header)}"
        )
    wanted = feature_columns or tuple(h for h in header if h != label_column)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise UserError(
            f"{path}: feature column {missing[0]!r} not found; columns are: {', '.join(header)}"
        )
    if label_column in wanted:
        raise UserError(f"{path}: column {label_column!r} is both the label and a feature")
    if not wanted:
        raise UserError(f"{path}: no feature columns besides the label {label_column!r}")
    return [(name, header.index(name)) for name in wanted]


def natural_key(name: str) -> tuple[int, float | str]:
    """Sort numeric class names numerically ("2" before "10"), the rest alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def read_unlabeled_images(root: str | Path, size: tuple[int, int], grayscale: bool) -> np.ndarray:
    """Every .png/.jpg under `root` (any layout), preprocessed like the labeled images."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: unlabeled image folder not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{root}: no .png/.jpg images in the unlabeled folder")
    progress = tqdm(files, desc=f"reading {root}", unit="img", disable=None, leave=False)
    return np.stack([_read_image(file, size, grayscale) for file in progress])


def read_unlabeled_csv(path: str | Path, feature_columns: tuple[str, ...]) -> np.ndarray:
    """The feature columns of a CSV without labels (a label column, if present, is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: unlabeled CSV file not found")
    try:
        with csv_rows(path) as reader:
            header = [h.strip() for h in next(reader, None) or []]
            missing = [c for c in feature_columns if c not in header]
            if missing:
                raise UserError(
                    f"{path}: feature column {missing[0]!r} not found; columns are: {', '.join(header)}"
                )
            at = [header.index(c) for c in feature_columns]
            rows = [
                [number_cell(path, line_no, header[i], row[i]) for i in at]
                for line_no, row in enumerate(reader, start=2)
                if any(cell.strip() for cell in row)
            ]
    except IndexError:
        raise UserError(f"{path}: a row has fewer fields than the header") from None
    if not rows:
        raise UserError(f"{path}: no data rows in the unlabeled CSV")
    return np.asarray(rows, dtype=np.float32)
