"""A node's images from a Hugging Face dataset with an image column (`datasets.Image()`), read from local
files only: a directory written by `Dataset.save_to_disk` (one split), a `.parquet` file written by
`Dataset.to_parquet`, or an `.arrow` file of one (a save_to_disk shard). Nothing is downloaded.

The images are decoded once, when the node loads its data, into float32 arrays (channels, height, width),
as a folder's images are (fedsafe.client.image_folder.ImageTransform): converted to grey or RGB, resized,
scaled to [0, 1], normalised. The node so holds them in memory (n × channels × height × width × 4 bytes);
a set larger than memory belongs in an image folder, which is read lazily. How images become inputs is
declared beside the dataset, as for a folder (`<dataset>.schema.json`):

    {"size": [28, 28], "channels": 1, "mean": [0.5], "std": [0.25]}

Without `size` and `channels`, every image must have one size and one kind (grey or colour), which become
the input's: images of mixed sizes or kinds are refused, naming what was found, rather than resized to
whichever image happens to come first (that would make the input depend on a node's own rows). The label
column (`label`) holds class numbers; a `ClassLabel` feature's names fix how many classes there are, the
same on every node. Other columns are not inputs. Each record's ledger digest is its class and its pixels
as decoded (image_folder.pixel_digest), so a copy of the set, re-saved or under another schema, is the
same data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data_error import DataError
from .image_folder import image_channels, image_transform, pixel_digest, read_image_schema, unreadable

HF_FILE_SUFFIXES = (".parquet", ".arrow")


@dataclass(frozen=True)
class HfImages:
    """The decoded images of a dataset, their labels as stored, and what the dataset declares."""

    x: np.ndarray  # float32 (n, channels, height, width)
    y: np.ndarray  # the label column as stored
    groups: np.ndarray | None
    record_digests: np.ndarray  # (n, 32) uint8, one SHA-256 per record (image_folder.pixel_digest)
    num_classes: int | None  # a ClassLabel's class count; None: the labels say


def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by a Hugging Face `datasets` save_to_disk: a Dataset's, or a DatasetDict's (which
    open_hf_dataset refuses by name: save one split)."""
    return path.is_dir() and (((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
                              or (path / "dataset_dict.json").is_file())


def open_hf_dataset(path: Path):
    """The Hugging Face Dataset saved at `path` (a save_to_disk directory, a .parquet or .arrow file);
    None for anything else. Memory-mapped where the format allows (directory, .arrow)."""
    from datasets import Dataset, load_from_disk

    if path.is_dir():
        if not is_hf_dataset_dir(path):
            return None
        dataset = load_from_disk(str(path))
        if not isinstance(dataset, Dataset):
            raise DataError(f"{path}: a DatasetDict; save one split (dataset['train'].save_to_disk(...))")
        return dataset
    if path.suffix == ".arrow":
        try:
            return Dataset.from_file(str(path))
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable Arrow file of a Hugging Face dataset "
                            f"({type(err).__name__})") from None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return Dataset(pq.read_table(path))
    return None


def image_columns(dataset) -> list[str]:
    """The columns the dataset declares as images (`datasets.Image()` features)."""
    from datasets import Image

    return [name for name, feature in dataset.features.items() if isinstance(feature, Image)]


def has_image_column(path: Path) -> bool:
    """Whether `path` is a Hugging Face dataset with an image column. A .parquet file is told by its schema
    alone (the features `to_parquet` records in it), without reading its rows."""
    if path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (OSError, ValueError):
            return False  # a damaged file: the table reader names it
        if b"huggingface" not in (schema.metadata or {}):
            return False  # no features recorded: a plain table (and no need to import datasets)
        from datasets import Features, Image

        return any(isinstance(feature, Image) for feature in Features.from_arrow_schema(schema).values())
    if path.is_dir() or path.suffix == ".arrow":
        dataset = open_hf_dataset(path)
        return dataset is not None and bool(image_columns(dataset))
    return False


def read_hf_images(path: Path, schema_file: Path, label_column: str, group_column: str | None) -> HfImages:
    """The dataset's one image column decoded as the schema says, its labels and groups; DataError naming
    what is wrong (no or several image columns, no label column, a row that is no image, mixed sizes or
    kinds without a declared size and channels, a schema that is not an image schema)."""
    from datasets import ClassLabel

    dataset = open_hf_dataset(path)
    columns = image_columns(dataset)
    if len(columns) != 1:
        raise DataError(f"{path}: needs one image column; found {columns}")
    for role, name in (("label", label_column), ("group", group_column)):
        if name is not None and name not in dataset.column_names:
            raise DataError(f"{path}: no {role} column {name!r}; found {dataset.column_names}")
    schema = read_image_schema(schema_file) if schema_file.exists() else {}
    if "classes" in schema:
        raise DataError(f"{schema_file}: a dataset's classes are its label column's numbers; drop \"classes\"")
    labels = np.asarray(dataset[label_column])
    x, digests = _inputs(path, dataset.data.table.column(columns[0]), labels, schema, schema_file)
    label_feature = dataset.features[label_column]
    return HfImages(x, labels, np.asarray(dataset[group_column]).astype(str) if group_column else None, digests,
                    label_feature.num_classes if isinstance(label_feature, ClassLabel) else None)


def _stored_images(path: Path, column):
    """(row, what its image is read from): the stored bytes, or its file where only a path is stored."""
    row = 0
    for chunk in column.chunks:
        for stored in chunk.to_pylist():
            stored = stored or {}
            source = io.BytesIO(stored["bytes"]) if stored.get("bytes") else stored.get("path")
            if source is None:
                raise DataError(f"{path}: row {row} holds no image")
            yield row, source
            row += 1


def _open(path: Path, row: int, source):
    """The row's image opened by Pillow (its header read; pixels decode on `load`)."""
    from PIL import Image

    try:
        return Image.open(source)
    except unreadable() as err:
        raise DataError(f"{path}: row {row} is not a readable image ({type(err).__name__})") from None


def _inputs(path: Path, column, labels: np.ndarray, schema: dict, schema_file: Path):
    """The images as inputs (float32, n × channels × height × width) and each record's digest: one pass over
    the headers for their sizes and kinds, one decoding each image in turn (never all held at once)."""
    found: set[tuple[tuple[int, int], int]] = set()
    for row, source in _stored_images(path, column):
        with _open(path, row, source) as image:
            found.add(((image.size[1], image.size[0]), image_channels(image)))
    if not found:
        raise DataError(f"{path}: the dataset holds no samples")
    if len(found) > 1 and ("size" not in schema or "channels" not in schema):
        kinds = ", ".join(f"{h}×{w}×{c}" for (h, w), c in sorted(found)[:4]) + (" …" if len(found) > 4 else "")
        raise DataError(f"{path}: images of {len(found)} sizes or kinds (height×width×channels: {kinds}) and no "
                        f"size to bring them to: set \"size\" and \"channels\" in {schema_file.name}")
    transform = image_transform(schema, schema_file, next(iter(found)))
    x = np.empty((len(labels), transform.channels, *transform.size), np.float32)
    digests = np.empty((len(labels), 32), np.uint8)
    for row, source in _stored_images(path, column):
        try:
            with _open(path, row, source) as image:
                digests[row] = pixel_digest(image, labels[row].item() if hasattr(labels[row], "item") else labels[row])
                x[row] = transform.apply(image)
        except unreadable() as err:
            raise DataError(f"{path}: row {row} is not a readable image ({type(err).__name__})") from None
    return x, digests
